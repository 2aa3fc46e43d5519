"""Label fidelity: a small 3D multi-label classifier for the CT-RATE labels,
trained on real phantoms (the role CT-Net plays in the VLM3D challenge).

Fidelity is AUROC of its scores against the labels a generated volume's report
asked for, next to the same on held-out real phantoms; the ratio
generated/real is the headline (1.0: generated volumes show their findings as
recognisably as real ones do).

The default grid (`FINE_GRID`, 4 x 4 x 5 mm) is the phantom world's own: the
smallest nodule the world draws (8 mm) spans two voxels across and the
median one four, where the former 8-12 mm grids averaged a nodule into one
voxel. A stride-2 first convolution brings that grid down to the cost of the
coarse one: it sees every voxel at full resolution, then downsamples.

The same network, with per-label decision thresholds chosen on held-out real
phantoms (`choose_thresholds`), is the factory's label verifier
(`factory.verify`): any classifier bundle whose metadata holds `thresholds`.
"""

from __future__ import annotations

import math
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

# The phantom world's own grid, cropped to its body (x 384, y 256, z 320 mm):
# an 8 mm nodule spans 2 voxels across, a 28 mm one 7.
FINE_GRID = {"spacing_mm": (4.0, 4.0, 5.0), "shape": (96, 64, 64), "conv1_stride": 2}
# A label is judged by a verifier only where the classifier separates it on
# held-out real phantoms at least this well: below it, a threshold rejects
# good volumes about as often as bad ones.
MIN_VERIFIER_AUROC = 0.8


class LabelClassifier(EvalBundleModule, nn.Module):
    """(N, 1, X, Y, Z) volumes on its grid (HU window in [0, 1]) -> (N, 18) logits.

    A four-stage basic-block 3D ResNet (MONAI); the grid it was trained on
    (spacing_mm, shape) is part of its config, so `predict` resamples any
    case the same way. `conv1_stride` 2 halves the grid in the first
    convolution (for fine grids); bundles written before it existed load
    with 1.
    """

    KIND = "label-classifier"

    def __init__(
        self,
        *,
        spacing_mm: Sequence[float],
        shape: Sequence[int],
        width: int = 8,
        conv1_stride: int = 1,
    ) -> None:
        super().__init__()
        self.config = {
            "spacing_mm": list(spacing_mm),
            "shape": list(shape),
            "width": width,
            "conv1_stride": conv1_stride,
        }
        self.net = ResNet(
            block="basic",
            layers=(1, 1, 1, 1),
            block_inplanes=[width, 2 * width, 4 * width, 8 * width],
            spatial_dims=3,
            n_input_channels=1,
            conv1_t_size=3,
            conv1_t_stride=conv1_stride,
            num_classes=len(CTRATE_LABELS),
        )

    def forward(self, volumes: torch.Tensor) -> torch.Tensor:
        return self.net(volumes)

    def grid(self, cases: Sequence[Case]) -> torch.Tensor:
        return stack_grid(cases, spacing_mm=self.config["spacing_mm"], shape=self.config["shape"])

    @torch.no_grad()
    def predict(self, cases: Sequence[Case], *, batch_size: int = 8) -> np.ndarray:
        """(N, 18) probabilities, on the device the network is on."""
        self.eval()
        device = next(self.parameters()).device
        out = [
            torch.sigmoid(self(self.grid(cases[i : i + batch_size]).to(device))).float().cpu()
            for i in range(0, len(cases), batch_size)
        ]
        return torch.cat(out).numpy()

    def predict_volumes(
        self, volumes_hu: Sequence[np.ndarray], spacings_mm: Sequence[Sequence[float]]
    ) -> np.ndarray:
        """(N, 18) probabilities of (X, Y, Z) HU volumes at their spacings."""
        blank = np.zeros(len(CTRATE_LABELS), dtype=np.int64)
        cases = [
            Case(f"volume-{i}", np.asarray(v), tuple(float(x) for x in s), blank, "")
            for i, (v, s) in enumerate(zip(volumes_hu, spacings_mm, strict=True))
        ]
        return self.predict(cases)


