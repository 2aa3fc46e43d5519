"""Sharded sample caches (local directory or s3:// prefix), read sample by
sample.

Contract (for the diffusion stages and the Ray Train integration):

    with ShardWriter("s3://bucket/cache", shard_size=16) as writer:
        writer.add({"latent": ..., "context": ..., "spacing_mm": ...}, name="train_1_a_1.nii.gz")
        writer.skip("train_2_a_1.nii.gz", "not a chest CT")
        writer.note(latent_scale=...)
    shards = LatentShards("s3://bucket/cache")        # a map-style Dataset
    shards[i]  # {"latent" (scaled), "context", "spacing_mm", ["labels"], ["control"]}

Layout: `<dest>/shard-00000.safetensors`, `shard-00001...`: each sample's
tensors stacked along a first axis, one tensor per column, with the sample
names in the file's metadata; then `<dest>/index.json`, written last (a cache
without it is incomplete and refused): the format, the sample count, every
shard's file, count, names and tensor table (dtype, shape, byte offsets:
the safetensors header), the skipped samples with their reasons, and what
`note` was given (e.g. `latent_scale`, the latent statistics). Every shard
is a plain safetensors file: `safetensors.torch.load_file` reads it whole.

Reading: `shards[i]` fetches sample i's rows only - one ranged read per
column, concurrent on S3 (`fs.cat_ranges`), or mmap-backed reads of a local
file - so a worker holds one sample, never a shard, and any sampler order is
cheap. The data set pickles into DataLoader workers without its file system
(each process opens its own).
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from safetensors.torch import save
from torch.utils.data import Dataset

from training.data.stream import open_fs

FORMAT = "ct-factory-shards/1"
INDEX = "index.json"
log = logging.getLogger(__name__)
# safetensors dtype names -> torch dtypes (the ones the caches store)
DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class ShardError(ValueError):
    """A cache that cannot be read; the message names the file and the field."""


def shard_name(number: int) -> str:
    return f"shard-{number:05d}.safetensors"


def _header(data: bytes) -> tuple[int, dict[str, Any], dict[str, str]]:
    """(offset of the data section, the tensor table, the metadata) of a
    safetensors file's first bytes."""
    (length,) = struct.unpack("<Q", data[:8])
    table = json.loads(data[8 : 8 + length])
    metadata = table.pop("__metadata__", None) or {}
    return 8 + length, table, metadata


