"""Findings: drawn per phantom from the CT-RATE labels, described by a small
typed record that both the renderer and the report writer read (so the
report cannot contradict the image), and painted into the label map by one
painter per finding (`PAINTERS`; `phantom.report.WORDING` is its twin for
the report's sentences).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
from scipy.ndimage import binary_dilation

from phantom.anatomy import LOBE_IDS, Anatomy
from phantom.geometry import Grid, ellipsoid, random_point, shrink, tube
from phantom.legend import BY_NAME, NOT_RENDERED, RENDERED_FINDINGS
from report2ct.labels import CTRATE_LABELS

L = {name: label.value for name, label in BY_NAME.items()}
SIDES = ("right", "left")


@dataclass(frozen=True)
class Finding:
    label: str  # a CT-RATE label name
    side: str | None = None  # right | left | bilateral
    lobe: str | None = None  # upper | middle | lower
    size_mm: float | None = None
    amount: str | None = None  # minimal | small | moderate | large
    detail: dict = field(default_factory=dict)


def sample_findings(
    rng: np.random.Generator,
    prevalence: float | dict[str, float],
    requested: dict[str, int] | None = None,
) -> list[Finding]:
    """Which findings a phantom has, with their attributes. `requested`
    forces CT-RATE labels on (1) or off (0); the rest follow `prevalence`.

    A moderate or large pleural effusion compresses the lung above it: unless
    Atelectasis is requested off, it brings a compressive atelectasis finding
    (drawn, labelled and reported like any other)."""
    requested = dict(requested or {})
    _check_requested(requested)
    findings = []
    for name in RENDERED_FINDINGS:
        p = prevalence.get(name, 0.0) if isinstance(prevalence, dict) else prevalence
        draw = rng.random() < p  # always drawn, so attributes don't shift the stream
        present = bool(requested[name]) if name in requested else draw
        findings.append(_attributes(name, rng) if present else None)
    findings = [f for f in findings if f is not None]
    by = {f.label: f for f in findings}
    effusion = by.get("Pleural effusion")
    if (
        effusion is not None
        and effusion.amount != "small"
        and "Atelectasis" not in by
        and requested.get("Atelectasis", 1)
    ):
        compressive = Finding(
            "Atelectasis", side=effusion.side, lobe="lower", detail={"kind": "compressive"}
        )
        findings.insert(findings.index(effusion), compressive)
    return findings


def _check_requested(requested: dict[str, int]) -> None:
    for name, value in requested.items():
        if name not in CTRATE_LABELS:
            raise ValueError(
                f"requested finding {name!r} is not a CT-RATE label (report2ct.labels.CTRATE_LABELS)"
            )
        if value and name in NOT_RENDERED:
            raise ValueError(
                f"requested finding {name!r} is never rendered by the phantom world; "
                f"it can draw {', '.join(RENDERED_FINDINGS)} (docs/phantoms.md)"
            )


def _attributes(name: str, rng: np.random.Generator) -> Finding:
    side = str(rng.choice(SIDES))
    if name == "Lung nodule":
        lobe = str(
            rng.choice(["upper", "middle", "lower"] if side == "right" else ["upper", "lower"])
        )
        return Finding(name, side=side, lobe=lobe, size_mm=float(np.round(rng.uniform(8, 28))))
    if name == "Pleural effusion":
        sides = str(rng.choice(["right", "left", "bilateral"], p=[0.4, 0.3, 0.3]))
        return Finding(name, side=sides, amount=str(rng.choice(["small", "moderate", "large"])))
    if name in {"Consolidation", "Lung opacity", "Atelectasis"}:
        lobe = "lower" if name == "Atelectasis" else str(rng.choice(["upper", "lower"]))
        return Finding(name, side=side, lobe=lobe)
    if name == "Emphysema":
        return Finding(
            name,
            side="bilateral",
            lobe="upper",
            amount=str(rng.choice(["mild", "moderate", "severe"])),
        )
    if name == "Cardiomegaly":
        return Finding(name, detail={"heart_scale": float(rng.uniform(1.25, 1.4))})
    if name == "Pericardial effusion":
        return Finding(name, size_mm=float(np.round(rng.uniform(8, 16))))
    if name == "Lymphadenopathy":
        return Finding(
            name,
            size_mm=float(np.round(rng.uniform(14, 24))),
            detail={
                "station": str(rng.choice(["subcarinal", "right paratracheal", "prevascular"]))
            },
        )
    if name == "Medical material":
        return Finding(
            name, side=side, detail={"device": str(rng.choice(["port catheter", "pacemaker"]))}
        )
    return Finding(name)


def heart_scale(findings: list[Finding]) -> float:
    return next((f.detail["heart_scale"] for f in findings if f.label == "Cardiomegaly"), 1.0)


@dataclass(frozen=True)
class _Canvas:
    """What a painter draws with: the anatomy (whose label map it paints in
    place), the grid and its mesh, the phantom's random stream, and all the
    phantom's findings (an effusion draws the atelectasis it brings)."""

    anatomy: Anatomy
    grid: Grid
    x: np.ndarray
    y: np.ndarray
    z: np.ndarray
    rng: np.random.Generator
    findings: list[Finding]

    @property
    def labels(self) -> np.ndarray:
        return self.anatomy.labels

    def lobe_mask(self, side: str, lobe: str | None) -> np.ndarray:
        if lobe is None:
            return self.anatomy.lung_side == {"right": 1, "left": 2}[side]
        return self.anatomy.lobe == LOBE_IDS[(side, lobe)]


