"""The typed rows of a generate job, and their JSON.

    VolumeTask   one volume a worker is asked for (a record, or one of its
                 `num_samples`), with its manifest line, key and seed
    IndexEntry   what the index says of a committed volume; the commit
                 marker holds the same entry, so a skipped volume reports
                 exactly what its first run did
    Outcome      what a worker reports back for one task: generated,
                 skipped (already committed) or failed (with the reason)

The index parts, `factory.reader` and the evaluation read IndexEntry back
with `from_json`; nothing else knows the keys of an index row.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from factory.commit import volume_key
from factory.manifest import ManifestRecord

Status = Literal["generated", "skipped", "failed"]


@dataclass(frozen=True)
class VolumeTask:
    line: int
    record: ManifestRecord
    sample: int = 0

    @classmethod
    def for_record(cls, line: int, record: ManifestRecord) -> list[VolumeTask]:
        return [cls(line, record, sample) for sample in range(record.num_samples)]

    @property
    def key(self) -> str:
        return volume_key(self.record.id, self.sample, self.record.num_samples)

    @property
    def seed(self) -> int:
        return self.record.sample_seed(self.sample)

    def failed(self, reason: str) -> Outcome:
        return Outcome("failed", self.line, self.record.id, self.sample, self.key, reason=reason)


@dataclass(frozen=True)
class IndexEntry:
    id: str
    sample: int
    key: str
    uri: str  # the OME-Zarr image group
    labels: dict[str, int]  # all 18 CT-RATE names -> 0/1
    seed: int
    spacing_mm: tuple[float, float, float]
    shape: tuple[int, int, int]
    findings: str | None
    impression: str | None
    timings_s: dict[str, float] = field(default_factory=dict)
    mask: str | None = None  # the label map, the array <uri>/mask
    nifti_uri: str | None = None
    preview_uri: str | None = None
    # --verify only (factory.verify): {scores: all 18, passed: bool or None
    # (None: the record specifies no label the verifier judges), tries,
    # verifier_sha256, seed (of the delivered draw), disagree}
    verification: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        """The index row: optional outputs appear only when written."""
        row = dataclasses.asdict(self)
        row["spacing_mm"], row["shape"] = list(self.spacing_mm), list(self.shape)
        return {k: v for k, v in row.items() if v is not None or k in ("findings", "impression")}

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> IndexEntry:
        """An index row (or a commit marker's `index`); keys this version
        does not know are ignored, so older readers read newer indexes."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in row.items() if k in names}
        values["spacing_mm"] = tuple(float(v) for v in row["spacing_mm"])
        values["shape"] = tuple(int(v) for v in row["shape"])
        return cls(**values)


@dataclass(frozen=True)
class Outcome:
    status: Status
    line: int | None
    id: str
    sample: int
    key: str
    entry: IndexEntry | None = None  # generated or skipped
    reason: str | None = None  # failed

    @classmethod
    def committed(cls, status: Status, line: int | None, entry: IndexEntry) -> Outcome:
        return cls(status, line, entry.id, entry.sample, entry.key, entry=entry)

    def to_json(self) -> dict[str, Any]:
        row = {k: getattr(self, k) for k in ("status", "line", "id", "sample", "key")}
        if self.entry is not None:
            row["entry"] = self.entry.to_json()
        if self.reason is not None:
            row["reason"] = self.reason
        return row

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> Outcome:
        entry = IndexEntry.from_json(row["entry"]) if "entry" in row else None
        fields = {k: row[k] for k in ("status", "line", "id", "sample", "key")}
        return cls(**fields, entry=entry, reason=row.get("reason"))

    def error_row(self) -> dict[str, Any]:
        """The errors row of a failed volume."""
        return {k: getattr(self, k) for k in ("status", "line", "id", "sample", "key", "reason")}
