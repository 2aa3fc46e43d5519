"""A CT-RATE-layout split read volume by volume, for DataLoader workers.

Contract (for the training stages and the Ray Train integration):

    stream = VolumeStream(root, config, seed=0, spacing="varied")   # root: a path or s3://...
    item = stream[i]            # volume i at the stream's epoch (`set_epoch`)
    item = stream[(epoch, i)]   # or at an explicit epoch: what `StreamKeys` yields
    loader = DataLoader(stream, batch_size=B, num_workers=k,
                        sampler=StreamKeys(len(stream), seed, micro_batch=B, ...))

- Construction reads only the split's three CSVs and one listing of its
  volume (and mask) files: the stream holds records (a few hundred bytes a
  volume), never a volume, so it pickles cheaply into worker processes.
- `stream[key]` reads one volume (an `s3://` object is copied to a scratch
  file of the worker, read, and deleted), decides its HU rule
  (`training.data.ctrate.read_volume`), puts it in RAS+, resamples it to the
  sample's spacing and crops or pads it to `config.default_shape`. Nothing is
  cached: a worker holds the volume it is reading and no other.
- Spacing: `spacing="fixed"` resamples to `config.default_spacing_mm` (as
  `load_volumes` does); `"varied"` draws each sample's spacing uniformly
  within `config.spacing_range_mm` (the range the model is asked for at
  generation; a narrower one may be given), the same in-plane spacing for x
  and y when their ranges agree (CT pixels are square), from a generator
  seeded by (seed, epoch, index) alone: the same in any worker, on any rank,
  after any resume. The item's `spacing_mm` is the spacing it was resampled
  to, so the model's spacing input is trained (as MAISI trains it).
- Items: `name`, `volume` (1, X, Y, Z) int16 HU, `spacing_mm` (3,) float32,
  `findings`, `impression` (str; "" when the report lacks the section, which
  the text conditioner encodes as the empty condition), `labels` (18,)
  float32 signed (+1 present, -1 absent), `epoch`, `index`, `hu_rule`,
  `chest`, and `mask` (X, Y, Z) uint8 when `masks=True` and the volume has one.
- Bad input raises `CTRateError` naming the volume and the reason; with
  `errors="skip"` the item is `{"name", "epoch", "index", "skipped": reason}`
  instead (so is a volume that is not chest CT under `non_chest="skip"`):
  read such a stream with `batch_size=None` and drop them (the latent-cache
  builder does), or collate with `drop_skipped`.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from phantom.ctrate_layout import SPLITS, relative_path
from report2ct.codec import HU_WINDOW
from report2ct.config import ModelConfig
from report2ct.grid import crop_or_pad, resample
from report2ct.labels import CTRATE_LABELS
from training.data.ctrate import (
    HU_RULES,
    NON_CHEST,
    CTRateError,
    VolumeRecord,
    _check_header,
    _number,
    load_canonical,
    parse_spacing,
    read_volume,
)

log = logging.getLogger(__name__)

SPACING_MODES = ("fixed", "varied")
ERRORS = ("raise", "skip")


def open_fs(root: str | Path, storage_options: dict[str, Any] | None = None):
    """(fsspec file system, root path in it) for a local path or a URI such
    as s3://bucket/prefix. On S3 the endpoint comes from the standard AWS
    settings (AWS_ENDPOINT_URL) unless `storage_options` say otherwise."""
    import fsspec

    text = str(root)
    options = dict(storage_options or {})
    if text.startswith("s3://") and "endpoint_url" not in options:
        endpoint = os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            options["endpoint_url"] = endpoint
    fs, path = fsspec.core.url_to_fs(text, **options)
    return fs, path.rstrip("/")


@dataclass(frozen=True)
class StreamRecord:
    """What a volume is, from the CSVs: small, so a split of tens of
    thousands of volumes pickles into every worker in megabytes."""

    name: str
    relpath: str  # the volume's path under the split's root
    has_mask: bool
    findings: str
    impression: str
    labels: tuple[float, ...]  # signed, CT-RATE's order: +1 present, -1 absent
    spacing_mm: tuple[float, float, float]  # of the stored array axes (i, j, k)
    slope: float  # the metadata's RescaleSlope
    intercept: float  # the metadata's RescaleIntercept


def _read_csv(fs, path: str) -> dict[str, dict[str, str]]:
    if not fs.isfile(path):
        raise CTRateError(f"{path}: CSV file missing")
    with fs.open(path, "rb") as handle:
        text = io.TextIOWrapper(handle, encoding="utf-8", newline="")
        return {row["VolumeName"]: row for row in csv.DictReader(text)}


def index_stream(
    root: str | Path, split: str = "train", storage_options: dict[str, Any] | None = None
) -> list[StreamRecord | CTRateError]:
    """Every volume of a split as a record, or the error that makes it
    unusable, from the CSVs and one listing: no volume is opened (header
    checks happen when a volume is read)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    fs, base = open_fs(root, storage_options)
    folder, reports_csv, metadata_csv, labels_csv = SPLITS[split]
    reports = _read_csv(fs, f"{base}/radiology_text_reports/{reports_csv}")
    metadata = _read_csv(fs, f"{base}/metadata/{metadata_csv}")
    labels = _read_csv(fs, f"{base}/multi_abnormality_labels/{labels_csv}")
    present = {p.removeprefix(base + "/") for p in fs.find(f"{base}/{folder}")}
    masks = {p.removeprefix(f"{base}/masks/") for p in fs.find(f"{base}/masks/{folder}")}
    out: list[StreamRecord | CTRateError] = []
    for name in sorted(reports):
        try:
            if name not in metadata:
                raise CTRateError(f"{name}: no row in {metadata_csv}")
            if name not in labels:
                raise CTRateError(f"{name}: no row in {labels_csv}")
            try:
                relpath = relative_path(name)
            except (ValueError, KeyError):
                raise CTRateError(
                    f"{name}: VolumeName is not of the form <split>_<patient>_<scan>_<recon>.nii.gz"
                ) from None
            if relpath not in present:
                raise CTRateError(f"{name}: volume file missing: {base}/{relpath}")
            meta, row = metadata[name], labels[name]
            out.append(
                StreamRecord(
                    name=name,
                    relpath=relpath,
                    has_mask=relpath in masks,
                    findings=reports[name].get("Findings_EN") or "",
                    impression=reports[name].get("Impressions_EN") or "",
                    labels=tuple(
                        1.0 if int(_number(name, label, row[label])) else -1.0
                        for label in CTRATE_LABELS
                    ),
                    spacing_mm=parse_spacing(name, meta.get("XYSpacing"), meta.get("ZSpacing")),
                    slope=_number(name, "RescaleSlope", meta.get("RescaleSlope", 1) or 1),
                    intercept=_number(
                        name, "RescaleIntercept", meta.get("RescaleIntercept", 0) or 0
                    ),
                )
            )
        except CTRateError as error:
            out.append(error)
        except KeyError as error:
            out.append(CTRateError(f"{name}: field {error.args[0]} missing from a CSV row"))
    return out


