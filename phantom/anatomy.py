"""Procedural chest anatomy as a label map on a voxel grid.

World coordinates are millimetres from the centre of the field of view in
RAS+: x to the patient's Left, y Anterior, z Superior (arrays are `[x, y, z]`,
docs/conventions.md). Every structure is a closed-form shape (ellipsoids,
swept tubes, smooth surfaces) whose parameters are drawn per phantom, so
size, shape and position vary naturally between phantoms while staying
anatomically ordered: body wall (skin/fat, muscle), lungs with their lobes,
heart, aorta (ascending, arch, descending), trachea and main bronchi, spine,
ribs, diaphragm domes (right higher) and the liver dome under the right one,
and branching pulmonary vessels inside the lungs.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np

from phantom.legend import BY_NAME

L = {name: label.value for name, label in BY_NAME.items()}


@dataclass(frozen=True)
class Grid:
    shape: tuple[int, int, int]  # (X, Y, Z)
    spacing_mm: tuple[float, float, float]

    def axes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """1-D world coordinates (mm) of voxel centres along x, y, z."""
        return tuple(
            ((np.arange(n, dtype=np.float32) - (n - 1) / 2) * s)
            for n, s in zip(self.shape, self.spacing_mm, strict=True)
        )

    def mesh(self):
        x, y, z = self.axes()
        return x[:, None, None], y[None, :, None], z[None, None, :]  # broadcastable


@dataclass
class Anatomy:
    labels: np.ndarray  # (X, Y, Z) uint8 label map
    lung_side: np.ndarray  # (X, Y, Z) int8: 0 outside lungs, 1 right lung, 2 left lung
    lobe: np.ndarray  # (X, Y, Z) uint8: 0 none, 1 RUL, 2 RML, 3 RLL, 4 LUL, 5 LLL
    heart: dict = field(default_factory=dict)  # centre (mm), radii (mm)
    aorta: dict = field(default_factory=dict)  # path points (mm), radius
    params: dict = field(default_factory=dict)


LOBES = {
    1: ("right", "upper"),
    2: ("right", "middle"),
    3: ("right", "lower"),
    4: ("left", "upper"),
    5: ("left", "lower"),
}
LOBE_IDS = {value: key for key, value in LOBES.items()}


def _ellipsoid(x, y, z, centre, radii) -> np.ndarray:
    return (
        ((x - centre[0]) / radii[0]) ** 2
        + ((y - centre[1]) / radii[1]) ** 2
        + ((z - centre[2]) / radii[2]) ** 2
    ) <= 1.0


def _tube(x, y, z, points: np.ndarray, radius: float) -> np.ndarray:
    """Voxels within `radius` of a polyline (points (N, 3) mm)."""
    mask = np.zeros(np.broadcast_shapes(x.shape, y.shape, z.shape), dtype=bool)
    for a, b in itertools.pairwise(points):
        lo, hi = np.minimum(a, b) - radius, np.maximum(a, b) + radius
        sel = (slice(None),) * 3
        # Restrict work to the segment's bounding box.
        ix = np.where((x[:, 0, 0] >= lo[0]) & (x[:, 0, 0] <= hi[0]))[0]
        iy = np.where((y[0, :, 0] >= lo[1]) & (y[0, :, 0] <= hi[1]))[0]
        iz = np.where((z[0, 0, :] >= lo[2]) & (z[0, 0, :] <= hi[2]))[0]
        if not (len(ix) and len(iy) and len(iz)):
            continue
        sel = (slice(ix[0], ix[-1] + 1), slice(iy[0], iy[-1] + 1), slice(iz[0], iz[-1] + 1))
        px, py, pz = x[sel[0], :, :], y[:, sel[1], :], z[:, :, sel[2]]
        d = b - a
        length2 = float(d @ d) or 1e-6
        t = np.clip(((px - a[0]) * d[0] + (py - a[1]) * d[1] + (pz - a[2]) * d[2]) / length2, 0, 1)
        dist2 = (
            (px - a[0] - t * d[0]) ** 2 + (py - a[1] - t * d[1]) ** 2 + (pz - a[2] - t * d[2]) ** 2
        )
        mask[sel] |= dist2 <= radius**2
    return mask


def build_anatomy(grid: Grid, rng: np.random.Generator, *, heart_scale: float = 1.0) -> Anatomy:
    x, y, z = grid.mesh()
    shape = grid.shape
    fov_x = grid.shape[0] * grid.spacing_mm[0] / 2
    fov_z = grid.shape[2] * grid.spacing_mm[2] / 2
    s = min(fov_x / 192.0, 1.6)  # anatomy scales with the field of view
    zs = fov_z / 160.0
    u = lambda lo, hi: float(rng.uniform(lo, hi))  # noqa: E731

    # --- body: an elliptic cylinder, flattened posteriorly, slightly tapering up
    shift = np.array([u(-6, 6) * s, u(-8, 4) * s, u(-8, 8) * zs])
    body_a, body_b = u(150, 175) * s, u(105, 125) * s
    taper = 1.0 - 0.10 * np.clip((z - shift[2]) / (160 * zs), -1, 1)
    bx, by = (x - shift[0]) / (body_a * taper), (y - shift[1]) / (body_b * taper)
    body_r = np.sqrt(bx**2 + by**2 * np.where(y < shift[1], 1.15, 1.0))
    fat_mm = u(8, 22) * s
    muscle_mm = u(8, 14) * s
    body = body_r <= 1.0
    labels = np.zeros(shape, dtype=np.uint8)
    labels[np.broadcast_to(body, shape)] = L["subcutaneous_fat"]
    inner_fat = body_r <= 1.0 - fat_mm / body_a
    labels[np.broadcast_to(inner_fat, shape)] = L["muscle"]
    cavity = body_r <= 1.0 - (fat_mm + muscle_mm) / body_a
    labels[np.broadcast_to(cavity, shape)] = L["mediastinum"]

    # --- diaphragm domes (right higher) and lungs
    dome_r = shift[2] + u(-95, -75) * zs
    dome_l = dome_r - u(10, 25) * zs
    apex = shift[2] + u(115, 140) * zs
    lung_a, lung_b = u(62, 72) * s, u(80, 92) * s
    gap = u(28, 38) * s  # half-width of the mediastinum between lungs
    lungs = np.zeros(shape, dtype=np.int8)
    for side, sign, dome in ((1, -1.0, dome_r), (2, 1.0, dome_l)):
        cx = shift[0] + sign * (gap + lung_a)
        cy = shift[1] - u(5, 12) * s
        height = (apex - dome) / 2
        cz = dome + height
        # dome-shaped base: the diaphragm rises towards the lung's centre
        base = dome + 25 * zs * (1 - ((x - cx) / lung_a) ** 2 - ((y - cy) / lung_b) ** 2).clip(0, 1)
        ell = _ellipsoid(x, y, z, (cx, cy, cz), (lung_a, lung_b, height * 1.05))
        lung = ell & (z >= base) & np.broadcast_to(cavity, shape)
        lungs[lung] = side
    labels[lungs > 0] = L["lung"]
    # below the domes: upper abdomen (soft tissue), not mediastinal fat
    abdomen = (
        np.broadcast_to(cavity, shape)
        & (z < np.where(x < shift[0], dome_r, dome_l) + 5 * zs)
        & (lungs == 0)
    )
    labels[abdomen] = L["muscle"]

    # --- liver under the right dome, filling the right upper abdomen
    liver = (
        np.broadcast_to(cavity, shape)
        & (z < dome_r + 10 * zs)
        & (x < shift[0] + 40 * s)
        & (lungs == 0)
    )
    liver &= _ellipsoid(
        x, y, z, (shift[0] - 40 * s, shift[1], dome_r - 40 * zs), (120 * s, 100 * s, 75 * zs)
    )
    labels[liver] = L["liver"]

    # --- heart: anterior, left of midline, resting on the left dome
    heart_radii = np.array([u(52, 62) * s, u(42, 50) * s, u(48, 58) * zs]) * heart_scale
    heart_centre = np.array(
        [shift[0] + u(12, 22) * s, shift[1] + u(8, 20) * s, dome_l + heart_radii[2] * 0.85]
    )
    heart = _ellipsoid(x, y, z, heart_centre, heart_radii) & np.broadcast_to(cavity, shape)
    labels[heart] = L["heart"]
    lungs[heart] = 0

    # --- aorta: ascending from the heart, arch, descending left of the spine
    r_ao = u(11, 15) * s
    top = min(heart_centre[2] + heart_radii[2] + u(25, 40) * zs, apex - 20 * zs)
    spine_y = shift[1] - body_b * 0.62
    aorta_pts = np.array(
        [
            [heart_centre[0] - 10 * s, heart_centre[1] + 5 * s, heart_centre[2] + 10 * zs],
            [shift[0] + 8 * s, shift[1] + 10 * s, top - 15 * zs],
            [shift[0] + 2 * s, shift[1] - 5 * s, top],
            [shift[0] + 18 * s, spine_y + 30 * s, top - 15 * zs],
            [shift[0] + 22 * s, spine_y + 28 * s, heart_centre[2]],
            [shift[0] + 18 * s, spine_y + 30 * s, dome_l - 40 * zs],
        ],
        dtype=np.float32,
    )
    aorta = _tube(x, y, z, aorta_pts, r_ao)
    labels[aorta] = L["aorta"]
    lungs[aorta] = 0

    # --- trachea and main bronchi (carina above the heart)
    carina = np.array(
        [shift[0], shift[1] - 5 * s, heart_centre[2] + heart_radii[2] + u(5, 15) * zs]
    )
    trachea = np.array([[shift[0], shift[1] + 5 * s, fov_z + 10], carina], dtype=np.float32)
    r_tr = u(8, 10) * s
    airway = _tube(x, y, z, trachea, r_tr)
    for sign in (-1, 1):
        end = carina + np.array([sign * u(35, 45) * s, -u(5, 12) * s, -u(25, 35) * zs])
        airway |= _tube(x, y, z, np.stack([carina, end]).astype(np.float32), r_tr * 0.75)
    wall = _tube(x, y, z, trachea, r_tr + 2.5 * s) & ~airway
    labels[wall & (labels != L["aorta"])] = L["muscle"]
    labels[airway] = L["airway"]
    lungs[airway | wall] = 0

    # --- spine: vertebral column posterior midline (bodies + canal)
    spine_c = np.array([shift[0], spine_y])
    spine = ((x - spine_c[0]) ** 2 + ((y - spine_c[1]) / 1.1) ** 2) <= (u(17, 21) * s) ** 2
    spine = np.broadcast_to(spine, shape) & np.broadcast_to(body, shape)
    disc_period, disc_mm = u(26, 32) * zs, u(4, 6) * zs
    discs = ((z - shift[2]) % disc_period) < disc_mm  # intervertebral discs between bodies
    labels[spine] = L["spine"]
    labels[spine & np.broadcast_to(discs, shape)] = L["muscle"]
    lungs[spine] = 0

    # --- ribs: arcs along the inner body wall every ~28 mm in z
    rib_gap = u(26, 32) * zs
    rib_zs = np.arange(dome_r - 30 * zs, apex + 10 * zs, rib_gap)
    rib_ring = (body_r > 1.0 - (fat_mm + muscle_mm * 0.9) / body_a) & (
        body_r < 1.0 - fat_mm / body_a
    )
    rib_thick = u(5, 7) * zs
    slope = 0.25  # ribs run down anteriorly
    for rz in rib_zs:
        band = np.abs(z - (rz - slope * (y - spine_y))) <= rib_thick
        labels[np.broadcast_to(rib_ring, shape) & band & np.broadcast_to(body, shape)] = L["rib"]

    # --- pulmonary vessels: branching tubes from each hilum, thinning outwards
    for side, sign in ((1, -1.0), (2, 1.0)):
        hilum = carina + np.array([sign * 40 * s, -5 * s, -30 * zs])
        for _ in range(7):
            direction = np.array([sign * u(0.2, 1.0), u(-0.8, 0.8), u(-0.9, 0.9)])
            direction /= np.linalg.norm(direction)
            pts = [hilum]
            radius = u(3.5, 5.0) * s
            for _step in range(4):
                direction = direction + rng.normal(0, 0.25, 3)
                direction /= np.linalg.norm(direction)
                pts.append(pts[-1] + direction * u(25, 40) * s)
            vessel = _tube(x, y, z, np.array(pts, dtype=np.float32), radius) & (lungs == side)
            labels[vessel] = L["pulmonary_vessel"]

    # --- lobes: oblique fissures (higher posteriorly), right horizontal fissure
    lobe = np.zeros(shape, dtype=np.uint8)
    mid = (apex + min(dome_r, dome_l)) / 2
    oblique = z - (mid - 0.7 * (y - shift[1]) - 10 * zs)
    horizontal = z - (mid + 15 * zs)
    right, left = lungs == 1, lungs == 2
    lobe[right & (oblique < 0)] = LOBE_IDS[("right", "lower")]
    lobe[right & (oblique >= 0) & (horizontal < 0)] = LOBE_IDS[("right", "middle")]
    lobe[right & (oblique >= 0) & (horizontal >= 0)] = LOBE_IDS[("right", "upper")]
    lobe[left & (oblique < 0)] = LOBE_IDS[("left", "lower")]
    lobe[left & (oblique >= 0)] = LOBE_IDS[("left", "upper")]

    return Anatomy(
        labels=labels,
        lung_side=lungs,
        lobe=lobe,
        heart={"centre": heart_centre, "radii": heart_radii},
        aorta={"points": aorta_pts, "radius": r_ao},
        params={
            "shift": shift,
            "body": (body_a, body_b),
            "carina": carina,
            "spine_y": spine_y,
            "scale": s,
            "zscale": zs,
            "dome": (dome_r, dome_l),
            "apex": apex,
            "thorax_width_mm": 2 * (body_a - fat_mm - muscle_mm),
        },
    )
