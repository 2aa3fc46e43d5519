"""Scalar metrics on features and scores: AUROC, FID, CT-CLIP score.

Thin, documented wrappers over MONAI's implementations (the same code the
MAISI / VLM3D evaluation scripts call), adding only what a report needs: NaN
for labels that cannot be scored and a macro average that skips them.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import FIDMetric
from monai.metrics.rocauc import compute_roc_auc


def per_label_auroc(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """ROC AUC of each column of `scores` (N, L) against 0/1 `labels` (N, L).

    A label whose column holds only one class (all 0 or all 1, e.g. a finding
    no generated report asked for) has no defined AUROC: it is reported as NaN,
    never as 0.5, so a reader can tell "not measurable" from "chance".
    """
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    if scores.shape != labels.shape or scores.ndim != 2:
        raise ValueError(
            f"scores {scores.shape} and labels {labels.shape} must both be (N, num_labels)"
        )
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be 0/1")
    with warnings.catch_warnings():
        # MONAI warns once per single-class label before returning NaN; the NaN
        # is the documented answer here, so the warning is noise.
        warnings.simplefilter("ignore", UserWarning)
        values = compute_roc_auc(
            torch.from_numpy(scores), torch.from_numpy(labels.astype(np.float64)), average="none"
        )
    return np.atleast_1d(np.asarray(values, dtype=np.float64))


def macro_auroc(per_label: Sequence[float] | np.ndarray) -> float:
    """Mean of the finite per-label AUROCs (NaN labels excluded); NaN if none is finite."""
    values = np.asarray(per_label, dtype=np.float64)
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else math.nan


def fid(features_a: np.ndarray | torch.Tensor, features_b: np.ndarray | torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N, D) and (M, D).

    ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) (Heusel et al. 2017,
    eq. 6), computed by MONAI's `FIDMetric` in float64 with scipy's matrix
    square root. Needs at least two samples per set; with fewer samples than
    feature dimensions the covariances are singular and the value is biased
    upwards, as for every FID.
    """
    a, b = torch.as_tensor(np.asarray(features_a)), torch.as_tensor(np.asarray(features_b))
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(
            f"feature sets must be (N, D) with equal D; got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if min(a.shape[0], b.shape[0]) < 2:
        raise ValueError(f"FID needs >= 2 samples per set; got {a.shape[0]} and {b.shape[0]}")
    value = float(FIDMetric()(a.double(), b.double()))
    # The trace term can undershoot by rounding when the sets coincide.
    return max(value, 0.0)


def clip_score(embeddings_a: torch.Tensor, embeddings_b: torch.Tensor) -> torch.Tensor:
    """CT-CLIP's score, max(100 · cos(a, b), 0), row by row: (N, D), (N, D) -> (N,)."""
    cosine = torch.nn.functional.cosine_similarity(
        embeddings_a.float(), embeddings_b.float(), dim=-1
    )
    return (100.0 * cosine).clamp(min=0.0)
