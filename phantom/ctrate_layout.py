"""Write phantoms as a data set in CT-RATE's own layout, so one reader serves
real CT-RATE and the phantom world alike.

    <root>/train_fixed/train_{pid}/train_{pid}_a/train_{pid}_a_1.nii.gz
    <root>/valid_fixed/valid_{pid}/valid_{pid}_a/valid_{pid}_a_1.nii.gz
    <root>/radiology_text_reports/{train,validation}_reports.csv
    <root>/metadata/{train,validation}_metadata.csv
    <root>/multi_abnormality_labels/{train,valid}_predicted_labels.csv
    <root>/masks/<same relative path as the volume>   label maps (uint8)
    <root>/masks/legend.json                          values -> names, tissues, colours

By default volumes are stored raw (HU + 1024) with RescaleSlope 1 and
RescaleIntercept -1024 in the metadata, and a RAS affine built from the
spacing. Real CT-RATE is not that uniform, so `Quirks` writes the storage
conventions a reader meets in the released data (each is a per-volume option,
drawn per volume when given as a tuple):

    storage      "raw+metadata"  raw values, the rescale only in the metadata (the default)
                 "hu+metadata"   values already in HU, the metadata still saying
                                 intercept -1024 (the *_fixed release)
                 "raw+header"    raw values with the NIfTI header's own scl_slope 1 /
                                 scl_inter -1024 (nibabel applies it) and the same
                                 rescale in the metadata
    orientation  "RAS" | "LPS"   LPS: x and y stored flipped, with the affine saying so
    padding_hu   -8192 | -3024 | -2048 | ...  outside the scan circle
    in_plane_mm  (lo, hi)        an in-plane spacing drawn per volume (CT-RATE: 0.3-1 mm),
                                 over the spec's field of view

Phantom i's seed is derived from (seed, i), and its quirks from (seed, i, 1),
so the data set is the same whatever the number of workers, and the default
output does not depend on the quirk options existing.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from phantom.legend import legend_json
from phantom.world import DEFAULT_PREVALENCE, DEFAULT_SHAPE, DEFAULT_SPACING_MM, make_phantom
from report2ct.labels import CTRATE_LABELS

RESCALE_INTERCEPT = -1024.0
STORAGES = ("raw+metadata", "hu+metadata", "raw+header")
ORIENTATIONS = ("RAS", "LPS")
SPLITS = {
    "train": (
        "train_fixed",
        "train_reports.csv",
        "train_metadata.csv",
        "train_predicted_labels.csv",
    ),
    "valid": (
        "valid_fixed",
        "validation_reports.csv",
        "validation_metadata.csv",
        "valid_predicted_labels.csv",
    ),
}
REPORT_COLUMNS = [
    "VolumeName",
    "ClinicalInformation_EN",
    "Technique_EN",
    "Findings_EN",
    "Impressions_EN",
]
METADATA_COLUMNS = [
    "VolumeName",
    "Manufacturer",
    "ManufacturerModelName",
    "SeriesDescription",
    "PatientSex",
    "PatientAge",
    "StudyDate",
    "Rows",
    "Columns",
    "NumberofSlices",
    "XYSpacing",
    "ZSpacing",
    "RescaleIntercept",
    "RescaleSlope",
    "ImagePositionPatient",
    "ImageOrientationPatient",
]


def _choices(option: str | tuple[str, ...]) -> tuple[str, ...]:
    return (option,) if isinstance(option, str) else tuple(option)


@dataclass(frozen=True)
class Quirks:
    """Real CT-RATE storage conventions as writer options (module docstring);
    a tuple of choices is drawn per volume."""

    storage: str | tuple[str, ...] = "raw+metadata"
    orientation: str | tuple[str, ...] = "RAS"
    padding_hu: int | None = None
    in_plane_mm: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        for field, allowed in (("storage", STORAGES), ("orientation", ORIENTATIONS)):
            for choice in _choices(getattr(self, field)):
                if choice not in allowed:
                    raise ValueError(f"Quirks.{field}: {choice!r} is not one of {allowed}")
        if self.padding_hu is not None and not -32768 + 1024 <= self.padding_hu < -1024:
            raise ValueError(
                f"Quirks.padding_hu: {self.padding_hu} is not a padding value "
                "(below -1024 HU and storable as int16 raw)"
            )
        if self.in_plane_mm is not None:
            lo, hi = self.in_plane_mm
            if not 0 < lo <= hi:
                raise ValueError(f"Quirks.in_plane_mm: {self.in_plane_mm} is not a range (lo, hi)")


@dataclass(frozen=True)
class VolumeQuirks:
    """What one volume was written with: the truth a reader is tested against."""

    storage: str
    orientation: str
    padding_hu: int | None
    shape: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]


@dataclass(frozen=True)
class DatasetSpec:
    n: int
    seed: int = 0
    shape: tuple[int, int, int] = DEFAULT_SHAPE
    spacing_mm: tuple[float, float, float] = DEFAULT_SPACING_MM
    prevalence: float = DEFAULT_PREVALENCE
    valid_fraction: float = 0.1
    quirks: Quirks = Quirks()


def phantom_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def volume_name(split: str, index: int) -> str:
    return f"{split}_{10000 + index}_a_1.nii.gz"


def relative_path(name: str) -> str:
    split, pid, scan, _ = name.removesuffix(".nii.gz").split("_")
    return f"{SPLITS[split][0]}/{split}_{pid}/{split}_{pid}_{scan}/{name}"


def affine_for(spacing_mm, shape) -> np.ndarray:
    """RAS affine with the volume centred on the origin."""
    affine = np.diag([*(float(s) for s in spacing_mm), 1.0])
    affine[:3, 3] = -(np.array(shape) - 1) / 2 * np.array(spacing_mm, dtype=float)
    return affine


def volume_quirks(spec: DatasetSpec, index: int) -> VolumeQuirks:
    """Volume `index`'s quirks, a pure function of (spec, index). Draws come
    from their own stream, (seed, index, 1), never the phantom's."""
    quirks = spec.quirks
    rng = np.random.default_rng(np.random.SeedSequence([spec.seed, index, 1]))
    storage = _choices(quirks.storage)[int(rng.integers(len(_choices(quirks.storage))))]
    orientation = _choices(quirks.orientation)[int(rng.integers(len(_choices(quirks.orientation))))]
    # as given (ints stay ints): the metadata CSV writes them as they are
    shape, spacing = tuple(spec.shape), tuple(spec.spacing_mm)
    if quirks.in_plane_mm is not None:
        # CT-RATE's in-plane spacing varies per scan over one field of view
        mm = round(float(rng.uniform(*quirks.in_plane_mm)), 3)
        shape = (
            max(1, round(shape[0] * spacing[0] / mm)),
            max(1, round(shape[1] * spacing[1] / mm)),
            shape[2],
        )
        spacing = (mm, mm, spacing[2])
    return VolumeQuirks(storage, orientation, quirks.padding_hu, shape, spacing)