class ShardWriter:
    """Samples in, shards out (module docstring). Every sample must have the
    same columns with the same shapes and dtypes. A shard holds `shard_size`
    positions of the input, samples and skips alike, so shard k always
    covers positions [k * shard_size, (k + 1) * shard_size). `stats_column`
    gets a count, sum and sum of squares (float64) per shard and in the
    index, so a latent scale over the whole cache needs no second pass.

    `resume=True` adopts the shards an interrupted writer left at `dest`
    (each is written whole, or not at all): `position` says how many input
    positions they cover, so the caller starts there. Shards written for
    other input (another `fingerprint` or `shard_size`) are refused.

    A shard is held in memory until it is written: at the paper's size a
    sample is 15 MB of float32 latent (plus its mask occupancy with a
    ControlNet), so the default 16 samples keep it near a quarter GB."""

    def __init__(
        self,
        dest: str,
        *,
        shard_size: int = 16,
        storage_options: dict[str, Any] | None = None,
        stats_column: str | None = "latent",
        resume: bool = False,
        fingerprint: str = "",
    ) -> None:
        if shard_size < 1:
            raise ValueError("shard_size must be at least 1")
        self.fs, self.base = open_fs(dest, storage_options)
        self.dest, self.shard_size, self.stats_column = dest, shard_size, stats_column
        self.fingerprint = fingerprint
        if self.fs.exists(f"{self.base}/{INDEX}"):
            raise ShardError(f"{dest}/{INDEX}: a finished cache is there already; use another")
        self.fs.makedirs(self.base, exist_ok=True)
        self._rows: dict[str, list[torch.Tensor]] = {}
        self._names: list[str] = []
        self._skips: list[dict[str, str]] = []
        self._stats = self._zero_stats()
        self._columns: dict[str, tuple[str, tuple[int, ...]]] | None = None
        self.shards: list[dict[str, Any]] = []
        self.skipped: list[dict[str, str]] = []
        self.notes: dict[str, Any] = {}
        self.stats = self._zero_stats()
        self.count = 0
        self.position = 0  # input positions covered by written shards
        self.index: dict[str, Any] | None = None  # once closed
        if resume:
            self._adopt()
        elif self.fs.exists(f"{self.base}/{shard_name(0)}"):
            raise ShardError(
                f"{dest}: shards of an unfinished cache are there; resume it or use another"
            )

    @staticmethod
    def _zero_stats() -> dict[str, float]:
        return {"count": 0, "sum": 0.0, "sum_sq": 0.0}

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None and self.index is None:
            self.close()

    def _adopt(self) -> None:
        """Take over the leading whole shards an interrupted writer left."""
        while self.fs.exists(path := f"{self.base}/{shard_name(len(self.shards))}"):
            head = self.fs.cat_file(path, start=0, end=8)
            (length,) = struct.unpack("<Q", head)
            start, table, meta = _header(head + self.fs.cat_file(path, start=8, end=8 + length))
            file = shard_name(len(self.shards))
            if (
                meta.get("fingerprint") != self.fingerprint
                or int(meta.get("shard_size", -1)) != self.shard_size
            ):
                raise ShardError(
                    f"{self.dest}/{file}: written for other input (fingerprint "
                    f"{meta.get('fingerprint')!r}, shard_size {meta.get('shard_size')}; this "
                    f"writer's {self.fingerprint!r}, {self.shard_size}): use another destination"
                )
            names, skips = json.loads(meta["names"]), json.loads(meta["skipped"])
            if names:
                columns = {
                    key: (str(DTYPES[entry["dtype"]]), tuple(entry["shape"][1:]))
                    for key, entry in sorted(table.items())
                }
                if self._columns is not None and columns != self._columns:
                    raise ShardError(f"{self.dest}/{file}: columns differ from earlier shards")
                self._columns = columns
            stats = json.loads(meta["stats"])
            for key in self.stats:
                self.stats[key] += stats[key]
            self._record(file, names, skips, start, table, int(meta["positions"]))
        if self.shards:
            log.info("%s: resuming after %d shards", self.dest, len(self.shards))

    def _record(self, file, names, skips, start, table, positions) -> None:
        self.shards.append(
            {"file": file, "count": len(names), "names": names, "data_start": start}
            | {"tensors": table}
        )
        self.skipped += skips
        self.count += len(names)
        self.position += positions

    def add(self, sample: Mapping[str, torch.Tensor], *, name: str) -> None:
        columns = {
            key: (str(value.dtype), tuple(value.shape)) for key, value in sorted(sample.items())
        }
        if self._columns is None:
            self._columns = columns
        elif columns != self._columns:
            raise ShardError(
                f"{name}: columns {columns} differ from the cache's {self._columns}: every "
                "sample of a cache has the same columns, shapes and dtypes"
            )
        for key, value in sample.items():
            self._rows.setdefault(key, []).append(value.detach().cpu().contiguous())
        if self.stats_column is not None and self.stats_column in sample:
            values = sample[self.stats_column].detach().double()
            moments = {
                "count": values.numel(),
                "sum": float(values.sum()),
                "sum_sq": float((values * values).sum()),
            }
            for totals in (self._stats, self.stats):  # this shard's, the cache's so far
                for key, value in moments.items():
                    totals[key] += value
        self._names.append(name)
        self._advance()

    def skip(self, name: str, reason: str) -> None:
        """Input position with no sample (a bad volume), listed in the index."""
        self._skips.append({"name": name, "reason": reason})
        self._advance()

    def _advance(self) -> None:
        if len(self._names) + len(self._skips) == self.shard_size:
            self._flush()

    def note(self, **facts: Any) -> None:
        """JSON-able facts kept in the index (the encoder, the data, ...)."""
        self.notes.update(facts)

    def _flush(self) -> None:
        positions = len(self._names) + len(self._skips)
        if not positions:
            return
        file = shard_name(len(self.shards))
        tensors = {key: torch.stack(rows) for key, rows in self._rows.items()}
        metadata = {
            "names": json.dumps(self._names),
            "skipped": json.dumps(self._skips),
            "stats": json.dumps(self._stats),
            "positions": str(positions),
            "shard_size": str(self.shard_size),
            "fingerprint": self.fingerprint,
        }
        data = save(tensors, metadata=metadata)
        start, table, _ = _header(data)
        self._put(file, data)
        self._record(file, self._names, self._skips, start, table, positions)
        self._rows, self._names, self._skips, self._stats = {}, [], [], self._zero_stats()

    def _put(self, file: str, data: bytes) -> None:
        path = f"{self.base}/{file}"
        if "file" in _protocols(self.fs):
            # A kill mid-write leaves a .partial file, never a short shard.
            self.fs.pipe_file(path + ".partial", data)
            self.fs.mv(path + ".partial", path)
        else:
            self.fs.pipe_file(path, data)  # an S3 put is all or nothing

    def close(self) -> dict[str, Any]:
        """Write the last shard, then the index (last: it marks the cache
        finished). Returns the index."""
        if self.index is not None:
            raise ShardError(f"{self.dest}: the cache is closed already")
        self._flush()
        if self.count == 0:
            raise ShardError(f"{self.dest}: no samples were added (skipped: {self.skipped[:3]})")
        index = {
            "format": FORMAT,
            "count": self.count,
            "positions": self.position,
            "fingerprint": self.fingerprint,
            "columns": {k: {"dtype": d, "shape": list(s)} for k, (d, s) in self._columns.items()},
            "shards": [shard for shard in self.shards if shard["count"]],
            "skipped": self.skipped,
            "stats": {self.stats_column: self.stats} if self.stats_column else {},
            **self.notes,
        }
        text = json.dumps(index, indent=1)
        self.fs.pipe_file(f"{self.base}/{INDEX}", text.encode())
        self.index = json.loads(text)  # as a reader will see it
        return self.index


