"""Manifests: JSONL, one record per volume, validated with pydantic.

    {"id": "pt-0001", "findings": "...", "impression": "...",
     "spacing_mm": [1.0, 1.0, 1.5], "labels": {"Pleural effusion": 1},
     "seed": 7, "guidance_scale": 5.0, "num_samples": 1}
    {"id": "by-labels", "labels": {"Cardiomegaly": 1, "Emphysema": 0}}
    {"id": "masked", "labels": {"Pleural effusion": 1}, "mask_source": "phantom"}
    {"id": "own-mask", "findings": "...", "mask": "s3://bucket/masks/p1.nii.gz",
     "mask_legend": "s3://bucket/masks/legend-map.json"}

A record asks by text (findings and/or impression), by labels, or both; a
record with neither is rejected. A label map comes from a URI (`mask`: NIfTI
or OME-Zarr, in the model's legend or one `mask_legend` maps onto it) or is
drawn by the phantom world (`mask_source: "phantom"`, with the record's
labels as the requested findings); the worker reads, checks and resamples it
to the output grid (factory.masks).

Read as a stream (`read_manifest`): every line comes back as a valid record or
a rejection with its line number, id (when readable) and reason, so a bad row
never stops the good ones and a manifest of millions of records never sits in
memory. Duplicate ids are caught by `IdSet`, 8 bytes per record (8 MB at 1M
records; a record's own text is never kept).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

from report2ct.config import ModelConfig
from report2ct.labels import CTRATE_LABELS
from report2ct.rng import volume_seed

UTF8_BOM = b"\xef\xbb\xbf"
MAX_LINE_BYTES = 1 << 20  # 1 MiB: CT-RATE reports are a few KB; anything near this is not a report
MAX_TEXT_CHARS = 64_000
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$"
# Control characters other than tab, newline and carriage return.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")

Text = Annotated[str, Field(max_length=MAX_TEXT_CHARS)]
MASK_SUFFIXES = (".nii", ".nii.gz", ".zarr", ".ome.zarr")
MASK_SOURCES = ("phantom",)


class ManifestRecord(BaseModel):
    """One requested volume (or `num_samples` volumes of one report)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)

    id: str = Field(
        pattern=ID_PATTERN, description="letters, digits, '-', '_', '.'; no path separators"
    )
    findings: Text | None = None
    impression: Text | None = None
    spacing_mm: tuple[float, float, float] | None = None
    shape: tuple[int, int, int] | None = None
    labels: dict[str, StrictInt] = Field(default_factory=dict)
    seed: int | None = Field(None, ge=0, lt=2**63)
    guidance_scale: float | None = Field(None, ge=0.0, le=50.0)
    num_samples: int = Field(1, ge=1, le=64)
    mask: str | None = Field(None, max_length=2048, description="label map URI (NIfTI, OME-Zarr)")
    mask_legend: str | None = Field(
        None, max_length=2048, description="JSON URI: the mask's values -> model class names"
    )
    mask_source: Literal["phantom"] | None = None

    @model_validator(mode="after")
    def _something_to_generate_from(self) -> ManifestRecord:
        if self.findings is None and self.impression is None and not self.labels:
            raise ValueError("record has neither text (findings, impression) nor labels")
        if self.mask is not None and self.mask_source is not None:
            raise ValueError("give either mask (a URI) or mask_source, not both")
        if self.mask_legend is not None and self.mask is None:
            raise ValueError("mask_legend maps the values of a mask: give mask too")
        return self

    @field_validator("mask", "mask_legend")
    @classmethod
    def _uri(cls, value: str | None, info) -> str | None:
        if value is None:
            return value
        if _CONTROL.search(value) or not value.strip():
            raise ValueError("must be a URI (s3://, file:// or an absolute path)")
        if not (value.startswith(("s3://", "file://", "/"))):
            raise ValueError(f"{value!r} is not s3://, file:// or an absolute path")
        suffixes = MASK_SUFFIXES if info.field_name == "mask" else (".json",)
        zarr_group = info.field_name == "mask" and ".zarr/" in value.lower()
        if not (zarr_group or value.rstrip("/").lower().endswith(suffixes)):
            raise ValueError(f"{value!r} must end in one of {', '.join(suffixes)}")
        return value

    @property
    def has_mask(self) -> bool:
        return self.mask is not None or self.mask_source is not None

    @field_validator("id")
    @classmethod
    def _no_traversal(cls, value: str) -> str:
        if value in {".", ".."} or ".." in value:
            raise ValueError("id must not contain '..'")
        return value

    @field_validator("findings", "impression")
    @classmethod
    def _real_text(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if not value.strip():
            raise ValueError("must not be empty")
        if _CONTROL.search(value):
            raise ValueError("contains control characters")
        return value

    @field_validator("spacing_mm")
    @classmethod
    def _finite_positive(cls, value):
        if value is not None and not all(math.isfinite(v) and v > 0 for v in value):
            raise ValueError(f"must be three finite positive numbers, got {list(value)}")
        return value

    @field_validator("labels")
    @classmethod
    def _known_labels(cls, value: dict[str, int]) -> dict[str, int]:
        unknown = sorted(set(value) - set(CTRATE_LABELS))
        if unknown:
            raise ValueError(f"unknown label names {unknown}; expected CT-RATE's 18 names")
        bad = {name: v for name, v in value.items() if v not in (0, 1)}
        if bad:
            raise ValueError(f"label values must be 0 or 1, got {bad}")
        return value

    def label_vector(self) -> list[int]:
        return [int(self.labels.get(name, 0)) for name in CTRATE_LABELS]

    def sample_seed(self, sample: int = 0) -> int:
        """The seed of one of the record's samples (`report2ct.rng.volume_seed`):
        a rerun, a retry or another worker count regenerates the same volume."""
        return volume_seed(self.id, self.seed, sample)


@dataclass(frozen=True)
class Rejection:
    line: int
    id: str | None
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"line": self.line, "id": self.id, "reason": self.reason}


