"""Label fidelity: a small 3D multi-label classifier for the CT-RATE labels,
trained on real phantoms (the role CT-Net plays in the VLM3D challenge).

Fidelity is AUROC of its scores against the labels a generated volume's report
asked for, next to the same on held-out real phantoms; the ratio
generated/real is the headline (1.0: generated volumes show their findings as
recognisably as real ones do).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from monai.networks.nets import ResNet
from torch import nn

from evaluation.bundle import EvalBundleModule
from evaluation.data import Case, stack_grid
from evaluation.metrics import macro_auroc, per_label_auroc
from report2ct.labels import CTRATE_LABELS


class LabelClassifier(EvalBundleModule, nn.Module):
    """(N, 1, X, Y, Z) volumes on its grid (HU window in [0, 1]) -> (N, 18) logits.

    A four-stage basic-block 3D ResNet (MONAI); the grid it was trained on
    (spacing_mm, shape) is part of its config, so `predict` resamples any
    case the same way.
    """

    KIND = "label-classifier"

    def __init__(
        self, *, spacing_mm: Sequence[float], shape: Sequence[int], width: int = 8
    ) -> None:
        super().__init__()
        self.config = {"spacing_mm": list(spacing_mm), "shape": list(shape), "width": width}
        self.net = ResNet(
            block="basic",
            layers=(1, 1, 1, 1),
            block_inplanes=[width, 2 * width, 4 * width, 8 * width],
            spatial_dims=3,
            n_input_channels=1,
            conv1_t_size=3,
            conv1_t_stride=1,
            num_classes=len(CTRATE_LABELS),
        )

    def forward(self, volumes: torch.Tensor) -> torch.Tensor:
        return self.net(volumes)

    def grid(self, cases: Sequence[Case]) -> torch.Tensor:
        return stack_grid(cases, spacing_mm=self.config["spacing_mm"], shape=self.config["shape"])

    @torch.no_grad()
    def predict(self, cases: Sequence[Case], *, batch_size: int = 8) -> np.ndarray:
        """(N, 18) probabilities."""
        self.eval()
        out = [
            torch.sigmoid(self(self.grid(cases[i : i + batch_size])))
            for i in range(0, len(cases), batch_size)
        ]
        return torch.cat(out).numpy()


def train_classifier(
    cases: Sequence[Case],
    *,
    spacing_mm: Sequence[float],
    shape: Sequence[int],
    epochs: int = 20,
    batch_size: int = 8,
    lr: float = 3e-3,
    width: int = 8,
    seed: int = 0,
) -> LabelClassifier:
    """Fit on real cases with binary cross-entropy over the 18 labels.

    Random flips along x (left/right) are the only augmentation: findings of
    the phantom world occur on either side, so a flip keeps every label true.
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = LabelClassifier(spacing_mm=spacing_mm, shape=shape, width=width)
    volumes = model.grid(cases)  # (N, 1, X, Y, Z), built once: the set is small
    labels = torch.from_numpy(np.stack([c.labels for c in cases])).float()  # (N, 18)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=epochs * -(-len(cases) // batch_size)
    )
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(cases), generator=generator).split(batch_size):
            x = volumes[batch]
            flip = torch.rand(len(batch), generator=generator) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1, 1), x.flip(2), x)
            loss = nn.functional.binary_cross_entropy_with_logits(model(x), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


def auroc_table(scores: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """{"per_label": {name: AUROC or None}, "macro": float or None} (None where NaN)."""
    values = per_label_auroc(scores, labels)
    macro = macro_auroc(values)
    return {
        "per_label": {
            n: (None if np.isnan(v) else float(v))
            for n, v in zip(CTRATE_LABELS, values, strict=True)
        },
        "macro": None if np.isnan(macro) else macro,
    }


def label_fidelity(
    classifier: LabelClassifier, generated: Sequence[Case], real: Sequence[Case]
) -> dict[str, Any]:
    """Per-label and macro AUROC on generated cases (labels = what their reports
    asked for) and on held-out real cases; `ratio` = generated / real macro."""
    gen = auroc_table(classifier.predict(generated), np.stack([c.labels for c in generated]))
    ref = auroc_table(classifier.predict(real), np.stack([c.labels for c in real]))
    ratio = gen["macro"] / ref["macro"] if gen["macro"] is not None and ref["macro"] else None
    return {"generated": gen, "real": ref, "ratio": ratio}
