"""The streamed index: parts by size and by time, readable after a driver
dies, never listing a volume twice across reruns, a summary while running."""

import json
import threading

from factory.index import ERRORS, INDEX, RunIndex, part_keys, read_errors, read_index
from factory.records import IndexEntry
from factory.storage import open_storage


def entry(key: str) -> IndexEntry:
    return IndexEntry(
        id=key,
        sample=0,
        key=key,
        uri=f"/out/run/volumes/{key}/a/{key}.ome.zarr",
        labels={},
        seed=1,
        spacing_mm=(1.0, 1.0, 1.5),
        shape=(8, 8, 8),
        findings="f",
        impression=None,
        timings_s={"sample": 2.0, "write": 1.0},
    )


def wait_for(condition, timeout_s=30.0):
    """Wait on the flusher thread's work (an event), not a fixed sleep."""
    done = threading.Event()
    while not done.wait(0.01):
        if condition():
            return
        timeout_s -= 0.01
        assert timeout_s > 0, "condition never became true"


def test_parts_by_size_readable_even_if_the_driver_dies(tmp_path):
    run = open_storage(str(tmp_path))
    sink = RunIndex(run, about={}, max_rows=2, max_seconds=3600)
    for key in "abc":
        sink.committed("generated", entry(key))
    # No close(): the driver "dies" here. The full part is whole and readable,
    # the row still buffered is not listed (its volume stays committed: a
    # rerun lists it from its marker).
    assert [e.key for e in read_index(run)] == ["a", "b"]
    assert len(part_keys(run, INDEX)) == 1


def test_a_row_is_listed_within_max_seconds_with_no_further_results(tmp_path):
    run = open_storage(str(tmp_path))
    with RunIndex(run, about={}, max_rows=1000, max_seconds=0.2, summary_seconds=0.2) as sink:
        sink.requested = 2
        sink.committed("generated", entry("a"))
        sink.error({"status": "failed", "line": 2, "id": "b", "reason": "boom"})
        wait_for(lambda: part_keys(run, INDEX) and part_keys(run, ERRORS))
        wait_for(lambda: run.exists("summary.json"))
        running = json.loads(run.read_bytes("summary.json"))
        assert running["state"] == "running" and running["counts"]["generated"] == 1
        summary = sink.close()
    assert summary["state"] == "finished" and summary["exit_code"] == 3
    assert summary["counts"]["committed"] == 1 and summary["counts"]["failed"] == 1
    assert len(summary["index"]["parts"]) == 1 and len(summary["errors"]["parts"]) == 1
    assert [e["id"] for e in read_errors(run)] == ["b"]


def test_a_rerun_adds_parts_and_never_lists_a_volume_twice(tmp_path):
    run = open_storage(str(tmp_path))
    first = RunIndex(run, about={}, max_rows=1)
    first.committed("generated", entry("a"))
    first.close()
    second = RunIndex(run, about={})
    second.requested = 2
    second.committed("skipped", entry("a"))  # a worker saw it committed
    second.committed("generated", entry("b"))
    summary = second.close()
    assert sorted(e.key for e in read_index(run)) == ["a", "b"]
    assert len(summary["index"]["parts"]) == 2  # the first run's part and this one's
    assert summary["counts"]["skipped_already_committed"] == 1 and summary["exit_code"] == 0
    assert summary["seconds"]["time_split"] == {"sample": 2.0, "write": 1.0}  # generated only