def _reason(error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or "record"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown field"
        parts.append(f"{where}: {message}")
    return "; ".join(parts)


def parse_line(raw: bytes, line: int, *, config: ModelConfig | None) -> ManifestRecord | Rejection:
    """One manifest line -> a valid record or a rejection (never raises)."""
    if len(raw) > MAX_LINE_BYTES:
        found = re.search(rb'"id"\s*:\s*"([A-Za-z0-9._-]{1,200})"', raw[:4096])
        return Rejection(
            line,
            found.group(1).decode() if found else None,
            f"record is {len(raw)} bytes; the limit is {MAX_LINE_BYTES}",
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        return Rejection(line, None, f"invalid UTF-8 at byte {error.start}")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        return Rejection(line, None, f"malformed JSON: {error.msg} at column {error.colno}")
    return parse_record(data, line, config=config)


def parse_record(data: Any, line: int, *, config: ModelConfig | None) -> ManifestRecord | Rejection:
    """One decoded record (a JSON object, a CSV or Parquet row) -> a valid
    record or a rejection (never raises)."""
    if not isinstance(data, dict):
        return Rejection(line, None, f"a record is a JSON object, got {type(data).__name__}")
    record_id = data.get("id") if isinstance(data.get("id"), str) else None
    try:
        record = ManifestRecord.model_validate(data)
    except ValidationError as error:
        return Rejection(line, record_id, _reason(error))
    if config is not None:
        try:
            config.check_output(
                record.shape or config.default_shape, record.spacing_mm or config.default_spacing_mm
            )
            check_conditions(record, config)
        except ValueError as error:
            return Rejection(line, record.id, str(error))
    return record


def check_conditions(record: ManifestRecord, config: ModelConfig) -> None:
    """Raise ValueError when the record asks for a condition the model lacks."""
    if record.findings is None and record.impression is None and not config.label_condition:
        raise ValueError(f"model {config.name!r} has no label condition: give findings/impression")
    if record.has_mask and config.control is None:
        raise ValueError(f"model {config.name!r} has no mask condition (ControlNet): drop the mask")
    if record.mask_source == "phantom":
        from phantom.legend import NOT_RENDERED

        unrenderable = sorted(n for n in NOT_RENDERED if record.labels.get(n))
        if unrenderable:
            raise ValueError(
                f"mask_source 'phantom' cannot draw {unrenderable}; give a mask URI instead"
            )


class IdSet:
    """The 64-bit digests of the ids seen so far, 8 bytes each (8 MB at 1M
    records; a CPython set of them costs ~65 MB), in sorted numpy chunks of at
    most `chunk` keys. Ids are checked a batch at a time, one vectorised
    search per chunk, so no step ever copies the whole set."""

    def __init__(self, chunk: int = 1 << 17) -> None:
        self._chunks: list[np.ndarray] = []
        self._chunk = chunk

    @staticmethod
    def digest(value: str) -> int:
        return int.from_bytes(hashlib.blake2b(value.encode(), digest_size=8).digest(), "little")

    def _digests(self, values: list[str]) -> np.ndarray:
        return np.fromiter((self.digest(v) for v in values), dtype=np.uint64, count=len(values))

    def _seen(self, keys: np.ndarray) -> np.ndarray:
        seen = np.zeros(len(keys), dtype=bool)
        for chunk in self._chunks:
            at = np.searchsorted(chunk, keys).clip(max=len(chunk) - 1)
            seen |= chunk[at] == keys
        return seen

    def contains(self, values: list[str]) -> list[bool]:
        """For each value, whether it was added before."""
        return self._seen(self._digests(values)).tolist()

    def add_many(self, values: list[str]) -> list[bool]:
        """Add every value; for each, False if it was seen before (in an
        earlier batch or earlier in this one)."""
        keys = self._digests(values)
        fresh = np.zeros(len(keys), dtype=bool)
        fresh[np.unique(keys, return_index=True)[1]] = True  # first occurrences in the batch
        fresh &= ~self._seen(keys)
        new = np.sort(keys[fresh])
        while len(new):
            if self._chunks and len(self._chunks[-1]) < self._chunk:
                room = self._chunk - len(self._chunks[-1])
                self._chunks[-1] = np.sort(np.concatenate((self._chunks[-1], new[:room])))
                new = new[room:]
            else:
                self._chunks.append(new[: self._chunk])
                new = new[self._chunk :]
        return fresh.tolist()

    def __len__(self) -> int:
        return sum(len(c) for c in self._chunks)


def read_manifest(
    lines: Iterable[bytes | dict | Rejection],
    *,
    config: ModelConfig | None = None,
    batch: int = 4096,
) -> Iterator[tuple[int, ManifestRecord | Rejection]]:
    """(line number, record or rejection) for every non-blank line (JSON
    bytes) or row (a dict, from `factory.sources`), in order."""
    seen = IdSet()
    pending: list[tuple[int, ManifestRecord | Rejection]] = []
    for number, raw in enumerate(lines, start=1):
        if isinstance(raw, dict):  # a row of a tabular manifest (factory.sources)
            pending.append((number, parse_record(raw, number, config=config)))
        elif isinstance(raw, Rejection):  # refused by its source (factory.sources)
            pending.append((number, Rejection(number, raw.id, raw.reason)))
        elif raw.strip():
            if number == 1:
                raw = raw.removeprefix(UTF8_BOM)  # editors on Windows write one
            pending.append((number, parse_line(raw, number, config=config)))
        if len(pending) >= batch:
            yield from _without_duplicates(pending, seen)
            pending = []
    yield from _without_duplicates(pending, seen)


def _without_duplicates(pending, seen: IdSet):
    valid = [i for i, (_, result) in enumerate(pending) if isinstance(result, ManifestRecord)]
    fresh = seen.add_many([pending[i][1].id for i in valid])
    for i, ok in zip(valid, fresh, strict=True):
        if not ok:
            number, record = pending[i]
            pending[i] = (
                number,
                Rejection(number, record.id, "duplicate id (an earlier line has it)"),
            )
    return pending