def train_classifier(
    cases: Sequence[Case],
    *,
    spacing_mm: Sequence[float],
    shape: Sequence[int],
    epochs: int = 20,
    batch_size: int = 8,
    lr: float = 3e-3,
    width: int = 8,
    conv1_stride: int = 1,
    seed: int = 0,
) -> LabelClassifier:
    """Fit on real cases with binary cross-entropy over the 18 labels.

    Random flips along x (left/right) are the only augmentation: findings of
    the phantom world occur on either side, so a flip keeps every label true.
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = LabelClassifier(
        spacing_mm=spacing_mm, shape=shape, width=width, conv1_stride=conv1_stride
    )
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


def choose_thresholds(
    scores: np.ndarray, labels: np.ndarray, *, min_auroc: float = MIN_VERIFIER_AUROC
) -> dict[str, Any]:
    """Per-label decision thresholds on held-out real cases (scores and 0/1
    labels, (N, 18)): the one maximising balanced accuracy (Youden's J), at
    the midpoint between neighbouring scores. A label the classifier cannot
    separate well enough (AUROC below `min_auroc`, or a single class in the
    set) gets None: a verifier does not judge it.

    Returns {"thresholds": {name: float or None}, "auroc": {name: float or
    None}, "balanced_accuracy": {name: float or None}, "min_auroc": float}.
    """
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    values = per_label_auroc(scores, labels)
    thresholds, balanced = {}, {}
    for j, name in enumerate(CTRATE_LABELS):
        if math.isnan(values[j]) or values[j] < min_auroc:
            thresholds[name] = balanced[name] = None
            continue
        column, truth = scores[:, j], labels[:, j].astype(bool)
        ordered = np.unique(column)
        cuts = np.concatenate([[ordered[0] - 1e-6], (ordered[1:] + ordered[:-1]) / 2])
        # a volume is called positive when its score is >= the cut
        tpr = np.array([(column[truth] >= c).mean() for c in cuts])
        tnr = np.array([(column[~truth] < c).mean() for c in cuts])
        best = int(np.argmax(tpr + tnr))
        thresholds[name] = float(cuts[best])
        balanced[name] = float((tpr[best] + tnr[best]) / 2)
    return {
        "thresholds": thresholds,
        "auroc": {
            n: (None if math.isnan(v) else float(v))
            for n, v in zip(CTRATE_LABELS, values, strict=True)
        },
        "balanced_accuracy": balanced,
        "min_auroc": float(min_auroc),
    }


def build_verifier(
    out_dir: str,
    *,
    n_train: int = 240,
    n_held_out: int = 120,
    epochs: int = 12,
    seed: int = 0,
    prevalence: float = 0.3,
    grid: dict[str, Any] | None = None,
    min_auroc: float = MIN_VERIFIER_AUROC,
) -> dict[str, Any]:
    """Train a label classifier on `n_train` real phantoms drawn in memory,
    choose its per-label thresholds on `n_held_out` other ones, and write it
    as a verifier bundle (a classifier bundle with `thresholds` in its
    metadata). Returns the metadata (held-out AUROC, thresholds, pass rate
    of the held-out phantoms, seconds spent)."""
    import time

    from evaluation.data import phantom_cases

    grid = dict(grid or FINE_GRID)
    phantom_grid = {"shape": (96, 96, 64), "spacing_mm": (4.0, 4.0, 5.0)}  # the world's default
    start = time.perf_counter()
    train = phantom_cases(range(n_train), prevalence=prevalence, **phantom_grid)
    held_out = phantom_cases(
        range(500_000, 500_000 + n_held_out),
        prevalence=prevalence,
        id_prefix="held",
        **phantom_grid,
    )
    drawn_s = time.perf_counter() - start
    start = time.perf_counter()
    model = train_classifier(train, epochs=epochs, seed=seed, **grid)
    trained_s = time.perf_counter() - start
    labels = np.stack([c.labels for c in held_out])
    scores = model.predict(held_out)
    chosen = choose_thresholds(scores, labels, min_auroc=min_auroc)
    judged = [i for i, n in enumerate(CTRATE_LABELS) if chosen["thresholds"][n] is not None]
    cuts = np.array([chosen["thresholds"][CTRATE_LABELS[i]] for i in judged])
    agree = ((scores[:, judged] >= cuts) == labels[:, judged].astype(bool)).all(axis=1)
    metadata = {
        "role": "label verifier",
        "trained_on": f"{n_train} phantoms (seeds 0..{n_train - 1}, prevalence {prevalence})",
        "held_out": f"{n_held_out} phantoms (seeds 500000..{500_000 + n_held_out - 1})",
        "epochs": epochs,
        "seed": seed,
        **chosen,
        "held_out_macro_auroc": auroc_table(scores, labels)["macro"],
        # real phantoms asked for all their labels: the share a verifier passes
        "held_out_pass_rate": float(agree.mean()),
        "timings_s": {"phantoms": drawn_s, "train": trained_s},
    }
    model.save(out_dir, metadata=metadata)
    return metadata