# A painter draws one finding into the label map and returns what it drew
# that the finding did not say (merged into the drawn finding's detail).
Painter = Callable[[_Canvas, Finding], dict]


def _paint_nodule(c: _Canvas, f: Finding) -> dict:
    aerated = np.isin(c.labels, [L["lung"], L["pulmonary_vessel"], L["emphysema"]])
    r = f.size_mm / 2
    region = shrink(c.lobe_mask(f.side, f.lobe) & aerated, c.grid, r)
    centre = random_point(region, c.rng, c.grid)
    if centre is None:  # lobe too small for this size: any point of the lobe
        centre = random_point(c.lobe_mask(f.side, f.lobe), c.rng, c.grid)
    c.labels[ellipsoid(c.x, c.y, c.z, centre, (r, r, r))] = L["lung_nodule"]
    return {"centre_mm": [float(v) for v in centre]}


EFFUSION_DEPTH_MM = {"small": 18, "moderate": 35, "large": 55}


def _paint_pleural_effusion(c: _Canvas, f: Finding) -> dict:
    """Fluid in the dependent (posterior) pleural space; a compressive
    atelectasis that came with it is the lung band just above the fluid."""
    a, y = c.anatomy, c.y
    compressive = any(g.detail.get("kind") == "compressive" for g in c.findings)
    depth = EFFUSION_DEPTH_MM[f.amount]
    for side in SIDES if f.side == "bilateral" else (f.side,):
        lung = a.lung_side == (1 if side == "right" else 2)
        if not lung.any():
            continue
        floor = float(np.broadcast_to(y, lung.shape)[lung].min())
        c.labels[lung & (y <= floor + depth * a.scale)] = L["pleural_effusion"]
        if compressive:
            band = (
                lung
                & (y > floor + depth * a.scale)
                & (y <= floor + (depth + 8) * a.scale)
                & (c.z < a.carina[2])
            )
            c.labels[band & (c.labels == L["lung"])] = L["atelectasis"]
    return {"thickness_mm": depth}


def _paint_pericardial_effusion(c: _Canvas, f: Finding) -> dict:
    centre, radii = c.anatomy.heart.centre, c.anatomy.heart.radii
    outer = ellipsoid(c.x, c.y, c.z, centre, radii + f.size_mm)
    shell = outer & ~ellipsoid(c.x, c.y, c.z, centre, radii) & (c.labels != L["spine"])
    c.labels[shell & (c.labels != L["aorta"])] = L["pericardial_effusion"]
    return {}


