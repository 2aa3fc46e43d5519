"""One phantom: anatomy -> findings -> label map -> HU volume -> report.

    phantom = make_phantom(seed=7)
    phantom.volume_hu   # (X, Y, Z) int16, RAS+
    phantom.mask        # (X, Y, Z) uint8 label map (phantom.legend)
    phantom.labels      # {CT-RATE label: 0/1}, all 18
    phantom.findings, phantom.impression

`make_mask` draws only the label map (no HU, no noise) for requested labels:
the factory's `mask_source: "phantom"` uses it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter

from phantom.anatomy import Anatomy, build_anatomy
from phantom.findings import Finding, heart_scale, paint_findings, sample_findings
from phantom.geometry import Grid
from phantom.legend import LABELS
from phantom.report import write_report
from report2ct.labels import CTRATE_LABELS

DEFAULT_SHAPE = (96, 96, 64)
DEFAULT_SPACING_MM = (4.0, 4.0, 5.0)
DEFAULT_PREVALENCE = 0.25
NOISE_HU = 18.0  # acquisition noise (sd) at the default spacing


@dataclass
class Phantom:
    seed: int
    volume_hu: np.ndarray
    mask: np.ndarray
    findings_list: list[Finding]
    labels: dict[str, int]
    findings: str
    impression: str
    spacing_mm: tuple[float, float, float]


def labels_of(findings: list[Finding]) -> dict[str, int]:
    """The 18 CT-RATE labels of a list of drawn findings."""
    present = {f.label for f in findings}
    return {name: int(name in present) for name in CTRATE_LABELS}


def draw(
    seed: int,
    *,
    shape: tuple[int, int, int] = DEFAULT_SHAPE,
    spacing_mm: tuple[float, float, float] = DEFAULT_SPACING_MM,
    prevalence: float | dict[str, float] = DEFAULT_PREVALENCE,
    requested: dict[str, int] | None = None,
) -> tuple[Anatomy, list[Finding]]:
    """The anatomy (label map, lung sides, lobes) with findings painted in."""
    rng = np.random.default_rng(seed)
    grid = Grid(tuple(shape), tuple(float(s) for s in spacing_mm))
    findings = sample_findings(rng, prevalence, requested)
    anatomy = build_anatomy(grid, rng, heart_scale=heart_scale(findings))
    return anatomy, paint_findings(anatomy, findings, grid, rng)


def make_mask(seed: int, **kwargs) -> tuple[np.ndarray, list[Finding]]:
    """The label map and the drawn findings of phantom `seed` (see `draw`)."""
    anatomy, findings = draw(seed, **kwargs)
    return anatomy.labels, findings


def render_hu(mask: np.ndarray, spacing_mm, rng: np.random.Generator) -> np.ndarray:
    """Label map -> HU: each class at its mean with smooth texture, partial
    volume at edges, then white acquisition noise."""
    mean = np.zeros(256, dtype=np.float32)
    sd = np.zeros(256, dtype=np.float32)
    for label in LABELS:
        mean[label.value], sd[label.value] = label.hu, label.hu_sd
    texture = gaussian_filter(rng.standard_normal(mask.shape).astype(np.float32), sigma=1.0) * 2.5
    hu = mean[mask] + sd[mask] * texture
    # A little blur stands in for the scanner's point spread (partial volume).
    voxel = float(np.mean(spacing_mm))
    hu = gaussian_filter(hu, sigma=0.6 * 4.0 / max(voxel, 1e-3) * 0.5 + 0.3)
    hu += rng.standard_normal(mask.shape).astype(np.float32) * NOISE_HU
    return np.clip(np.round(hu), -1024, 3071).astype(np.int16)


def make_phantom(
    seed: int,
    *,
    shape: tuple[int, int, int] = DEFAULT_SHAPE,
    spacing_mm: tuple[float, float, float] = DEFAULT_SPACING_MM,
    prevalence: float | dict[str, float] = DEFAULT_PREVALENCE,
    requested: dict[str, int] | None = None,
) -> Phantom:
    mask, findings = make_mask(
        seed, shape=shape, spacing_mm=spacing_mm, prevalence=prevalence, requested=requested
    )
    rng = np.random.default_rng([seed, 1])  # its own streams: the mask never depends on rendering
    volume = render_hu(mask, spacing_mm, rng)
    findings_text, impression = write_report(findings, np.random.default_rng([seed, 2]))
    return Phantom(
        seed,
        volume,
        mask,
        findings,
        labels_of(findings),
        findings_text,
        impression,
        tuple(float(s) for s in spacing_mm),
    )
