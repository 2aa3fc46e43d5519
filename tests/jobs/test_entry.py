"""The entry modules' exit codes and log formats, and how a Ray job's end
maps onto the same exit codes (`submit --wait`, `status`)."""

import json
import logging
from types import SimpleNamespace

from jobs._entry import EXIT_FATAL, main
from jobs.submit import _read_summary, exit_code

SPEC = json.dumps({"kind": "shard", "manifest": "m.jsonl", "output": "out", "num_shards": 2})


def test_the_run_code_passes_through_and_any_failure_is_exit_2(capsys):
    assert main("shard", lambda spec: 3, ["--spec-json", SPEC]) == 3

    def broken(spec):
        raise OSError("bucket gone")

    assert main("shard", broken, ["--spec-json", SPEC]) == EXIT_FATAL
    assert "OSError: bucket gone" in capsys.readouterr().err  # the traceback is logged
    assert main("generate", lambda spec: 0, ["--spec-json", SPEC]) == EXIT_FATAL  # wrong kind


def test_json_log_format_writes_one_object_a_line(capsys):
    def run(spec):
        logging.getLogger("jobs.shard").warning("shard %d written", 1)
        return 0

    assert main("shard", run, ["--spec-json", SPEC, "--log-format", "json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line]
    assert {"level": "WARNING", "logger": "jobs.shard", "message": "shard 1 written"}.items() <= (
        lines[-1].items()
    )
    assert lines[-1]["time"].endswith("Z")


def test_a_ray_jobs_end_maps_onto_the_clis_exit_codes():
    def info(status, code=None):
        return SimpleNamespace(status=status, driver_exit_code=code)

    assert exit_code(info("RUNNING")) is None
    assert exit_code(info("SUCCEEDED", 0)) == 0
    assert exit_code(info("FAILED", 3)) == 3  # partial: some records in the errors
    assert exit_code(info("FAILED", 2)) == 2
    assert exit_code(info("FAILED", 1)) == 2 and exit_code(info("STOPPED")) == 2


def test_status_reads_the_jobs_live_summary(tmp_path):
    assert _read_summary(str(tmp_path / "run/summary.json")) is None  # not written yet
    (tmp_path / "run").mkdir()
    summary = {"state": "running", "counts": {"committed": 5}, "eta_s": 12.0, "options": {}}
    (tmp_path / "run/summary.json").write_text(json.dumps(summary))
    assert _read_summary(str(tmp_path / "run/summary.json")) == {
        "state": "running",
        "counts": {"committed": 5},
        "eta_s": 12.0,
    }
