"""The CT-RATE reader: real CT-RATE and phantom data sets alike.

    dataset = CTRateDataset("/data/ct-rate", split="train",
                            target_spacing_mm=(4, 4, 5), target_shape=(96, 96, 64))
    item = dataset[0]  # volume (1,X,Y,Z) HU, mask, findings, impression, labels (18,), spacing_mm

Per volume: join the reports, metadata and labels CSVs by VolumeName; read
the NIfTI; apply RescaleSlope/Intercept from the metadata (CT-RATE stores raw
values); reorient to RAS+ from the affine (the one canonical orientation,
docs/conventions.md); take the spacing from the metadata (XYSpacing is a
string like "[0.75, 0.75]", ZSpacing a number), permuted with the axes; clip
padding (-8192, -2048) and HU to the model's window; resample to a target
spacing (trilinear for images, nearest for masks) and crop or pad to a target
shape. Bad input raises `CTRateError` naming the volume and the field, or is
skipped with a logged reason (`policy="skip"`).
"""

from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from torch.utils.data import Dataset

# The layout's file names are defined once, beside the writer of phantom sets.
from phantom.ctrate_layout import SPLITS, relative_path
from report2ct.codec import HU_WINDOW
from report2ct.grid import crop_or_pad, resample
from report2ct.labels import CTRATE_LABELS

log = logging.getLogger(__name__)


class CTRateError(ValueError):
    """Unusable input; the message names the volume and the field."""


@dataclass(frozen=True)
class VolumeRecord:
    name: str
    path: Path
    mask_path: Path | None
    findings: str
    impression: str
    labels: tuple[int, ...]
    spacing_mm: tuple[float, float, float]  # of the stored array axes (i, j, k)
    slope: float
    intercept: float


def _read_csv(path: Path) -> dict[str, dict[str, str]]:
    if not path.is_file():
        raise CTRateError(f"{path}: CSV file missing")
    with path.open(newline="") as handle:
        return {row["VolumeName"]: row for row in csv.DictReader(handle)}


def _number(name: str, field: str, text: str) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise CTRateError(f"{name}: field {field} is not a number: {text!r}") from None
    if not math.isfinite(value):
        raise CTRateError(f"{name}: field {field} is not finite: {text!r}")
    return value


def parse_spacing(name: str, xy: str, z: str) -> tuple[float, float, float]:
    """CT-RATE's XYSpacing ("[0.75, 0.75]") and ZSpacing -> (x, y, z) mm."""
    try:
        values = json.loads(xy) if isinstance(xy, str) else list(xy)
        if not isinstance(values, list) or len(values) != 2:
            raise ValueError
    except (ValueError, TypeError):
        raise CTRateError(
            f'{name}: field XYSpacing is malformed: {xy!r} (expected like "[0.75, 0.75]")'
        ) from None
    spacing = (
        _number(name, "XYSpacing", values[0]),
        _number(name, "XYSpacing", values[1]),
        _number(name, "ZSpacing", z),
    )
    if any(v <= 0 for v in spacing):
        raise CTRateError(f"{name}: spacing must be positive, got {spacing}")
    return spacing


def _check_header(path: Path, name: str, what: str) -> tuple[int, ...]:
    """Read only the NIfTI header (cheap), so bad volumes fail or are skipped
    when the data set is indexed rather than mid-epoch."""
    try:
        shape = nib.load(str(path)).shape
    except Exception as error:  # nibabel raises several types for unreadable files
        raise CTRateError(f"{name}: {what} file unreadable as NIfTI: {path} ({error})") from None
    if len(shape) != 3:
        raise CTRateError(f"{name}: {what} is {len(shape)}-D {tuple(shape)}, expected 3-D")
    return tuple(shape)


