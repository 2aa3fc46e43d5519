"""A run's index and errors, streamed as results arrive.

    <run>/index/part-00000.jsonl ...   committed volumes (IndexEntry rows)
    <run>/errors/part-00000.jsonl ...  rejected and failed records
    <run>/summary.json                 counts, rate and ETA, refreshed while the
                                       job runs; at the end it names the parts

Rows are buffered and written as a new part every `max_rows` rows or
`max_seconds` seconds, whichever comes first (a background flusher keeps the
second promise while no result arrives), so a committed volume is listed
within that time of its commit, and a driver killed at any moment leaves
every part it wrote whole and readable (a part is one object, written once
with a conditional put, never appended to). The driver keeps only counters
and 8-byte digests, never the rows: its memory does not grow with the job.

A rerun adds parts and never lists a volume twice: the keys already listed
are read back from the existing parts when the job starts, and every row is
checked against them (`RunIndex.committed`).
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

from factory.manifest import IdSet
from factory.records import IndexEntry
from factory.storage import Storage

log = logging.getLogger(__name__)

INDEX, ERRORS, SUMMARY = "index", "errors", "summary.json"
_PART = re.compile(r"part-(\d+)\.jsonl$")


def part_keys(run: Storage, folder: str) -> list[str]:
    """The parts under `folder`, in the order they were written."""
    keys = [key for key in run.list(folder + "/") if _PART.search(key)]
    return sorted(keys, key=lambda key: int(_PART.search(key).group(1)))


def read_rows(run: Storage, folder: str) -> Iterator[dict[str, Any]]:
    for key in part_keys(run, folder):
        for line in run.iter_lines(key):
            if line.strip():
                yield json.loads(line)


def read_index(run: Storage) -> Iterator[IndexEntry]:
    """Every committed volume the run's index lists, once each."""
    for row in read_rows(run, INDEX):
        yield IndexEntry.from_json(row)


def read_errors(run: Storage) -> Iterator[dict[str, Any]]:
    """Every error row the run's jobs wrote (a rerun adds its own parts;
    summary.json names the latest job's)."""
    return read_rows(run, ERRORS)


class PartWriter:
    """Rows buffered into numbered JSONL parts under one folder."""

    def __init__(self, run: Storage, folder: str, *, max_rows: int, max_seconds: float) -> None:
        self.run, self.folder = run, folder
        self.max_rows, self.max_seconds = max_rows, max_seconds
        existing = part_keys(run, folder)
        self._number = int(_PART.search(existing[-1]).group(1)) + 1 if existing else 0
        self._rows: list[str] = []
        self._oldest = 0.0  # when the oldest buffered row arrived
        self._lock = threading.Lock()
        self.written: list[str] = []  # the parts this writer added

    def add(self, row: dict[str, Any]) -> None:
        with self._lock:
            if not self._rows:
                self._oldest = time.monotonic()
            self._rows.append(json.dumps(row) + "\n")
            if len(self._rows) >= self.max_rows:
                self._write()

    def flush(self, *, if_due: bool = False) -> None:
        with self._lock:
            due = time.monotonic() - self._oldest >= self.max_seconds
            if self._rows and (due or not if_due):
                self._write()

    def _write(self) -> None:
        data = "".join(self._rows).encode()
        # Never overwrite a part: another driver of the same run (a resubmitted
        # job whose predecessor still runs) may have taken this number.
        while not self.run.put_if_absent(f"{self.folder}/part-{self._number:05d}.jsonl", data):
            self._number += 1
        self.written.append(f"{self.folder}/part-{self._number:05d}.jsonl")
        self._number += 1
        self._rows.clear()