def outside_scan_circle(shape) -> np.ndarray:
    """(X, Y, 1) bool: in-plane voxels outside the circle inscribed in the
    field of view, where a scanner reconstructs nothing and writes padding."""
    x = (np.arange(shape[0]) - (shape[0] - 1) / 2) / (shape[0] / 2)
    y = (np.arange(shape[1]) - (shape[1] - 1) / 2) / (shape[1] / 2)
    return (x[:, None] ** 2 + y[None, :] ** 2 > 1.0)[:, :, None]


def lps_affine(spacing_mm, shape) -> np.ndarray:
    """The affine of an array stored with x and y reversed (LPS, the DICOM
    order), placing every voxel where `affine_for` places it unreversed."""
    affine = affine_for(spacing_mm, shape)
    affine[:2, :2] *= -1
    affine[:2, 3] *= -1
    return affine


def _write_one(args) -> dict:
    root, spec, index, split = args
    quirks = volume_quirks(spec, index)
    phantom = make_phantom(
        phantom_seed(spec.seed, index),
        shape=quirks.shape,
        spacing_mm=quirks.spacing_mm,
        prevalence=spec.prevalence,
    )
    name = volume_name(split, index)
    rel = relative_path(name)
    affine = affine_for(quirks.spacing_mm, quirks.shape)
    hu = phantom.volume_hu.astype(np.int32)
    if quirks.padding_hu is not None:
        hu = np.where(outside_scan_circle(quirks.shape), quirks.padding_hu, hu)
    if quirks.storage == "hu+metadata":
        stored = hu.astype(np.int16)
    else:
        stored = (hu - int(RESCALE_INTERCEPT)).astype(np.int16)
    mask = phantom.mask
    if quirks.orientation == "LPS":
        stored, mask = stored[::-1, ::-1], mask[::-1, ::-1]
        affine = lps_affine(quirks.spacing_mm, quirks.shape)
    for base, data, scaled in ((Path(root), stored, True), (Path(root) / "masks", mask, False)):
        target = base / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        image = nib.Nifti1Image(data, affine)
        image.header.set_xyzt_units("mm")
        if scaled and quirks.storage == "raw+header":
            # set after construction: nibabel keeps it for the saved file
            image.header.set_slope_inter(1.0, RESCALE_INTERCEPT)
        nib.save(image, str(target))
    sx, sy, sz = quirks.spacing_mm
    return {
        "split": split,
        "report": {
            "VolumeName": name,
            "ClinicalInformation_EN": "Phantom study.",
            "Technique_EN": "Non-contrast axial images of the thorax (synthetic phantom).",
            "Findings_EN": phantom.findings,
            "Impressions_EN": phantom.impression,
        },
        "metadata": {
            "VolumeName": name,
            "Manufacturer": "ct-factory",
            "ManufacturerModelName": "chest-phantom",
            "SeriesDescription": "PHANTOM THORAX",
            "PatientSex": "O",
            "PatientAge": "000Y",
            "StudyDate": "20260101",
            "Rows": quirks.shape[1],
            "Columns": quirks.shape[0],
            "NumberofSlices": quirks.shape[2],
            "XYSpacing": f"[{sx}, {sy}]",
            "ZSpacing": sz,
            "RescaleIntercept": RESCALE_INTERCEPT,
            "RescaleSlope": 1.0,
            "ImagePositionPatient": str([float(v) for v in affine[:3, 3]]),
            "ImageOrientationPatient": "[1.0, 0.0, 0.0, 0.0, 1.0, 0.0]",
        },
        "labels": {"VolumeName": name, **phantom.labels},
    }


