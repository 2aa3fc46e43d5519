"""Retries that run out, and two attempts racing to commit one volume."""

import json

import numpy as np
import pytest

from factory import commit
from factory.index import read_errors, read_index
from factory.job import EXIT_OK, EXIT_PARTIAL, GenerateOptions, run_generate
from factory.storage import open_storage
from factory.worker import GenerateWorker, WorkerOptions

REPORT = {"findings": "Right pleural effusion.", "impression": "Effusion."}


def write_manifest(path, ids):
    path.write_text("".join(json.dumps({"id": i, **REPORT}) + "\n" for i in ids))
    return str(path)


@pytest.mark.integration
def test_a_volume_that_kills_its_worker_fails_after_its_tries_and_a_rerun_retries_it(
    tmp_path, ray_local, tiny_bundle, monkeypatch
):
    manifest = write_manifest(tmp_path / "m.jsonl", ["a", "b", "c"])
    options = GenerateOptions(
        manifest=manifest,
        output=str(tmp_path / "out"),
        bundle=str(tiny_bundle),
        workers=1,
        num_steps=2,
        max_task_retries=1,
    )
    monkeypatch.setenv("CTFACTORY_FAULTS", "die_on_key=b")
    first = run_generate(options)
    assert first.exit_code == EXIT_PARTIAL, first.summary
    assert first.counts["committed"] == 2 and first.counts["failed"] == 1
    run = open_storage(str(tmp_path / "out/m"))
    errors = list(read_errors(run))
    assert [(e["id"], e["line"]) for e in errors] == [("b", 2)]
    assert "gave up after 2 tries" in errors[0]["reason"]
    # Two tries were claimed (each ended with the worker's death), no third.
    tries = [k for k in run.list("_work/tries/") if k.split("/")[-2] == "b"]
    assert sorted(k.rsplit("/", 1)[1] for k in tries) == ["1", "2", "3"]  # 3: the refusal

    monkeypatch.delenv("CTFACTORY_FAULTS")
    second = run_generate(options)
    assert second.exit_code == EXIT_OK, second.summary
    assert second.counts["generated"] == 1 and second.counts["skipped_already_committed"] == 2
    assert sorted(entry.id for entry in read_index(run)) == ["a", "b", "c"]


@pytest.fixture
def worker(tmp_path, tiny_bundle):
    return GenerateWorker(
        WorkerOptions(bundle=str(tiny_bundle), run_root=str(tmp_path / "run"), max_tries=3)
    )


def batch(record_id):
    return {"item": np.array([json.dumps({"line": 1, "record": {"id": record_id, **REPORT}})])}


def outcomes(worker, record_id):
    return [json.loads(row) for row in worker(batch(record_id))["result"]]


def test_the_attempt_that_loses_the_commit_deletes_its_files_and_reports_the_winner(
    worker, monkeypatch
):
    (first,) = outcomes(worker, "raced")
    assert first["status"] == "generated"
    winner = commit.read_commit(worker.run, "raced")["attempt"]
    # A second attempt that planned before the first committed: it writes its
    # own files, then its conditional put loses.
    real_read = commit.read_commit
    calls = iter([None])
    monkeypatch.setattr(commit, "read_commit", lambda run, key: next(calls, real_read(run, key)))
    (second,) = outcomes(worker, "raced")
    assert second["status"] == "skipped" and second["entry"] == first["entry"]
    attempts = {key.split("/")[2] for key in worker.run.list("volumes/raced/")}
    assert attempts == {winner}, "the loser's files must be gone"


def test_a_lost_commit_answer_is_recognised_as_our_own_win(worker, monkeypatch):
    real_try = commit.try_commit

    def answer_lost(run, key, marker):  # the put lands, its answer does not
        real_try(run, key, marker)
        return False

    monkeypatch.setattr(commit, "try_commit", answer_lost)
    (outcome,) = outcomes(worker, "lost-answer")
    assert outcome["status"] == "generated"
    marker = commit.read_commit(worker.run, "lost-answer")
    assert marker["index"] == outcome["entry"]
    assert all(worker.run.exists(key) for key in marker["files"]), "our files must stay"


@pytest.mark.integration
def test_a_rerun_of_a_committed_job_reaches_no_actor_and_lists_nothing_twice(
    tmp_path, ray_local, tiny_bundle, monkeypatch
):
    import factory.job

    manifest = write_manifest(tmp_path / "done.jsonl", ["x", "y"])
    options = GenerateOptions(
        manifest=manifest, output=str(tmp_path / "out"), bundle=str(tiny_bundle), num_steps=2
    )
    assert run_generate(options).exit_code == EXIT_OK
    run = open_storage(str(tmp_path / "out/done"))
    # A driver killed after the commits, before its index part: the rerun
    # lists those volumes from their markers, once.
    for key in run.list("index/"):
        run.delete_prefix(key)

    def no_actor(*args, **kwargs):
        raise AssertionError("a committed record reached the workers")

    monkeypatch.setattr(factory.job, "_generate", no_actor)
    again = run_generate(options)
    assert again.exit_code == EXIT_OK and again.counts["skipped_already_committed"] == 2
    third = run_generate(options)
    assert third.counts["skipped_already_committed"] == 2
    assert sorted(entry.id for entry in read_index(run)) == ["x", "y"]  # each once

    # The same volumes as a Ray Data dataset, for training consumers on a cluster.
    from factory.reader import GeneratedVolumes, ray_dataset

    rows = {row["id"]: row for row in ray_dataset(str(tmp_path / "out/done")).take_all()}
    for item in GeneratedVolumes(str(tmp_path / "out/done")):
        np.testing.assert_array_equal(rows[item["id"]]["volume"], item["volume"][0].numpy())
        np.testing.assert_array_equal(rows[item["id"]]["labels"], item["labels"].numpy())
