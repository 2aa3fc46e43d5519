"""Metrics against known answers and independent reference formulas."""

import math

import numpy as np
import pytest
import torch

from evaluation.metrics import clip_score, fid, macro_auroc, per_label_auroc


def reference_fid(a: np.ndarray, b: np.ndarray) -> float:
    """FID through symmetric eigendecompositions only (no scipy.linalg.sqrtm):
    Tr((S_a S_b)^(1/2)) = Tr((S_a^(1/2) S_b S_a^(1/2))^(1/2)), and the inner
    matrix is symmetric PSD, so its root's trace is sum(sqrt(eigvalsh))."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(s_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(root_a @ s_b @ root_a)
    trace_root = np.sqrt(np.clip(inner, 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * trace_root)


def test_fid_of_a_set_against_itself_is_zero():
    features = np.random.default_rng(0).normal(size=(200, 16))
    assert fid(features, features) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_fid_matches_eigendecomposition_reference(seed):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(300, 12))
    # A correlated, shifted, rescaled second set, so every FID term matters.
    b = rng.normal(size=(250, 12)) @ rng.normal(size=(12, 12)) * 0.5 + rng.normal(size=12)
    assert fid(a, b) == pytest.approx(reference_fid(a, b), abs=1e-3)
    assert fid(a, b) == pytest.approx(fid(b, a), abs=1e-6)


def test_fid_of_gaussians_with_known_moments():
    # Two isotropic Gaussians that differ only in mean by 3 in one axis: FID -> 9.
    rng = np.random.default_rng(4)
    a = rng.normal(size=(20000, 4))
    b = rng.normal(size=(20000, 4)) + np.array([3.0, 0, 0, 0])
    assert fid(a, b) == pytest.approx(9.0, abs=0.15)


def test_fid_rejects_mismatched_features():
    with pytest.raises(ValueError, match="equal D"):
        fid(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match=">= 2 samples"):
        fid(np.zeros((1, 3)), np.zeros((5, 3)))


def test_auroc_known_answers():
    labels = np.array([[0, 1, 0, 1], [0, 0, 1, 1], [1, 0, 1, 1], [1, 1, 1, 1]]).T
    scores = np.stack(
        [
            [0.1, 0.9, 0.2, 0.8],  # separates perfectly -> 1
            [0.9, 0.8, 0.1, 0.2],  # exactly inverted -> 0
            [0.5, 0.5, 0.5, 0.5],  # all tied -> 0.5
            [0.3, 0.1, 0.4, 0.2],  # one class only -> NaN
        ],
        axis=1,
    )
    auc = per_label_auroc(scores, labels)
    np.testing.assert_allclose(auc[:3], [1.0, 0.0, 0.5])
    assert math.isnan(auc[3])
    assert macro_auroc(auc) == pytest.approx(0.5)


def test_auroc_counts_pairs_like_mann_whitney():
    # positives 0.35, 0.8 against negatives 0.1, 0.4: pairs won 1 + 2 of 4 -> 0.75
    auc = per_label_auroc(np.array([[0.1], [0.4], [0.35], [0.8]]), np.array([[0], [0], [1], [1]]))
    assert auc[0] == pytest.approx(0.75)


def test_macro_auroc_of_nothing_measurable_is_nan():
    assert math.isnan(macro_auroc([math.nan, math.nan]))


def test_auroc_rejects_bad_inputs():
    with pytest.raises(ValueError, match="0/1"):
        per_label_auroc(np.zeros((3, 1)), np.full((3, 1), 2))
    with pytest.raises(ValueError, match="num_labels"):
        per_label_auroc(np.zeros((3, 2)), np.zeros((3, 1)))


def test_clip_score_is_clamped_scaled_cosine():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 1.0]])
    b = torch.tensor([[2.0, 0.0], [-1.0, 0.0], [1.0, 0.0]])
    torch.testing.assert_close(clip_score(a, b), torch.tensor([100.0, 0.0, 100 / math.sqrt(2)]))
