"""`ctfactory submit` against a Ray head started like a cluster's: the job
runs, its outputs are committed, and the same spec submitted again is the
same job."""

import json

import pytest
import yaml
from typer.testing import CliRunner

from jobs.cli import app

pytestmark = pytest.mark.integration


def test_submit_generate_spec_once(ray_head, tiny_bundle, tmp_path):
    manifest = tmp_path / "reports.jsonl"
    manifest.write_text(
        "".join(
            json.dumps(
                {"id": f"s{i}", "findings": "Right pleural effusion.", "impression": "Effusion."}
            )
            + "\n"
            for i in range(3)
        )
    )
    spec = tmp_path / "generate.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "kind": "generate",
                "manifest": str(manifest),
                "output": str(tmp_path / "out"),
                "bundle": str(tiny_bundle),
                "workers": 1,
                "num_steps": 2,
            }
        )
    )
    runner = CliRunner()
    first = runner.invoke(app, ["submit", str(spec), "--address", ray_head.address, "--wait"])
    assert first.exit_code == 0, first.output
    assert "submitted:" in first.output and "SUCCEEDED" in first.output
    from factory.index import read_index
    from factory.storage import open_storage

    index = read_index(open_storage(str(tmp_path / "out/reports")))
    assert sorted(entry.id for entry in index) == ["s0", "s1", "s2"]

    second = runner.invoke(app, ["submit", str(spec), "--address", ray_head.address])
    assert second.exit_code == 0 and "already submitted" in second.output
    job_id = second.output.split("already submitted: ")[1].split()[0]
    from ray.job_submission import JobSubmissionClient

    jobs = [
        j for j in JobSubmissionClient(ray_head.address).list_jobs() if j.submission_id == job_id
    ]
    assert len(jobs) == 1  # one job, not two
    status = runner.invoke(app, ["status", job_id, "--address", ray_head.address])
    assert json.loads(status.output)["status"] == "SUCCEEDED"
    logs = runner.invoke(app, ["logs", job_id, "--address", ray_head.address])
    assert '"committed": 3' in logs.output


def test_submit_retry_resubmits_a_failed_job_only_when_asked(ray_head, tiny_bundle, tmp_path):
    manifest = tmp_path / "later.jsonl"  # not there yet: the first job fails
    spec = tmp_path / "generate.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "kind": "generate",
                "manifest": str(manifest),
                "output": str(tmp_path / "out"),
                "bundle": str(tiny_bundle),
                "workers": 1,
                "num_steps": 2,
            }
        )
    )
    runner, address = CliRunner(), ("--address", ray_head.address)
    first = runner.invoke(app, ["submit", str(spec), *address, "--wait"])
    assert first.exit_code == 2 and "FAILED" in first.output, first.output  # could not run
    job_id = first.output.split("submitted: ")[1].split()[0]

    manifest.write_text(json.dumps({"id": "r0", "findings": "Cardiomegaly."}) + "\n")
    # Without --retry a failed job is reported as it is, not run again...
    again = runner.invoke(app, ["submit", str(spec), *address])
    assert again.exit_code == 0 and f"already submitted: {job_id} (FAILED)" in again.output
    # ...with it, the same spec runs again under the next attempt's id.
    retried = runner.invoke(app, ["submit", str(spec), *address, "--retry", "--wait"])
    assert retried.exit_code == 0, retried.output
    assert f"submitted: {job_id}-retry1" in retried.output and "SUCCEEDED" in retried.output
    from factory.index import read_index
    from factory.storage import open_storage

    assert [e.id for e in read_index(open_storage(str(tmp_path / "out/later")))] == ["r0"]
    # A succeeded job is never resubmitted, --retry or not.
    done = runner.invoke(app, ["submit", str(spec), *address, "--retry"])
    assert f"already submitted: {job_id}-retry1 (SUCCEEDED)" in done.output, done.output