def _paint_blobs(c: _Canvas, f: Finding, value: str, count: int, radii: Callable) -> None:
    """`count` ellipsoids of `radii()` around random points deep in the
    finding's lobe, over the lobe's plain lung."""
    region = c.lobe_mask(f.side, f.lobe)
    blob = np.zeros_like(region)
    for _ in range(count):
        centre = random_point(shrink(region, c.grid, 10), c.rng, c.grid)
        if centre is None:
            centre = random_point(region, c.rng, c.grid)
        if centre is None:
            continue
        blob |= ellipsoid(c.x, c.y, c.z, centre, radii())
    c.labels[blob & region & (c.labels == L["lung"])] = L[value]


def _paint_consolidation(c: _Canvas, f: Finding) -> dict:
    _paint_blobs(c, f, "consolidation", 3, lambda: tuple(c.rng.uniform(15, 28, 3)))
    return {}


def _paint_lung_opacity(c: _Canvas, f: Finding) -> dict:
    _paint_blobs(c, f, "ground_glass_opacity", 3, lambda: tuple(c.rng.uniform(15, 28, 3)))
    return {}


def _paint_atelectasis(c: _Canvas, f: Finding) -> dict:
    if f.detail.get("kind") == "compressive":
        return {}  # drawn with the effusion it belongs to, which knows the fluid level
    u = c.rng.uniform
    # plate-like, posterior-basal
    _paint_blobs(c, f, "atelectasis", 2, lambda: (u(25, 40), u(6, 10), u(8, 14)))
    return {}


EMPHYSEMA_DENSITY = {"mild": 0.25, "moderate": 0.45, "severe": 0.7}


def _paint_emphysema(c: _Canvas, f: Finding) -> dict:
    lobe = c.anatomy.lobe
    upper = (lobe == LOBE_IDS[("right", "upper")]) | (lobe == LOBE_IDS[("left", "upper")])
    holes = c.rng.random(c.labels.shape) < EMPHYSEMA_DENSITY[f.amount] * 0.12
    holes = binary_dilation(holes, iterations=1) & upper & (c.labels == L["lung"])
    c.labels[holes] = L["emphysema"]
    return {}


def _paint_spots(c: _Canvas, where: np.ndarray, fraction: float, value: str) -> None:
    """Small dilated spots on a random `fraction` of `where`, kept inside it."""
    spots = where & (c.rng.random(c.labels.shape) < fraction)
    c.labels[binary_dilation(spots) & where] = L[value]


def _paint_arterial_calcification(c: _Canvas, f: Finding) -> dict:
    points, radius = c.anatomy.aorta.points, c.anatomy.aorta.radius
    wall = tube(c.x, c.y, c.z, points, radius + 2.5) & ~tube(c.x, c.y, c.z, points, radius - 1.0)
    _paint_spots(c, wall, 0.08, "arterial_calcification")
    return {}


def _paint_coronary_calcification(c: _Canvas, f: Finding) -> dict:
    centre, radii = c.anatomy.heart.centre, c.anatomy.heart.radii
    surface = ellipsoid(c.x, c.y, c.z, centre, radii + 3) & ~ellipsoid(
        c.x, c.y, c.z, centre, radii - 3
    )
    # the anterior interventricular and circumflex courses: upper-anterior surface
    course = surface & (c.y > centre[1] + radii[1] * 0.2) & (c.z > centre[2] - radii[2] * 0.1)
    _paint_spots(c, course, 0.05, "coronary_calcification")
    return {}


# Where each lymph node station lies from the carina (mm, before scaling).
STATION_OFFSETS_MM = {
    "subcarinal": (0, -10, -25),
    "right paratracheal": (-18, 0, 20),
    "prevascular": (5, 30, 15),
}