def index_split(root: Path, split: str) -> list[VolumeRecord | CTRateError]:
    """Every volume of a split as a record, or the error that makes it unusable."""
    _folder, reports_csv, metadata_csv, labels_csv = SPLITS[split]
    reports = _read_csv(root / "radiology_text_reports" / reports_csv)
    metadata = _read_csv(root / "metadata" / metadata_csv)
    labels = _read_csv(root / "multi_abnormality_labels" / labels_csv)
    out: list[VolumeRecord | CTRateError] = []
    for name in sorted(reports):
        try:
            if name not in metadata:
                raise CTRateError(f"{name}: no row in {metadata_csv}")
            if name not in labels:
                raise CTRateError(f"{name}: no row in {labels_csv}")
            meta = metadata[name]
            try:
                path = root / relative_path(name)
            except (ValueError, KeyError):
                raise CTRateError(
                    f"{name}: VolumeName is not of the form <split>_<patient>_<scan>_<recon>.nii.gz"
                ) from None
            if not path.is_file():
                raise CTRateError(f"{name}: volume file missing: {path}")
            shape = _check_header(path, name, "volume")
            mask = root / "masks" / path.relative_to(root)
            mask_shape = _check_header(mask, name, "mask") if mask.is_file() else shape
            if mask_shape != shape:
                raise CTRateError(
                    f"{name}: mask shape {mask_shape} differs from the volume's {shape}"
                )
            out.append(
                VolumeRecord(
                    name=name,
                    path=path,
                    mask_path=mask if mask.is_file() else None,
                    findings=reports[name].get("Findings_EN") or "",
                    impression=reports[name].get("Impressions_EN") or "",
                    labels=tuple(
                        int(_number(name, label, labels[name][label])) for label in CTRATE_LABELS
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


def load_canonical(path: Path, name: str, spacing_mm, *, order_name: str = "volume"):
    """(array in RAS+ axis order, spacing permuted to match)."""
    image = nib.load(str(path))
    if len(image.shape) != 3:
        raise CTRateError(
            f"{name}: {order_name} is {len(image.shape)}-D {tuple(image.shape)}, expected 3-D"
        )
    data = np.asanyarray(image.dataobj)
    ornt = nib.orientations.io_orientation(image.affine)
    transform = nib.orientations.ornt_transform(
        ornt, nib.orientations.axcodes2ornt(("R", "A", "S"))
    )
    data = nib.orientations.apply_orientation(data, transform)
    spacing = tuple(float(spacing_mm[int(axis)]) for axis in np.argsort(transform[:, 0]))
    return np.ascontiguousarray(data), spacing


def mask_legend(root: str | Path) -> tuple[tuple[int, str], ...]:
    """The data set's label-map legend, (value, name) without background,
    from masks/legend.json (the phantom world writes one; give a real data
    set's segmentation legend in the same form)."""
    path = Path(root) / "masks" / "legend.json"
    try:
        labels = json.loads(path.read_text())["labels"]
        return tuple((int(e["value"]), str(e["name"])) for e in labels if int(e["value"]) != 0)
    except (OSError, KeyError, TypeError, ValueError) as error:
        raise CTRateError(f"{path}: no usable mask legend: {error}") from None


class CTRateDataset(Dataset):
    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        *,
        target_spacing_mm: tuple[float, float, float] | None = None,
        target_shape: tuple[int, int, int] | None = None,
        load_masks: bool = True,
        policy: str = "raise",
    ) -> None:
        if policy not in {"raise", "skip"}:
            raise ValueError("policy must be 'raise' or 'skip'")
        self.root, self.split, self.policy = Path(root), split, policy
        self.target_spacing_mm, self.target_shape, self.load_masks = (
            target_spacing_mm,
            target_shape,
            load_masks,
        )
        self.records: list[VolumeRecord] = []
        for entry in index_split(self.root, split):
            if isinstance(entry, CTRateError):
                if policy == "raise":
                    raise entry
                log.warning("skipping: %s", entry)
            else:
                self.records.append(entry)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        raw, spacing = load_canonical(record.path, record.name, record.spacing_mm)
        hu = raw.astype(np.float32) * record.slope + record.intercept
        # Padding (-8192, -2048) and anything outside the window -> the window.
        volume = torch.from_numpy(np.clip(hu, *HU_WINDOW))[None]  # (1, X, Y, Z)
        volume = resample(volume, spacing, self.target_spacing_mm, mode="trilinear")
        volume = crop_or_pad(volume, self.target_shape, HU_WINDOW[0])
        item = {
            "name": record.name,
            "volume": volume,
            "findings": record.findings,
            "impression": record.impression,
            "labels": torch.tensor(record.labels, dtype=torch.float32),
            "spacing_mm": torch.tensor(self.target_spacing_mm or spacing, dtype=torch.float32),
        }
        if self.load_masks and record.mask_path is not None:
            mask, _ = load_canonical(
                record.mask_path, record.name, record.spacing_mm, order_name="mask"
            )
            mask_t = torch.from_numpy(mask.astype(np.int64))[None]
            mask_t = resample(mask_t, spacing, self.target_spacing_mm, mode="nearest").long()
            item["mask"] = crop_or_pad(mask_t, self.target_shape, 0).long()
        return item
