"""Manifest validation: every kind of bad row rejected with line, id and reason."""

import json

import pytest

from factory.manifest import ManifestRecord, Rejection, read_manifest
from report2ct.config import preset
from report2ct.labels import CTRATE_LABELS

GOOD = {"id": "pt-1", "findings": "Right pleural effusion.", "impression": "Effusion."}


def lines(*records):
    return [r if isinstance(r, bytes) else json.dumps(r).encode() for r in records]


def test_good_records_and_defaults():
    ((line, record),) = list(read_manifest(iter(lines(GOOD)), config=preset("tiny")))
    assert line == 1 and isinstance(record, ManifestRecord)
    assert record.num_samples == 1 and record.label_vector() == [0] * 18
    assert record.sample_seed() == ManifestRecord.model_validate(GOOD).sample_seed()


BAD = [
    (b'{"id": "x", "findings": ', None, "malformed JSON"),
    ({**GOOD, "colour": "blue"}, "pt-1", "colour: unknown field"),
    ({"id": "pt-1"}, "pt-1", "neither text (findings, impression) nor labels"),
    ({"id": "pt-1", "labels": {}, "spacing_mm": [8, 8, 10]}, "pt-1", "neither text"),
    ({**GOOD, "mask": "masks/p1.nii.gz"}, "pt-1", "not s3://, file:// or an absolute path"),
    ({**GOOD, "mask": "/data/p1.png"}, "pt-1", "must end in one of .nii"),
    ({**GOOD, "mask": "/m.nii.gz", "mask_source": "phantom"}, "pt-1", "either mask"),
    ({**GOOD, "mask_source": "atlas"}, "pt-1", "mask_source"),
    ({**GOOD, "mask_legend": "/map.json"}, "pt-1", "give mask too"),
    ({**GOOD, "mask_source": "phantom"}, "pt-1", "no mask condition (ControlNet)"),
    ({**GOOD, "findings": "   "}, "pt-1", "findings: must not be empty"),
    ({**GOOD, "findings": "x" * 2_000_000}, "pt-1", "the limit is"),
    ({**GOOD, "impression": "bad\x07bell"}, "pt-1", "control characters"),
    (b'{"id": "pt-1", "findings": "\xff\xfe", "impression": "x"}', None, "invalid UTF-8"),
    ({**GOOD, "id": "../../etc/passwd"}, "../../etc/passwd", "id"),
    ({**GOOD, "id": "a/b"}, "a/b", "id"),
    ({**GOOD, "spacing_mm": [float("nan"), 8, 10]}, None, None),  # NaN is not JSON: see below
    ({**GOOD, "spacing_mm": [-8, 8, 10]}, "pt-1", "finite positive"),
    ({**GOOD, "spacing_mm": [0, 8, 10]}, "pt-1", "finite positive"),
    ({**GOOD, "spacing_mm": [800, 8, 10]}, "pt-1", "outside the model's range"),
    ({**GOOD, "shape": [100000, 32, 16]}, "pt-1", "unsupported"),
    ({**GOOD, "labels": {"Dragon": 1}}, "pt-1", "unknown label names"),
    ({**GOOD, "labels": {"Cardiomegaly": 2}}, "pt-1", "0 or 1"),
    ({**GOOD, "labels": {"Cardiomegaly": "1"}}, "pt-1", "labels.Cardiomegaly"),
    ([1, 2, 3], None, "JSON object"),
]


@pytest.mark.parametrize(("raw", "record_id", "reason"), [b for b in BAD if b[2]])
def test_each_kind_of_bad_row_is_rejected_with_a_reason(raw, record_id, reason):
    rows = list(
        read_manifest(
            iter([json.dumps(GOOD | {"id": "ok"}).encode(), *lines(raw)]), config=preset("tiny")
        )
    )
    assert isinstance(rows[0][1], ManifestRecord)
    line, rejection = rows[1]
    assert line == 2 and isinstance(rejection, Rejection)
    assert rejection.id == record_id
    assert reason in rejection.reason, rejection.reason


def test_nan_spacing_is_rejected():
    raw = b'{"id": "n", "findings": "a", "impression": "b", "spacing_mm": [NaN, 8, 10]}'
    ((_, rejection),) = list(read_manifest(iter([raw]), config=preset("tiny")))
    assert isinstance(rejection, Rejection) and "finite positive" in rejection.reason