def _paint_lymphadenopathy(c: _Canvas, f: Finding) -> dict:
    a = c.anatomy
    offset = STATION_OFFSETS_MM[f.detail["station"]]
    centre = a.carina + np.array(offset) * np.array([a.scale] * 2 + [a.zscale])
    r = f.size_mm / 2
    node = ellipsoid(c.x, c.y, c.z, centre, (r, r * 0.8, r * 1.2))
    c.labels[node & ~np.isin(c.labels, [L["airway"], L["spine"]])] = L["lymph_node"]
    return {"centre_mm": [float(v) for v in centre]}


def _paint_medical_material(c: _Canvas, f: Finding) -> dict:
    """A device disk in the anterior chest wall with its lead to the heart."""
    a = c.anatomy
    sign = -1 if f.side == "right" else 1
    body_a, body_b = a.body_radii
    device = np.array(
        [
            a.shift[0] + sign * body_a * 0.45,
            a.shift[1] + body_b * 0.72,
            a.carina[2] + 30 * a.zscale,
        ]
    )
    radius = 14 if f.detail["device"] == "pacemaker" else 9
    disk = ellipsoid(c.x, c.y, c.z, device, (radius, 4, radius))
    lead_end = a.heart.centre + np.array([0, 0, a.heart.radii[2] * 0.5])
    lead = tube(c.x, c.y, c.z, np.stack([device, lead_end]).astype(np.float32), 1.5)
    c.labels[disk | lead] = L["medical_material"]
    return {}


def _paint_hiatal_hernia(c: _Canvas, f: Finding) -> dict:
    """The herniated stomach above the hiatus, with its air cap."""
    a = c.anatomy
    centre = np.array([a.shift[0] + 10, a.spine_y + 35 * a.scale, min(a.domes) + 12])
    sac = ellipsoid(c.x, c.y, c.z, centre, (22, 18, 20)) & ~np.isin(
        c.labels, [L["spine"], L["aorta"]]
    )
    c.labels[sac] = L["hiatal_hernia"]
    c.labels[sac & (c.z > centre[2] + 6)] = L["hernia_air"]
    return {}


def _paint_cardiomegaly(c: _Canvas, f: Finding) -> dict:
    return {}  # nothing to paint: the anatomy built the heart larger (`heart_scale`)


# One painter per rendered finding, in the order they are painted: diffuse
# findings first, focal ones and devices last. A later finding may overwrite
# an earlier one's voxels, and a small one must never be erased by a large
# one (the mask has to agree with the labels).
PAINTERS: dict[str, Painter] = {
    "Pleural effusion": _paint_pleural_effusion,
    "Emphysema": _paint_emphysema,
    "Consolidation": _paint_consolidation,
    "Lung opacity": _paint_lung_opacity,
    "Atelectasis": _paint_atelectasis,
    "Cardiomegaly": _paint_cardiomegaly,
    "Pericardial effusion": _paint_pericardial_effusion,
    "Hiatal hernia": _paint_hiatal_hernia,
    "Lymphadenopathy": _paint_lymphadenopathy,
    "Lung nodule": _paint_nodule,
    "Arterial wall calcification": _paint_arterial_calcification,
    "Coronary artery wall calcification": _paint_coronary_calcification,
    "Medical material": _paint_medical_material,
}
PAINT_ORDER = tuple(PAINTERS)


def paint_findings(
    anatomy: Anatomy, findings: list[Finding], grid: Grid, rng: np.random.Generator
) -> list[Finding]:
    """Draw each finding into `anatomy.labels`, in `PAINT_ORDER`; returns the
    findings, in their order, with what was actually drawn filled in (e.g. a
    nodule's centre)."""
    canvas = _Canvas(anatomy, grid, *grid.mesh(), rng, findings)
    drawn = list(findings)
    for i in sorted(range(len(findings)), key=lambda i: PAINT_ORDER.index(findings[i].label)):
        f = findings[i]
        drawn[i] = replace(f, detail={**f.detail, **PAINTERS[f.label](canvas, f)})
    return drawn


__all__ = ["Finding", "heart_scale", "paint_findings", "sample_findings"]
