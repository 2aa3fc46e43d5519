"""Write phantoms as a data set in CT-RATE's own layout, so one reader serves
real CT-RATE and the phantom world alike.

    <root>/train_fixed/train_{pid}/train_{pid}_a/train_{pid}_a_1.nii.gz
    <root>/valid_fixed/valid_{pid}/valid_{pid}_a/valid_{pid}_a_1.nii.gz
    <root>/radiology_text_reports/{train,validation}_reports.csv
    <root>/metadata/{train,validation}_metadata.csv
    <root>/multi_abnormality_labels/{train,valid}_predicted_labels.csv
    <root>/masks/<same relative path as the volume>   label maps (uint8)
    <root>/masks/legend.json                          values -> names, tissues, colours

Volumes are stored as CT-RATE stores them: raw values (HU + 1024) with
RescaleSlope 1 and RescaleIntercept -1024 in the metadata, and an affine built
from the spacing. Phantom i's seed is derived from (seed, i), so the data set
is the same whatever the number of workers.
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


@dataclass(frozen=True)
class DatasetSpec:
    n: int
    seed: int = 0
    shape: tuple[int, int, int] = DEFAULT_SHAPE
    spacing_mm: tuple[float, float, float] = DEFAULT_SPACING_MM
    prevalence: float = DEFAULT_PREVALENCE
    valid_fraction: float = 0.1


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


def _write_one(args) -> dict:
    root, spec, index, split = args
    phantom = make_phantom(
        phantom_seed(spec.seed, index),
        shape=spec.shape,
        spacing_mm=spec.spacing_mm,
        prevalence=spec.prevalence,
    )
    name = volume_name(split, index)
    rel = relative_path(name)
    affine = affine_for(spec.spacing_mm, spec.shape)
    raw = (phantom.volume_hu.astype(np.int32) - int(RESCALE_INTERCEPT)).astype(np.int16)
    for base, data in ((Path(root), raw), (Path(root) / "masks", phantom.mask)):
        target = base / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        image = nib.Nifti1Image(data, affine)
        image.header.set_xyzt_units("mm")
        nib.save(image, str(target))
    sx, sy, sz = spec.spacing_mm
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
            "Rows": spec.shape[1],
            "Columns": spec.shape[0],
            "NumberofSlices": spec.shape[2],
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
