"""`ctfactory evaluate` end to end: a phantom reference set written in CT-RATE
layout, a tiny generated set written by the factory's own OME-Zarr writer and
commit markers, every metrics.json field, the report and its montages."""

import json
import math

import numpy as np
from typer.testing import CliRunner

from evaluation.data import phantom_cases
from factory import commit
from factory.storage import open_storage
from factory.writer import write_ome_zarr
from jobs.cli import app
from phantom.ctrate_layout import DatasetSpec, write_dataset
from report2ct.labels import CTRATE_LABELS

SHAPE, SPACING_MM = (32, 32, 24), (12.0, 12.0, 13.5)


def write_generated_run(run_dir, cases):
    """A job run as the factory leaves it: volumes, commit markers, an index part.
    Generated volumes are held-out-like phantoms at another spacing (so
    resampling from metadata is exercised), one of them never committed."""
    run = open_storage(str(run_dir))
    lines = []
    for i, case in enumerate(cases):
        key = case.id
        path = run_dir / commit.attempt_prefix(key, "a0") / "volume.ome.zarr"
        write_ome_zarr(
            path, case.volume_hu.astype(np.int16), case.spacing_mm, attributes={"id": key}
        )
        entry = {
            "id": key,
            "sample": 0,
            "key": key,
            "uri": str(path),
            "spacing_mm": list(case.spacing_mm),
            "shape": list(case.volume_hu.shape),
            "labels": {n: int(v) for n, v in zip(CTRATE_LABELS, case.labels, strict=True)},
            "seed": i,
            "findings": case.report,
            "impression": "",
        }
        if i < len(cases) - 1:  # the last one: a killed attempt, never committed nor listed
            assert commit.try_commit(run, key, {"attempt": "a0"})
            lines.append(json.dumps(entry))
    (run_dir / "index").mkdir()
    (run_dir / "index/part-00000.jsonl").write_text("\n".join(lines) + "\n")
    return run_dir


def test_evaluate_writes_every_metric_and_the_report(tmp_path):
    reference = tmp_path / "reference"
    write_dataset(
        reference,
        DatasetSpec(n=48, seed=3, shape=SHAPE, spacing_mm=SPACING_MM, valid_fraction=0.25),
    )
    generated = phantom_cases(
        range(2000, 2013),
        shape=(40, 40, 27),
        spacing_mm=(9.6, 9.6, 12.0),
        prevalence=0.4,
        id_prefix="gen",
    )
    index = write_generated_run(tmp_path / "run", generated)

    out = tmp_path / "eval"
    result = CliRunner().invoke(
        app,
        [
            "evaluate",
            *("--generated", str(index), "--reference", str(reference), "--out", str(out)),
            *("--spacing-mm", "12", "12", "13.5", "--shape", "32", "32", "24", "--epochs", "2"),
            *("--classifier-grid", "common"),
        ],
    )
    assert result.exit_code == 0, result.output

    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"label_fidelity", "fid_2p5d", "clip", "counts", "models", "settings"}
    assert metrics["counts"] == {"generated": 12, "reference_train": 36, "reference_held_out": 12}
    fidelity = metrics["label_fidelity"]
    for side in ("generated", "real"):
        assert set(fidelity[side]["per_label"]) == set(CTRATE_LABELS)
        # The phantom world never renders bronchiectasis: one class, no AUROC.
        assert fidelity[side]["per_label"]["Bronchiectasis"] is None
    # (macro and ratio against known per-label values: tests/evaluation/test_classifier.py)
    fid = metrics["fid_2p5d"]
    assert set(fid) == {"axial", "coronal", "sagittal", "mean", "feature_net"}
    assert all(math.isfinite(fid[p]) and fid[p] >= 0 for p in ("axial", "coronal", "sagittal"))
    assert set(metrics["clip"]) == {
        "text_to_image",
        "image_to_image",
        "real_text_to_image",
        "image_to_image_unmatched",
    }
    assert 0 <= metrics["clip"]["text_to_image"] <= 100

    # The networks trained here are saved as verified bundles beside the metrics.
    for name in ("classifier", "clip", "slice-net"):
        assert (out / "models" / name / "SHA256SUMS").is_file()
    # The classifier carries thresholds chosen on the held-out split (a verifier
    # for `generate --verify`): one for each label it separates well enough there.
    from evaluation.bundle import load_eval_bundle
    from evaluation.classifier import MIN_VERIFIER_AUROC

    _, saved, _ = load_eval_bundle(out / "models" / "classifier", kind="label-classifier")
    assert set(saved["thresholds"]) == set(CTRATE_LABELS) and saved["held_out"] == 12
    for name, threshold in saved["thresholds"].items():
        auroc = saved["auroc"][name]
        assert (threshold is None) == (auroc is None or auroc < MIN_VERIFIER_AUROC), name
    assert saved["thresholds"]["Bronchiectasis"] is None  # never rendered: never judged
    assert metrics["settings"]["classifier"]["shape"] == [32, 32, 24]
    report = (out / "report.md").read_text()
    assert "label fidelity ratio" in report and "| axial |" in report
    pngs = sorted((out / "montages").glob("*.png"))
    assert pngs and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert all(f"montages/{p.name}" in report for p in pngs)

    # A second run reuses the saved networks instead of training them again.
    again = CliRunner().invoke(
        app,
        [
            "evaluate",
            *(
                "--generated",
                str(index),
                "--reference",
                str(reference),
                "--out",
                str(tmp_path / "eval2"),
            ),
            *("--spacing-mm", "12", "12", "13.5", "--shape", "32", "32", "24"),
            *(
                "--classifier",
                str(out / "models" / "classifier"),
                "--clip",
                str(out / "models" / "clip"),
            ),
            *("--feature-net", str(out / "models" / "slice-net")),
        ],
    )
    assert again.exit_code == 0, again.output
    # Same networks, same sets: the same numbers, every one of them.
    reused = json.loads((tmp_path / "eval2" / "metrics.json").read_text())
    assert reused["fid_2p5d"] == fid
    assert reused["label_fidelity"] == fidelity
    assert reused["clip"] == metrics["clip"]


def test_evaluate_names_a_missing_reference(tmp_path):
    index = write_generated_run(
        tmp_path / "run", phantom_cases(range(2), shape=SHAPE, spacing_mm=SPACING_MM)
    )
    result = CliRunner().invoke(
        app,
        [
            "evaluate",
            "--generated",
            str(index),
            "--reference",
            str(tmp_path / "nope"),
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert result.exit_code == 2
    assert "nope" in result.output