class RunIndex:
    """The driver's sink for one job: index and error parts, counters and a
    summary kept fresh. Use as a context manager; `close` writes the rest."""

    def __init__(
        self,
        run: Storage,
        *,
        about: dict[str, Any],
        max_rows: int = 1000,
        max_seconds: float = 30.0,
        summary_seconds: float = 30.0,
    ) -> None:
        self.run, self.about = run, about
        self.listed = IdSet()
        batch: list[str] = []
        for row in read_rows(run, INDEX):
            batch.append(row["key"])
            if len(batch) >= 4096:
                self.listed.add_many(batch)
                batch = []
        self.listed.add_many(batch)
        self.index = PartWriter(run, INDEX, max_rows=max_rows, max_seconds=max_seconds)
        self.errors = PartWriter(run, ERRORS, max_rows=max_rows, max_seconds=max_seconds)
        self.counts: Counter = Counter()
        self.time_split: Counter = Counter()
        self.requested = 0  # volumes the manifest asks for, set once validated
        self.seconds: dict[str, float] = {}  # e.g. the validation's, set by the job
        self.started = time.time()
        self._last_summary = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._flusher = threading.Thread(
            target=self._flush_periodically, args=(min(max_seconds, summary_seconds),), daemon=True
        )
        self._flusher.start()

    # -- rows -------------------------------------------------------------
    def committed(self, status: str, entry: IndexEntry) -> None:
        """A committed volume (generated now, or skipped: committed before);
        listed unless an earlier part of this run lists it already."""
        with self._lock:
            self.counts[status] += 1
            if status == "generated":
                self.time_split.update(entry.timings_s)
            fresh = self.listed.add_many([entry.key])[0]
        if fresh:
            self.index.add(entry.to_json())

    def skipped_listed(self, count: int) -> None:
        """Volumes committed and listed by an earlier run of the job."""
        with self._lock:
            self.counts["skipped"] += count

    def error(self, row: dict[str, Any]) -> None:
        """A rejected record or a failed volume (`status` says which)."""
        with self._lock:
            self.counts[row["status"]] += 1
        self.errors.add(row)

    # -- summary -----------------------------------------------------------
    def summary(self, *, final: bool = False) -> dict[str, Any]:
        with self._lock:
            counts = dict(self.counts)
            split = dict(self.time_split)
        elapsed = time.time() - self.started
        committed = counts.get("generated", 0) + counts.get("skipped", 0)
        missing = self.requested - committed
        rate = counts.get("generated", 0) / elapsed if elapsed > 0 else 0.0
        done = committed + counts.get("failed", 0)
        summary = {
            **self.about,
            "state": "finished" if final else "running",
            "counts": {
                "volumes_requested": self.requested,
                "committed": committed,
                "generated": counts.get("generated", 0),
                "skipped_already_committed": counts.get("skipped", 0),
                "failed": counts.get("failed", 0),
                "records_rejected": counts.get("rejected", 0),
            },
            # time_split: seconds per stage summed over every generated volume
            # (workers run in parallel, so the sum exceeds the wall time).
            "seconds": {"total": elapsed, **self.seconds, "time_split": split},
            "volumes_per_hour": rate * 3600,
            "eta_s": None if final or rate == 0 else max(0, self.requested - done) / rate,
            "index": {"folder": self.run.uri(INDEX)},
            "errors": {"folder": self.run.uri(ERRORS), "parts": list(self.errors.written)},
        }
        if final:
            failures = counts.get("failed", 0) + counts.get("rejected", 0)
            summary["exit_code"] = 0 if failures == 0 and missing == 0 else 3
            summary["index"]["parts"] = [self.run.uri(k) for k in part_keys(self.run, INDEX)]
            summary["errors"]["parts"] = [self.run.uri(k) for k in self.errors.written]
        return summary

    def _write_summary(self, *, final: bool = False) -> dict[str, Any]:
        summary = self.summary(final=final)
        self.run.write_bytes(SUMMARY, json.dumps(summary, indent=2).encode())
        self._last_summary = time.time()
        return summary

    def _flush_periodically(self, period_s: float) -> None:
        while not self._stop.wait(min(1.0, period_s)):
            try:
                self.index.flush(if_due=True)
                self.errors.flush(if_due=True)
                if time.time() - self._last_summary >= period_s:
                    self._write_summary()
            except Exception as error:  # storage down: the rows stay buffered, retry later
                log.warning("index flush failed (%s); retrying", error)

    def close(self) -> dict[str, Any]:
        """Write what is buffered and the final summary; return it."""
        self._stop.set()
        self._flusher.join()
        self.index.flush()
        self.errors.flush()
        return self._write_summary(final=True)

    def __enter__(self) -> RunIndex:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is not None:  # the job failed: keep what it did
            self._stop.set()
            self._flusher.join()
            self.index.flush()
            self.errors.flush()