def write_dataset(
    root: str | Path,
    spec: DatasetSpec,
    *,
    workers: int = 1,
    on_progress: Callable[[], None] | None = None,
) -> dict[str, int]:
    """Write `spec.n` phantoms; returns counts per split."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    n_valid = round(spec.n * spec.valid_fraction)
    jobs = [
        (str(root), spec, i, "valid" if i >= spec.n - n_valid else "train") for i in range(spec.n)
    ]
    rows = []
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for row in pool.map(_write_one, jobs, chunksize=4):
                rows.append(row)
                on_progress and on_progress()
    else:
        for job in jobs:
            rows.append(_write_one(job))
            on_progress and on_progress()
    counts = {}
    for split, (_, reports_csv, metadata_csv, labels_csv) in SPLITS.items():
        part = [row for row in rows if row["split"] == split]
        counts[split] = len(part)
        _write_csv(
            root / "radiology_text_reports" / reports_csv,
            REPORT_COLUMNS,
            [r["report"] for r in part],
        )
        _write_csv(
            root / "metadata" / metadata_csv, METADATA_COLUMNS, [r["metadata"] for r in part]
        )
        _write_csv(
            root / "multi_abnormality_labels" / labels_csv,
            ["VolumeName", *CTRATE_LABELS],
            [r["labels"] for r in part],
        )
    (root / "masks").mkdir(exist_ok=True)
    (root / "masks" / "legend.json").write_text(json.dumps(legend_json(), indent=2) + "\n")
    return counts


def _write_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
