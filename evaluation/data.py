"""Cases to evaluate: one volume with its spacing, labels and report, from
either side (a factory job index or a CT-RATE-layout reference set), and the
common grid every metric compares them on."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import ResizeWithPadOrCrop, Spacing

from report2ct.codec import HU_WINDOW  # the window every network here sees, scaled to [0, 1]
from report2ct.labels import CTRATE_LABELS

AIR_HU = HU_WINDOW[0]  # what padding adds around a resampled volume


@dataclass(frozen=True)
class Case:
    """One volume. `volume_hu` is (X, Y, Z) in RAS+ (docs/conventions.md);
    `labels` (18,) is 0/1 in CT-RATE's order: for a generated volume, what its
    report asked for; for a real one, what it shows."""

    id: str
    volume_hu: np.ndarray
    spacing_mm: tuple[float, float, float]
    labels: np.ndarray
    report: str
    mask: np.ndarray | None = None  # (X, Y, Z) label map it was generated from, if any
    mask_classes: dict[int, str] | None = None  # mask value -> class name

    def __post_init__(self) -> None:
        if self.volume_hu.ndim != 3:
            raise ValueError(
                f"case {self.id}: volume must be (X, Y, Z); got {self.volume_hu.shape}"
            )
        if len(self.spacing_mm) != 3 or min(self.spacing_mm) <= 0:
            raise ValueError(
                f"case {self.id}: spacing_mm must be 3 positive numbers; got {self.spacing_mm}"
            )
        if self.labels.shape != (len(CTRATE_LABELS),):
            raise ValueError(
                f"case {self.id}: labels must be ({len(CTRATE_LABELS)},) in CT-RATE order; got {self.labels.shape}"
            )


def to_grid(case: Case, *, spacing_mm: Sequence[float], shape: Sequence[int]) -> torch.Tensor:
    """Resample `case` to `spacing_mm` using the spacing in its metadata, then
    pad (with air) or crop centrally to `shape`; scale HU_WINDOW to [0, 1].

    Returns (1, X, Y, Z) float32. Both sides of every comparison go through
    here, so a metric never sees a difference that is only a grid difference.
    """
    image = MetaTensor(
        torch.from_numpy(np.asarray(case.volume_hu, dtype=np.float32))[None],
        affine=torch.diag(torch.tensor([*case.spacing_mm, 1.0], dtype=torch.float64)),
    )
    image = Spacing(pixdim=tuple(spacing_mm), mode="bilinear", padding_mode="border")(image)
    image = ResizeWithPadOrCrop(tuple(shape), mode="constant", value=AIR_HU)(image)
    low, high = HU_WINDOW
    return ((image.as_tensor().clamp(low, high) - low) / (high - low)).float()


def stack_grid(
    cases: Iterable[Case], *, spacing_mm: Sequence[float], shape: Sequence[int]
) -> torch.Tensor:
    """(N, 1, X, Y, Z) batch of `to_grid` volumes."""
    return torch.stack([to_grid(c, spacing_mm=spacing_mm, shape=shape) for c in cases])


def report_text(findings: str | None, impression: str | None) -> str:
    return f"Findings: {(findings or '').strip()} Impression: {(impression or '').strip()}"


def generated_cases(run_uri: str) -> list[Case]:
    """Committed volumes of a factory job run (its folder, local or s3://)."""
    from factory.reader import GeneratedVolumes

    dataset = GeneratedVolumes(run_uri)
    cases = []
    for item in (dataset[i] for i in range(len(dataset))):
        cases.append(
            Case(
                id=item["id"],
                volume_hu=item["volume"][0].numpy(),
                spacing_mm=tuple(float(s) for s in item["spacing_mm"]),
                labels=item["labels"].numpy().astype(np.int64),
                report=report_text(item["findings"], item["impression"]),
                mask=item["mask"][0].numpy() if "mask" in item else None,
                mask_classes=item.get("mask_classes"),
            )
        )
    if not cases:
        raise ValueError(f"{run_uri}: no committed volumes in this run's index")
    return cases


def reference_cases(root: str | Path, *, split: str) -> list[Case]:
    """Real volumes of a CT-RATE-layout data set (real CT-RATE or a phantom set
    written by `ctfactory phantoms`), at their own spacing, through the one
    CT-RATE reader (`training.data.ctrate`)."""
    from training.data.ctrate import CTRateDataset

    dataset = CTRateDataset(root, split=split, load_masks=False)
    cases = []
    for i in range(len(dataset)):
        item = dataset[i]
        cases.append(
            Case(
                id=item["name"].removesuffix(".nii.gz"),
                volume_hu=item["volume"][0].numpy(),
                spacing_mm=tuple(float(s) for s in item["spacing_mm"]),
                labels=item["labels"].numpy().astype(np.int64),
                report=report_text(item["findings"], item["impression"]),
                mask=item["mask"][0].numpy() if "mask" in item else None,
                mask_classes=item.get("mask_classes"),
            )
        )
    if not cases:
        raise ValueError(f"{root}: the {split!r} split holds no volumes")
    return cases


def phantom_cases(
    seeds: Iterable[int],
    *,
    shape: Sequence[int],
    spacing_mm: Sequence[float],
    prevalence: float = 0.25,
    id_prefix: str = "phantom",
) -> list[Case]:
    """Real phantoms drawn in memory (no files): training data for the
    evaluation networks and held-out truth for their measured floors."""
    from phantom.world import make_phantom

    cases = []
    for seed in seeds:
        p = make_phantom(
            seed, shape=tuple(shape), spacing_mm=tuple(spacing_mm), prevalence=prevalence
        )
        cases.append(
            Case(
                id=f"{id_prefix}_{seed}",
                volume_hu=p.volume_hu.astype(np.float32),
                spacing_mm=p.spacing_mm,
                labels=np.array([p.labels[n] for n in CTRATE_LABELS], dtype=np.int64),
                report=report_text(p.findings, p.impression),
            )
        )
    return cases