def test_duplicate_ids_keep_the_first_and_blank_lines_are_skipped():
    rows = list(read_manifest(iter(lines(GOOD, b"", GOOD)), config=None))
    assert [line for line, _ in rows] == [1, 3]
    assert isinstance(rows[0][1], ManifestRecord)
    assert isinstance(rows[1][1], Rejection) and "duplicate id" in rows[1][1].reason


def test_id_set_finds_duplicates_within_and_across_batches_and_chunks():
    import numpy as np

    from factory.manifest import IdSet

    ids = IdSet(chunk=64)
    assert ids.add_many([f"pt-{i}" for i in range(100)]) == [True] * 100  # spills into 2 chunks
    assert ids.add_many(["pt-0", "new", "pt-99", "new", "pt-63"]) == [
        False,
        True,
        False,
        False,
        False,
    ]
    assert len(ids) == 101 and len(ids._chunks) == 2
    assert all((np.diff(c.astype(np.float64)) > 0).all() for c in ids._chunks)  # sorted, distinct
    assert sum(c.nbytes for c in ids._chunks) == 8 * 101  # 8 bytes per id


def test_duplicates_across_read_batches_name_the_later_line():
    lines = [
        json.dumps({"id": f"r{i % 7}", "findings": "a", "impression": "b"}).encode()
        for i in range(20)
    ]
    results = list(read_manifest(iter(lines), batch=3))
    assert [n for n, _ in results] == list(range(1, 21))
    rejected = [n for n, r in results if isinstance(r, Rejection)]
    assert rejected == list(range(8, 21)) and all(
        "duplicate id" in r.reason for _, r in results[7:]
    )


def test_records_may_ask_by_labels_alone_when_the_model_has_the_label_condition():
    import dataclasses

    label_only = {"id": "by-labels", "labels": {"Cardiomegaly": 1, "Emphysema": 0}}
    ((_, record),) = list(read_manifest(iter(lines(label_only)), config=preset("tiny")))
    assert isinstance(record, ManifestRecord) and record.findings is None
    assert record.label_vector()[CTRATE_LABELS.index("Cardiomegaly")] == 1
    text_only_model = dataclasses.replace(preset("tiny"), label_condition=False)
    ((_, rejection),) = list(read_manifest(iter(lines(label_only)), config=text_only_model))
    assert isinstance(rejection, Rejection) and rejection.id == "by-labels"
    assert "no label condition" in rejection.reason


def test_mask_records_validate_against_a_model_with_a_controlnet():
    import dataclasses

    from report2ct.config import ControlConfig

    config = dataclasses.replace(preset("tiny"), control=ControlConfig(legend=((3, "lung"),)))
    records = [
        {"id": "a", "labels": {"Pleural effusion": 1}, "mask_source": "phantom"},
        {**GOOD, "id": "b", "mask": "s3://bucket/m/b.nii.gz", "mask_legend": "s3://b/map.json"},
        {**GOOD, "id": "c", "mask": "file:///data/c.ome.zarr"},
        {"id": "d", "labels": {"Bronchiectasis": 1}, "mask_source": "phantom"},
    ]
    rows = [row for _, row in read_manifest(iter(lines(*records)), config=config)]
    assert all(isinstance(row, ManifestRecord) and row.has_mask for row in rows[:3]), rows
    assert isinstance(rows[3], Rejection) and rows[3].id == "d"
    assert "cannot draw ['Bronchiectasis']" in rows[3].reason


@pytest.mark.parametrize("manifest", ["reports.jsonl", "control.jsonl"])
def test_examples_validate_against_the_committed_bundle(manifest):
    """`make demo` runs both example manifests on the committed bundle: every
    line must pass; the control examples ask by labels alone and by drawn masks."""
    from pathlib import Path

    from report2ct.bundle import read_config

    root = Path(__file__).resolve().parents[2]
    raw = (root / "examples" / manifest).read_bytes().splitlines()

    config = read_config(root / "report2ct" / "bundles" / "demo")
    results = [result for _, result in read_manifest(iter(raw), config=config)]
    assert [r for r in results if isinstance(r, Rejection)] == []
    if manifest == "control.jsonl":
        assert any(r.findings is None and r.impression is None for r in results)  # labels alone
        assert any(r.mask_source == "phantom" for r in results)
