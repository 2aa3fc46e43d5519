"""The evaluate job's entry point: a generated run scored against a phantom
reference, the report written to S3; a remote reference is refused."""

import json

import pytest

from evaluation.data import phantom_cases
from jobs._entry import EXIT_FATAL, main
from phantom.ctrate_layout import DatasetSpec, write_dataset
from tests.evaluation.test_evaluate_cli import SHAPE, SPACING_MM, write_generated_run


@pytest.mark.integration
def test_evaluate_job_writes_its_report_to_s3(tmp_path, s3_server, s3_bucket, capsys):
    reference = tmp_path / "reference"
    write_dataset(
        reference,
        DatasetSpec(n=32, seed=4, shape=SHAPE, spacing_mm=SPACING_MM, valid_fraction=0.25),
    )
    generated = phantom_cases(
        range(3000, 3009), shape=SHAPE, spacing_mm=SPACING_MM, prevalence=0.4, id_prefix="gen"
    )
    index = write_generated_run(tmp_path / "run", generated)
    spec = {
        "kind": "evaluate",
        "generated": str(index),
        "reference": str(reference),
        "output": f"s3://{s3_bucket}/eval",
        "epochs": 1,
    }
    assert main("evaluate", _run, ["--spec-json", json.dumps(spec)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert set(printed) == {"label_fidelity", "fid_2p5d", "clip"}
    keys = {o["Key"] for o in s3_server.client().list_objects_v2(Bucket=s3_bucket)["Contents"]}
    assert {"eval/metrics.json", "eval/report.md", "eval/models/classifier/SHA256SUMS"} <= keys
    assert any(k.startswith("eval/montages/") and k.endswith(".png") for k in keys)


def test_evaluate_job_refuses_a_remote_reference(capsys):
    spec = {
        "kind": "evaluate",
        "generated": "x/index.jsonl",
        "reference": "s3://b/ref",
        "output": "o",
    }
    assert main("evaluate", _run, ["--spec-json", json.dumps(spec)]) == EXIT_FATAL
    assert "give a local directory" in capsys.readouterr().err


def _run(spec):
    from jobs.evaluate import run

    return run(spec)
