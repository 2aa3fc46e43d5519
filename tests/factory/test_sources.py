"""Manifests as users have them: JSONL with a BOM and CRLF, JSONL.gz,
Parquet, and CT-RATE's reports CSV joined with its labels CSV; and
`ctfactory generate --dry-run`."""

import csv
import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from factory.manifest import ManifestRecord, Rejection, read_manifest
from factory.sources import ManifestError, manifest_rows
from report2ct.labels import CTRATE_LABELS

RECORDS = [
    {"id": "a", "findings": "Right pleural effusion.", "impression": "Effusion."},
    {"id": "b", "impression": "Cardiomegaly.", "labels": {"Cardiomegaly": 1}},
]


def read(uri, **kwargs):
    return list(read_manifest(manifest_rows(uri, **kwargs)))


def test_jsonl_with_a_bom_and_crlf_reads_every_record(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b"\r\n".join(json.dumps(r).encode() for r in RECORDS))
    results = read(str(path))
    assert [(line, r.id) for line, r in results] == [(1, "a"), (2, "b")]
    assert all(isinstance(r, ManifestRecord) for _, r in results)


def test_gzipped_jsonl_reads_like_jsonl(tmp_path):
    path = tmp_path / "m.jsonl.gz"
    path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in RECORDS).encode()))
    assert [r.model_dump(exclude_defaults=True) for _, r in read(str(path))] == RECORDS


def test_parquet_with_a_labels_struct_and_nulls(tmp_path):
    labels = pa.struct([(name, pa.int64()) for name in CTRATE_LABELS])
    table = pa.table(
        {
            "id": ["a", "b"],
            "findings": ["Right pleural effusion.", None],
            "impression": ["Effusion.", "Cardiomegaly."],
            "labels": pa.array([None, {"Cardiomegaly": 1}], type=labels),
            "seed": pa.array([None, 7], type=pa.int64()),
        }
    )
    pq.write_table(table, tmp_path / "m.parquet")
    (_, a), (line, b) = read(str(tmp_path / "m.parquet"))
    assert a.findings == "Right pleural effusion." and a.labels == {} and a.seed is None
    assert line == 2 and b.findings is None and b.seed == 7
    assert b.labels == {"Cardiomegaly": 1}  # labels the struct left null are not given


def write_ctrate(tmp_path):
    reports = tmp_path / "train_reports.csv"
    with reports.open("w", newline="", encoding="utf-8-sig") as handle:  # as Excel saves it
        writer = csv.writer(handle, lineterminator="\r\n")
        writer.writerow(
            [
                "VolumeName",
                "ClinicalInformation_EN",
                "Technique_EN",
                "Findings_EN",
                "Impressions_EN",
            ]
        )
        writer.writerow(
            ["train_1_a_1.nii.gz", "Cough.", "Non-contrast.", "Effusion, right.", "Effusion."]
        )
        writer.writerow(["train_2_a_1.nii.gz", "", "", "  ", "Normal thorax CT."])
        writer.writerow(["train_3_a_1.nii.gz", "", "", "Nodule.", "Nodule."])
    labels = tmp_path / "train_predicted_labels.csv"
    with labels.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["VolumeName", *CTRATE_LABELS])
        for name, effusion in (("train_1_a_1.nii.gz", 1), ("train_2_a_1.nii.gz", 0)):
            writer.writerow(
                [name, *(int(n == "Pleural effusion" and effusion) for n in CTRATE_LABELS)]
            )
    return reports, labels


def test_ctrate_reports_csv_joined_with_its_labels(tmp_path):
    reports, labels = write_ctrate(tmp_path)
    results = read(str(reports), labels=str(labels))
    first, second = results[0][1], results[1][1]
    assert first.id == "train_1_a_1" and first.findings == "Effusion, right."
    assert first.labels["Pleural effusion"] == 1 and sum(first.labels.values()) == 1
    assert second.findings is None and second.impression == "Normal thorax CT."  # empty: absent
    line, third = results[2]
    assert isinstance(third, Rejection) and (line, third.id) == (3, "train_3_a_1")
    assert "no row in the labels CSV" in third.reason


def test_a_csv_that_is_not_ctrate_and_labels_without_a_csv_are_refused(tmp_path):
    other = tmp_path / "other.csv"
    other.write_text("id,text\na,b\n")
    with pytest.raises(ManifestError, match="not a CT-RATE reports CSV"):
        read(str(other))
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text(json.dumps(RECORDS[0]) + "\n")
    with pytest.raises(ManifestError, match="--labels joins a CT-RATE reports CSV"):
        read(str(jsonl), labels=str(other))


def test_dry_run_prints_the_plan_writes_nothing_and_exits_3_on_a_bad_row(tmp_path, tiny_bundle):
    from jobs.cli import app

    manifest = tmp_path / "m.jsonl"
    rows = [*RECORDS[:1], {"id": "big", "impression": "x", "shape": [64, 64, 32]}, {"id": "bad"}]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["generate", "-m", str(manifest), "-o", str(tmp_path / "out"), "--bundle"]
    result = CliRunner().invoke(app, [*args, str(tiny_bundle), "--dry-run"])
    assert result.exit_code == 3, result.output
    assert "line 3: bad:" in result.output and "neither text" in result.output
    assert "32x32x16" in result.output and "64x64x32" in result.output
    assert "2 volumes requested" in result.output
    assert not (tmp_path / "out").exists()
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    assert CliRunner().invoke(app, [*args, str(tiny_bundle), "--dry-run"]).exit_code == 0
