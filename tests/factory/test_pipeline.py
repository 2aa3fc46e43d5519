"""The worker's pipeline: two calls of one actor overlap, a retry runs alone."""

import dataclasses
import json
import threading

import numpy as np
import pytest

from factory import commit
from factory.worker import GenerateWorker, Slots, WorkerOptions

REPORT = {"findings": "Right pleural effusion.", "impression": "Effusion."}
WAIT_S = 60  # a bound on waits that end at once unless the code is wrong


def test_two_calls_share_the_actor_and_a_call_alone_waits_for_them_and_goes_first():
    slots = Slots()
    entered = []
    inside = {name: threading.Event() for name in "ABCD"}
    leave = {name: threading.Event() for name in "ABCD"}

    def call(name, alone):
        with slots.hold(alone=alone):
            entered.append(name)
            inside[name].set()
            assert leave[name].wait(WAIT_S)

    def start(name, alone):
        thread = threading.Thread(target=call, args=(name, alone), daemon=True)
        thread.start()
        return thread

    threads = [start("A", False), start("B", False)]
    assert inside["A"].wait(WAIT_S) and inside["B"].wait(WAIT_S)  # both in at once
    threads.append(start("C", True))
    assert slots.wait_for_waiting(1, WAIT_S)
    threads.append(start("D", False))  # arrives while C waits: goes after C
    assert slots.wait_for_waiting(2, WAIT_S)
    assert not inside["C"].is_set()
    leave["A"].set()
    leave["B"].set()
    assert inside["C"].wait(WAIT_S)
    assert not inside["D"].is_set(), "a call came in beside the one alone"
    leave["C"].set()
    assert inside["D"].wait(WAIT_S)
    leave["D"].set()
    for thread in threads:
        thread.join(WAIT_S)
    assert sorted(entered[:2]) == ["A", "B"] and entered[2:] == ["C", "D"]


@pytest.fixture
def worker(tmp_path, tiny_bundle):
    return GenerateWorker(
        WorkerOptions(
            bundle=str(tiny_bundle), run_root=str(tmp_path / "run"), max_tries=3, job_id="job-1"
        )
    )


def batch(record_id):
    return {"item": np.array([json.dumps({"line": 1, "record": {"id": record_id, **REPORT}})])}


def outcome(worker, record_id):
    (row,) = worker(batch(record_id))["result"]
    return json.loads(row)


def claims(worker, key):
    folder = f"_work/tries/{worker.options.job_id}/{key}/"
    return {
        name.rsplit("/", 1)[1]: json.loads(worker.run.read_bytes(name))
        for name in worker.run.list(folder)
    }


def test_a_retry_waits_until_it_is_alone_in_the_actor_before_it_claims_a_try(worker):
    writing, release = threading.Event(), threading.Event()
    real_write = worker._write_and_commit

    def held_write(item, *args):
        if item.task.key == "first":
            writing.set()
            assert release.wait(WAIT_S)
        return real_write(item, *args)

    worker._write_and_commit = held_write
    results = {}

    def call(record_id):
        results[record_id] = outcome(worker, record_id)

    first = threading.Thread(target=call, args=("first",), daemon=True)
    first.start()
    assert writing.wait(WAIT_S)  # "first" is being written, its slot held
    # "again" was tried before in this job: its actor died during that try.
    worker.run.put_if_absent("_work/tries/job-1/again/1", b'{"pid": 1, "alone": false}')
    again = threading.Thread(target=call, args=("again",), daemon=True)
    again.start()
    assert worker.slots.wait_for_waiting(1, WAIT_S)
    assert "2" not in claims(worker, "again"), "a retry claimed a try beside another call"
    release.set()
    first.join(WAIT_S)
    again.join(WAIT_S)
    assert results["first"]["status"] == results["again"]["status"] == "generated"
    assert [claim["alone"] for claim in claims(worker, "first").values()] == [False]
    assert claims(worker, "again")["2"]["alone"] is True


def test_a_volume_committed_by_a_killed_try_of_this_job_counts_as_generated(worker):
    first = outcome(worker, "once")
    assert first["status"] == "generated"
    # The same batch again, as Ray Data retries it when the actor died after
    # the commit and before the call returned: this job generated it.
    again = outcome(worker, "once")
    assert again["status"] == "generated" and again["entry"] == first["entry"]
    assert set(claims(worker, "once")) == {"1"}, "a committed volume claims no try"
    # A rerun (another job) finds it committed before: skipped.
    worker.options = dataclasses.replace(worker.options, job_id="job-2")
    rerun = outcome(worker, "once")
    assert rerun["status"] == "skipped" and rerun["entry"] == first["entry"]
    assert commit.read_commit(worker.run, "once")["job_id"] == "job-1"


def test_volumes_come_to_the_host_after_the_accelerator_is_released(worker, monkeypatch):
    """The int16 conversion and the copy to the host run outside the lock,
    while the next batch can sample; a NaN volume found there still fails
    its record (with the reason), never committed."""
    from report2ct.pipeline import Drawn

    finish, locked = Drawn.finish, []

    def watched(drawn):
        locked.append(worker.accelerator.locked())
        return finish(drawn)

    monkeypatch.setattr(Drawn, "finish", watched)
    assert outcome(worker, "clean")["status"] == "generated"
    assert locked == [False]

    def poisoned(drawn):
        drawn.decoded = [hu * float("nan") for hu in drawn.decoded]
        return finish(drawn)

    monkeypatch.setattr(Drawn, "finish", poisoned)
    failed = outcome(worker, "nan")
    assert failed["status"] == "failed" and "NaN/Inf" in failed["reason"]
    assert commit.read_commit(worker.run, "nan") is None