def _protocols(fs) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


def read_index(source: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """A finished cache's index (refused when it is missing or not one)."""
    fs, base = open_fs(source, storage_options)
    path = f"{base}/{INDEX}"
    try:
        index = json.loads(fs.cat_file(path))
    except FileNotFoundError:
        raise ShardError(
            f"{source}: no {INDEX}: not a shard cache, or one whose writing did not finish"
        ) from None
    if index.get("format") != FORMAT:
        raise ShardError(f"{source}/{INDEX}: format {index.get('format')!r}, expected {FORMAT}")
    return index


def std_from_stats(stats: Mapping[str, float]) -> float:
    """The (unbiased) standard deviation from a count, sum and sum of squares."""
    n = stats["count"]
    if n < 2:
        raise ShardError("too few values for a standard deviation")
    mean = stats["sum"] / n
    return math.sqrt(max(stats["sum_sq"] - n * mean * mean, 0.0) / (n - 1))


class ShardSet(Dataset):
    """The samples of a shard cache, one ranged read per column (module
    docstring). `columns` selects some (default: all)."""

    def __init__(
        self,
        source: str,
        *,
        columns: Sequence[str] | None = None,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        self.source, self.storage_options = source, dict(storage_options or {})
        self.index = read_index(source, self.storage_options)
        available = tuple(self.index["columns"])
        chosen = tuple(columns) if columns is not None else available
        missing = [c for c in chosen if c not in available]
        if missing:
            raise ShardError(
                f"{source}/{INDEX}: the cache has no column {missing[0]!r} "
                f"(it has {', '.join(available)})"
            )
        self.columns = chosen
        self._ends = np.cumsum([s["count"] for s in self.index["shards"]])
        if not len(self._ends) or int(self._ends[-1]) != self.index["count"]:
            raise ShardError(f"{source}/{INDEX}: shard counts do not add up to its count")
        self._fs, self._pid = None, -1

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fs": None}

    def __len__(self) -> int:
        return int(self.index["count"])

    def locate(self, index: int) -> tuple[dict[str, Any], int]:
        """(the shard holding sample `index`, its row there)."""
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} of a cache of {len(self)}")
        number = int(np.searchsorted(self._ends, index, side="right"))
        row = index - (int(self._ends[number - 1]) if number else 0)
        return self.index["shards"][number], row

    def name(self, index: int) -> str:
        shard, row = self.locate(index)
        return shard["names"][row]

    def row(self, index: int) -> dict[str, torch.Tensor]:
        """Sample `index`'s tensors as stored."""
        if self._fs is None or self._pid != os.getpid():  # a forked worker opens its own
            self._fs, self._base = open_fs(self.source, self.storage_options)
            self._pid = os.getpid()
        shard, row = self.locate(index)
        path = f"{self._base}/{shard['file']}"
        paths, starts, ends, shapes = [], [], [], []
        for column in self.columns:
            entry = shard["tensors"][column]
            begin, end = entry["data_offsets"]
            size = (end - begin) // shard["count"]
            start = shard["data_start"] + begin + row * size
            paths.append(path)
            starts.append(start)
            ends.append(start + size)
            shapes.append((DTYPES[entry["dtype"]], entry["shape"][1:]))
        blobs = self._fs.cat_ranges(paths, starts, ends, on_error="return")
        out = {}
        for column, blob, (dtype, shape), start, end in zip(
            self.columns, blobs, shapes, starts, ends, strict=True
        ):
            if isinstance(blob, FileNotFoundError):
                raise ShardError(f"{self.source}/{shard['file']}: shard missing")
            if isinstance(blob, Exception) or len(blob) != end - start:
                raise ShardError(
                    f"{self.source}/{shard['file']}: column {column!r} of sample "
                    f"{shard['names'][row]} is cut short or unreadable"
                )
            out[column] = torch.frombuffer(bytearray(blob), dtype=dtype).reshape(shape)
        return out

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.row(index)


class LatentShards(ShardSet):
    """A latent cache for the diffusion stages: `LatentSet`'s items
    (latent scaled to unit variance by the cache's `latent_scale`, context,
    spacing_mm, and labels / control when the config trains them), streamed
    from shards."""

    def __init__(
        self,
        source: str,
        *,
        columns: Sequence[str] = ("latent", "context", "spacing_mm"),
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(source, columns=columns, storage_options=storage_options)
        if "latent_scale" not in self.index:
            raise ShardError(f"{source}/{INDEX}: no latent_scale: not a latent cache")
        self.latent_scale = float(self.index["latent_scale"])

    @classmethod
    def for_model(
        cls, source: str, config, *, storage_options: dict[str, Any] | None = None
    ) -> LatentShards:
        """The columns `config` trains on, checked against the cache: labels
        with the label condition, control with a ControlNet."""
        columns = ["latent", "context", "spacing_mm"]
        if config.label_condition:
            columns.append("labels")
        if config.control is not None:
            columns.append("control")
        if config.control is not None:
            available = read_index(source, storage_options)["columns"]
            if "control" not in available:
                raise ShardError(
                    f"{source}/{INDEX}: the cache has no mask occupancy (control) to train a "
                    "ControlNet on: build it from a stream with masks=True and a config with "
                    "its control legend"
                )
        shards = cls(source, columns=columns, storage_options=storage_options)
        context = shards.index["columns"]["context"]["shape"]
        if context[-1] != config.context_dim:
            raise ShardError(
                f"{source}/{INDEX}: context is {context[-1]}-d, the model's encoders give "
                f"{config.context_dim}"
            )
        latent = shards.index["columns"]["latent"]["shape"]
        if latent[0] != config.vae.latent_channels:
            raise ShardError(
                f"{source}/{INDEX}: latents have {latent[0]} channels, the model's VAE "
                f"{config.vae.latent_channels}"
            )
        return shards

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = self.row(index)
        item["latent"] = item["latent"].float() * self.latent_scale
        return item
