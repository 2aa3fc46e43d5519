"""A CT-RATE-layout training split, loaded once on the model's grid for
every training stage:

    volumes, conditions = load_volumes(root, config, masks=True)

`volumes` is (N, 1, X, Y, Z) int16 HU; `conditions[i]` is what volume i is
conditioned on (its report, spacing, signed labels and, when asked for, its
label map).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from report2ct.config import ModelConfig
from report2ct.labels import CTRATE_LABELS, signed_labels
from training.data.ctrate import CTRateDataset


@dataclass(frozen=True)
class VolumeConditions:
    findings: str
    impression: str
    spacing_mm: tuple[float, float, float]
    labels: tuple[float, ...]  # signed, in CT-RATE's order: +1 present, -1 absent
    mask: np.ndarray | None = None  # (X, Y, Z) uint8 label map on the model's grid


def load_volumes(
    root: str | Path,
    config: ModelConfig,
    *,
    masks: bool = False,
    hu_rule: str = "auto",
    non_chest: str = "skip",
) -> tuple[torch.Tensor, list[VolumeConditions]]:
    """The training split on the model's grid: int16 HU volumes and their
    conditions (with each label map when `masks`). `hu_rule` says how stored
    values become HU (training.data.ctrate: decided per volume by default);
    volumes with no lungs in view are skipped with a logged reason."""
    dataset = CTRateDataset(
        Path(root),
        "train",
        target_spacing_mm=config.default_spacing_mm,
        target_shape=config.default_shape,
        load_masks=masks,
        hu_rule=hu_rule,
        non_chest=non_chest,
    )
    volumes = torch.empty(len(dataset), 1, *config.default_shape, dtype=torch.int16)
    conditions = []
    for i in range(len(dataset)):
        item = dataset[i]
        volumes[i] = item["volume"].round().to(torch.int16)
        labels = {n: int(v) for n, v in zip(CTRATE_LABELS, item["labels"].tolist(), strict=True)}
        conditions.append(
            VolumeConditions(
                findings=item["findings"],
                impression=item["impression"],
                spacing_mm=tuple(float(v) for v in item["spacing_mm"].tolist()),
                labels=tuple(signed_labels(labels)),
                mask=item["mask"][0].to(torch.uint8).numpy() if masks else None,
            )
        )
    return volumes, conditions
