"""Findings: drawn per phantom from the CT-RATE labels, described by a small
typed record that both the renderer and the report writer read (so the
report cannot contradict the image), and painted into the label map.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from phantom.anatomy import LOBE_IDS, LOBES, Anatomy, Grid, _ellipsoid, _tube
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


PAINT_ORDER = (
    "Pleural effusion",
    "Emphysema",
    "Consolidation",
    "Lung opacity",
    "Atelectasis",
    "Cardiomegaly",
    "Pericardial effusion",
    "Hiatal hernia",
    "Lymphadenopathy",
    "Lung nodule",
    "Arterial wall calcification",
    "Coronary artery wall calcification",
    "Medical material",
)


def heart_scale(findings: list[Finding]) -> float:
    return next((f.detail["heart_scale"] for f in findings if f.label == "Cardiomegaly"), 1.0)


def _lobe_mask(anatomy: Anatomy, side: str, lobe: str | None) -> np.ndarray:
    sides = {"right": 1, "left": 2}
    if lobe is None:
        return anatomy.lung_side == sides[side]
    return anatomy.lobe == LOBE_IDS[(side, lobe)]


def _random_point(mask: np.ndarray, rng: np.random.Generator, grid: Grid) -> np.ndarray | None:
    index = np.flatnonzero(mask)
    if not len(index):
        return None
    ijk = np.array(np.unravel_index(index[rng.integers(len(index))], mask.shape))
    axes = grid.axes()
    return np.array([axes[d][ijk[d]] for d in range(3)], dtype=np.float32)


def _shrink(mask: np.ndarray, grid: Grid, mm: float) -> np.ndarray:
    from scipy.ndimage import binary_erosion

    iterations = max(1, round(mm / max(grid.spacing_mm)))
    return binary_erosion(mask, iterations=iterations)


def paint_findings(
    anatomy: Anatomy, findings: list[Finding], grid: Grid, rng: np.random.Generator
) -> list[Finding]:
    """Draw each finding into `anatomy.labels`; returns the findings with
    what was actually drawn filled in (e.g. a nodule's centre)."""
    x, y, z = grid.mesh()
    labels = anatomy.labels
    lungs = anatomy.lung_side > 0
    drawn, painted = [], []
    # Diffuse findings first, focal ones and devices last: a later finding
    # may overwrite an earlier one's voxels, and a small one must never be
    # erased by a large one (the mask has to agree with the labels).
    for finding in sorted(findings, key=lambda f: PAINT_ORDER.index(f.label)):
        detail = dict(finding.detail)
        name = finding.label
        if name == "Lung nodule":
            aerated = np.isin(labels, [L["lung"], L["pulmonary_vessel"], L["emphysema"]])
            region = _shrink(
                _lobe_mask(anatomy, finding.side, finding.lobe) & aerated,
                grid,
                finding.size_mm / 2,
            )
            centre = _random_point(region, rng, grid)
            if centre is None:  # lobe too small for this size: take the lobe's deepest point
                centre = _random_point(_lobe_mask(anatomy, finding.side, finding.lobe), rng, grid)
            r = finding.size_mm / 2
            nodule = _ellipsoid(x, y, z, centre, (r, r, r))
            labels[nodule] = L["lung_nodule"]
            detail["centre_mm"] = [float(v) for v in centre]
        elif name == "Pleural effusion":
            compressive = any(f.detail.get("kind") == "compressive" for f in findings)
            depth = {"small": 18, "moderate": 35, "large": 55}[finding.amount]
            sides = SIDES if finding.side == "bilateral" else (finding.side,)
            for side in sides:
                lung = anatomy.lung_side == (1 if side == "right" else 2)
                if not lung.any():
                    continue
                ys = np.broadcast_to(y, lung.shape)[lung]
                floor = float(ys.min())
                fluid = lung & (y <= floor + depth * anatomy.params["scale"])
                labels[fluid] = L["pleural_effusion"]
                if compressive:  # the lung band just above the fluid collapses
                    band = (
                        lung
                        & (y > floor + depth * anatomy.params["scale"])
                        & (y <= floor + (depth + 8) * anatomy.params["scale"])
                        & (z < anatomy.params["carina"][2])
                    )
                    labels[band & (labels == L["lung"])] = L["atelectasis"]
            detail["thickness_mm"] = depth
        elif name == "Pericardial effusion":
            c, radii = anatomy.heart["centre"], anatomy.heart["radii"]
            outer = _ellipsoid(x, y, z, c, radii + finding.size_mm)
            shell = outer & ~_ellipsoid(x, y, z, c, radii) & (labels != L["spine"])
            labels[shell & (labels != L["aorta"])] = L["pericardial_effusion"]
        elif finding.detail.get("kind") == "compressive":
            pass  # drawn with the effusion it belongs to, which knows the fluid level
        elif name in {"Consolidation", "Lung opacity", "Atelectasis"}:
            region = _lobe_mask(anatomy, finding.side, finding.lobe)
            value = {
                "Consolidation": "consolidation",
                "Lung opacity": "ground_glass_opacity",
                "Atelectasis": "atelectasis",
            }[name]
            blob = np.zeros_like(region)
            for _ in range(3 if name != "Atelectasis" else 2):
                centre = _random_point(_shrink(region, grid, 10), rng, grid)
                if centre is None:
                    centre = _random_point(region, rng, grid)
                if centre is None:
                    continue
                if name == "Atelectasis":  # plate-like, posterior-basal
                    radii = (rng.uniform(25, 40), rng.uniform(6, 10), rng.uniform(8, 14))
                else:
                    radii = tuple(rng.uniform(15, 28, 3))
                blob |= _ellipsoid(x, y, z, centre, radii)
            labels[blob & region & (labels == L["lung"])] = L[value]
        elif name == "Emphysema":
            upper = (anatomy.lobe == LOBE_IDS[("right", "upper")]) | (
                anatomy.lobe == LOBE_IDS[("left", "upper")]
            )
            density = {"mild": 0.25, "moderate": 0.45, "severe": 0.7}[finding.amount]
            holes = rng.random(labels.shape) < density * 0.12
            from scipy.ndimage import binary_dilation

            holes = binary_dilation(holes, iterations=1) & upper & (labels == L["lung"])
            labels[holes] = L["emphysema"]
        elif name == "Arterial wall calcification":
            wall = _tube(x, y, z, anatomy.aorta["points"], anatomy.aorta["radius"] + 2.5) & ~_tube(
                x, y, z, anatomy.aorta["points"], anatomy.aorta["radius"] - 1.0
            )
            plaques = wall & (rng.random(labels.shape) < 0.08)
            from scipy.ndimage import binary_dilation

            labels[binary_dilation(plaques) & wall] = L["arterial_calcification"]
        elif name == "Coronary artery wall calcification":
            c, radii = anatomy.heart["centre"], anatomy.heart["radii"]
            surface = _ellipsoid(x, y, z, c, radii + 3) & ~_ellipsoid(x, y, z, c, radii - 3)
            # the anterior interventricular and circumflex courses: upper-anterior surface
            course = surface & (y > c[1] + radii[1] * 0.2) & (z > c[2] - radii[2] * 0.1)
            spots = course & (rng.random(labels.shape) < 0.05)
            from scipy.ndimage import binary_dilation

            labels[binary_dilation(spots) & course] = L["coronary_calcification"]
        elif name == "Lymphadenopathy":
            carina = anatomy.params["carina"]
            offset = {
                "subcarinal": (0, -10, -25),
                "right paratracheal": (-18, 0, 20),
                "prevascular": (5, 30, 15),
            }[detail["station"]]
            centre = carina + np.array(offset) * np.array(
                [anatomy.params["scale"]] * 2 + [anatomy.params["zscale"]]
            )
            r = finding.size_mm / 2
            node = _ellipsoid(x, y, z, centre, (r, r * 0.8, r * 1.2))
            labels[node & ~np.isin(labels, [L["airway"], L["spine"]])] = L["lymph_node"]
            detail["centre_mm"] = [float(v) for v in centre]
        elif name == "Medical material":
            sign = -1 if finding.side == "right" else 1
            body_a, body_b = anatomy.params["body"]
            shift = anatomy.params["shift"]
            device = np.array(
                [
                    shift[0] + sign * body_a * 0.45,
                    shift[1] + body_b * 0.72,
                    anatomy.params["carina"][2] + 30 * anatomy.params["zscale"],
                ]
            )
            radius = 14 if detail["device"] == "pacemaker" else 9
            disk = _ellipsoid(x, y, z, device, (radius, 4, radius))
            lead_end = anatomy.heart["centre"] + np.array([0, 0, anatomy.heart["radii"][2] * 0.5])
            lead = _tube(x, y, z, np.stack([device, lead_end]).astype(np.float32), 1.5)
            labels[disk | lead] = L["medical_material"]
        elif name == "Hiatal hernia":
            shift, dome = anatomy.params["shift"], min(anatomy.params["dome"])
            centre = np.array(
                [shift[0] + 10, anatomy.params["spine_y"] + 35 * anatomy.params["scale"], dome + 12]
            )
            sac = _ellipsoid(x, y, z, centre, (22, 18, 20)) & ~np.isin(
                labels, [L["spine"], L["aorta"]]
            )
            labels[sac] = L["hiatal_hernia"]
            labels[sac & (z > centre[2] + 6)] = L[
                "hernia_air"
            ]  # the air cap of the herniated stomach
        painted.append(finding)
        drawn.append(
            Finding(
                finding.label, finding.side, finding.lobe, finding.size_mm, finding.amount, detail
            )
        )
    del lungs
    order = {id(f): i for i, f in enumerate(findings)}
    return [d for _, d in sorted(zip(painted, drawn, strict=True), key=lambda p: order[id(p[0])])]


def lobe_name(side: str, lobe: str) -> str:
    return f"{side} {lobe} lobe"


__all__ = ["LOBES", "Finding", "heart_scale", "lobe_name", "paint_findings", "sample_findings"]