def sample_spacing(
    seed: int, epoch: int, index: int, ranges: Sequence[Sequence[float]]
) -> tuple[float, float, float]:
    """The spacing (x, y, z) mm of sample `index` in `epoch`: uniform within
    each axis's (low, high), y = x when their ranges agree; a function of
    (seed, epoch, index) alone. Values are float32-exact, so the spacing
    input the model sees is the spacing the volume was resampled to."""
    state = np.random.SeedSequence([seed, epoch, index]).generate_state(1, np.uint64)
    rng = np.random.default_rng(int(state[0]))
    (x0, x1), (y0, y1), (z0, z1) = ranges
    x = rng.uniform(x0, x1)
    y = x if (x0, x1) == (y0, y1) else rng.uniform(y0, y1)
    z = rng.uniform(z0, z1)
    return tuple(float(np.float32(v)) for v in (x, y, z))


class VolumeStream(Dataset):
    """A CT-RATE-layout split, one volume per item (module docstring)."""

    takes_epoch_keys = True  # training.engine reads it by (epoch, index) keys

    def __init__(
        self,
        root: str | Path,
        config: ModelConfig,
        *,
        split: str = "train",
        seed: int = 0,
        spacing: str = "varied",
        spacing_range_mm: Sequence[Sequence[float]] | None = None,
        masks: bool = False,
        hu_rule: str = "auto",
        non_chest: str = "flag",
        errors: str = "raise",
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        if spacing not in SPACING_MODES:
            raise ValueError(f"spacing must be one of {SPACING_MODES}, got {spacing!r}")
        if hu_rule not in HU_RULES:
            raise ValueError(f"hu_rule must be one of {HU_RULES}, got {hu_rule!r}")
        if non_chest not in NON_CHEST:
            raise ValueError(f"non_chest must be one of {NON_CHEST}, got {non_chest!r}")
        if errors not in ERRORS:
            raise ValueError(f"errors must be one of {ERRORS}, got {errors!r}")
        ranges = tuple(
            tuple(float(v) for v in r) for r in (spacing_range_mm or config.spacing_range_mm)
        )
        for axis, (low, high), (allowed_low, allowed_high) in zip(
            "xyz", ranges, config.spacing_range_mm, strict=True
        ):
            if not (allowed_low <= low <= high <= allowed_high):
                raise ValueError(
                    f"spacing range {axis}=[{low}, {high}] mm must lie within the model's "
                    f"[{allowed_low}, {allowed_high}] mm (config.spacing_range_mm)"
                )
        self.root = str(root)
        self.split, self.seed, self.spacing, self.spacing_range_mm = split, seed, spacing, ranges
        self.shape = tuple(config.default_shape)
        self.default_spacing_mm = tuple(float(v) for v in config.default_spacing_mm)
        self.masks, self.hu_rule, self.non_chest, self.errors = masks, hu_rule, non_chest, errors
        self.storage_options = dict(storage_options or {})
        self.epoch = 0
        self.records: list[StreamRecord] = []
        self.skipped: list[tuple[str, str]] = []  # (volume, reason), found when indexing
        for entry in index_stream(self.root, split, self.storage_options):
            if isinstance(entry, StreamRecord):
                self.records.append(entry)
            elif errors == "raise":
                raise entry
            else:
                log.warning("skipping: %s", entry)
                self.skipped.append((str(entry).split(":", 1)[0], str(entry)))
        # The file system is opened lazily, in each process: fsspec's do not fork.
        self._fs, self._pid = None, -1

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        """The epoch plain integer keys read at (DataLoader workers started
        after this call see it; persistent ones need (epoch, index) keys)."""
        self.epoch = int(epoch)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fs": None}

    def spacing_of(self, epoch: int, index: int) -> tuple[float, float, float]:
        """The spacing sample (epoch, index) is resampled to."""
        if self.spacing == "fixed":
            return self.default_spacing_mm
        return sample_spacing(self.seed, epoch, index, self.spacing_range_mm)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        epoch, index = (int(key[0]), int(key[1])) if isinstance(key, tuple) else (self.epoch, key)
        record = self.records[index]
        try:
            return self._item(record, epoch, index)
        except CTRateError as error:
            if self.errors == "raise":
                raise
            log.warning("skipping: %s", error)
            return {"name": record.name, "epoch": epoch, "index": index, "skipped": str(error)}

    def _item(self, record: StreamRecord, epoch: int, index: int) -> dict[str, Any]:
        target = self.spacing_of(epoch, index)
        with self._local(record.relpath) as path:
            hu, spacing, decision = self._read(record, path)
        if not decision.chest and self.non_chest == "skip":
            raise CTRateError(
                f"{record.name}: not a chest CT: {decision.lung_fraction:.2%} of the body in "
                "the lung range"
            )
        stored_shape = hu.shape
        volume = resample(torch.from_numpy(hu)[None], spacing, target, mode="trilinear")
        del hu
        volume = crop_or_pad(volume, self.shape, HU_WINDOW[0]).round().to(torch.int16)
        item = {
            "name": record.name,
            "volume": volume,
            "spacing_mm": torch.tensor(target, dtype=torch.float32),
            "findings": record.findings,
            "impression": record.impression,
            "labels": torch.tensor(record.labels, dtype=torch.float32),
            "epoch": epoch,
            "index": index,
            "hu_rule": decision.rule,
            "chest": decision.chest,
        }
        if self.masks and record.has_mask:
            with self._local(f"masks/{record.relpath}") as path:
                _check_header(path, record.name, "mask")
                mask, _ = load_canonical(path, record.name, record.spacing_mm, order_name="mask")
            if mask.shape != stored_shape:
                raise CTRateError(
                    f"{record.name}: mask shape {mask.shape} differs from the volume's "
                    f"{stored_shape}"
                )
            mask_t = torch.from_numpy(mask.astype(np.int64))[None]
            mask_t = resample(mask_t, spacing, target, mode="nearest").long()
            item["mask"] = crop_or_pad(mask_t, self.shape, 0)[0].to(torch.uint8)
        return item

    def _read(self, record: StreamRecord, path: Path):
        """(HU in RAS+, its spacing, the HU decision) of one volume file."""
        image = _check_header(path, record.name, "volume")
        volume = VolumeRecord(
            name=record.name,
            path=path,
            mask_path=None,
            findings=record.findings,
            impression=record.impression,
            labels=(),
            spacing_mm=record.spacing_mm,
            slope=record.slope,
            intercept=record.intercept,
            header_slope=float(image.dataobj.slope),
            header_inter=float(image.dataobj.inter),
        )
        return read_volume(volume, self.hu_rule)

    @contextlib.contextmanager
    def _local(self, relpath: str) -> Iterator[Path]:
        """A local path to the file at `relpath` under the root, for as long
        as the block runs: the file itself when the root is local, else a
        scratch copy, deleted afterwards."""
        if self._fs is None or self._pid != os.getpid():  # a forked worker opens its own
            self._fs, self._base = open_fs(self.root, self.storage_options)
            self._pid = os.getpid()
        remote = f"{self._base}/{relpath}"
        if "file" in _protocols(self._fs):
            yield Path(remote)
            return
        with tempfile.TemporaryDirectory(prefix="ct-stream-") as scratch:
            local = Path(scratch) / Path(relpath).name
            try:
                self._fs.get_file(remote, str(local))
            except FileNotFoundError:
                raise CTRateError(f"{Path(relpath).name}: file missing: {remote}") from None
            yield local


def _protocols(fs) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


def drop_skipped(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The items of a batch that were read (not `skipped`)."""
    return [item for item in items if "skipped" not in item]


class StreamKeys(Sampler):
    """The (epoch, index) keys one rank reads, in the order of the training
    loop's endless shuffled stream (`training.engine.batch_indices`): step s,
    micro-batch m, sample j of this rank is position
    s * per_step + (m * world + rank) * micro_batch + j, and position p is
    index data_order(n, seed, p // n)[p % n] of epoch p // n. From
    `start_step` (a resumed run's step) for `steps` steps (endless if None)."""

    def __init__(
        self,
        n: int,
        seed: int,
        *,
        micro_batch: int,
        grad_accum: int = 1,
        world: int = 1,
        rank: int = 0,
        start_step: int = 0,
        steps: int | None = None,
    ) -> None:
        if n <= 0:
            raise ValueError("the data set is empty: nothing to sample")
        self.n, self.seed, self.micro_batch, self.grad_accum = n, seed, micro_batch, grad_accum
        self.world, self.rank, self.start_step, self.steps = world, rank, start_step, steps

    def __len__(self) -> int:
        if self.steps is None:
            raise TypeError("an endless StreamKeys has no length")
        return self.steps * self.grad_accum * self.micro_batch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        from training.engine import data_order

        per_step = self.micro_batch * self.grad_accum * self.world
        orders: dict[int, np.ndarray] = {}
        step = self.start_step
        while self.steps is None or step < self.start_step + self.steps:
            for micro in range(self.grad_accum):
                first = (micro * self.world + self.rank) * self.micro_batch
                for j in range(self.micro_batch):
                    epoch, offset = divmod(step * per_step + first + j, self.n)
                    if epoch not in orders:
                        orders = {epoch: data_order(self.n, self.seed, epoch)}
                    yield epoch, int(orders[epoch][offset])
            step += 1


def epoch_keys(n: int, seed: int, epoch: int) -> list[tuple[int, int]]:
    """Every index of one epoch once, in the training loop's order."""
    from training.engine import data_order

    return [(epoch, int(i)) for i in data_order(n, seed, epoch)]


class VolumeCrops(Dataset):
    """The VAE stage's data from a stream: item `key` is one random crop
    {"hu": (1, cx, cy, cz) float32} of volume `key` (an index or an
    (epoch, index) pair, as the stream takes), at an offset drawn from
    (seed, epoch, index): resumable, and the same in any worker. The stream
    must raise on bad input (errors="raise"): a crop cannot be skipped."""

    def __init__(self, stream: VolumeStream, crop: Sequence[int], *, seed: int = 0) -> None:
        if stream.errors != "raise":
            raise ValueError("VolumeCrops needs a stream with errors='raise'")
        if any(c > n for c, n in zip(crop, stream.shape, strict=True)):
            raise ValueError(f"crop {tuple(crop)} is larger than the volumes {stream.shape}")
        self.stream, self.crop, self.seed = stream, tuple(int(c) for c in crop), seed

    takes_epoch_keys = True  # training.engine reads it by (epoch, index) keys

    def __len__(self) -> int:
        return len(self.stream)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        epoch, index = (
            (int(key[0]), int(key[1]))
            if isinstance(key, tuple)
            else (
                self.stream.epoch,
                key,
            )
        )
        volume = self.stream[(epoch, index)]["volume"]
        state = np.random.SeedSequence([self.seed, epoch, index, 1]).generate_state(1, np.uint64)
        rng = np.random.default_rng(int(state[0]))
        x, y, z = (
            int(rng.integers(0, n - c + 1))
            for n, c in zip(volume.shape[1:], self.crop, strict=True)
        )
        cx, cy, cz = self.crop
        return {"hu": volume[:, x : x + cx, y : y + cy, z : z + cz].float()}
