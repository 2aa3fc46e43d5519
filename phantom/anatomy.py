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

`build_anatomy` draws the structures one function each, in a fixed order:
every phantom's parameters come from one random stream, so the order of the
draws is part of the data set (the same seed must give the same phantom).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from phantom.geometry import Grid, ellipsoid, tube
from phantom.legend import BY_NAME

L = {name: label.value for name, label in BY_NAME.items()}

LOBES = {
    1: ("right", "upper"),
    2: ("right", "middle"),
    3: ("right", "lower"),
    4: ("left", "upper"),
    5: ("left", "lower"),
}
LOBE_IDS = {value: key for key, value in LOBES.items()}


# eq=False: the fields are arrays, which have no single truth value to compare by.
@dataclass(frozen=True, eq=False)
class Heart:
    centre: np.ndarray  # (3,) mm
    radii: np.ndarray  # (3,) mm, the ellipsoid's semi-axes


@dataclass(frozen=True, eq=False)
class Aorta:
    points: np.ndarray  # (N, 3) mm, the centre line
    radius: float  # mm


@dataclass(frozen=True, eq=False)
class Anatomy:
    """A drawn chest: the label map (findings are painted into it in place)
    and the landmarks that findings are placed by."""

    labels: np.ndarray  # (X, Y, Z) uint8 label map
    lung_side: np.ndarray  # (X, Y, Z) int8: 0 outside lungs, 1 right lung, 2 left lung
    lobe: np.ndarray  # (X, Y, Z) uint8: 0 none, 1 RUL, 2 RML, 3 RLL, 4 LUL, 5 LLL
    heart: Heart
    aorta: Aorta
    shift: np.ndarray  # (3,) mm: the body's offset from the centre of the field of view
    body_radii: tuple[float, float]  # mm: the body's semi-axes along x and y
    carina: np.ndarray  # (3,) mm
    spine_y: float  # mm: the vertebral bodies' centre, front to back
    domes: tuple[float, float]  # mm: the z of the right and left diaphragm domes
    scale: float  # in-plane size factor (follows the field of view)
    zscale: float  # cranio-caudal size factor


@dataclass(frozen=True)
class _Frame:
    """The grid's world coordinates and the size factors every structure is
    drawn at; `uniform` draws the next parameter from the phantom's stream."""

    x: np.ndarray
    y: np.ndarray
    z: np.ndarray
    shape: tuple[int, int, int]
    s: float  # anatomy scales with the field of view
    zs: float
    fov_z: float  # mm, half the field of view in z
    rng: np.random.Generator

    def uniform(self, lo: float, hi: float) -> float:
        return float(self.rng.uniform(lo, hi))

    def full(self, mask: np.ndarray) -> np.ndarray:
        """A broadcastable mask at the grid's full shape."""
        return np.broadcast_to(mask, self.shape)


@dataclass(frozen=True)
class _Body:
    shift: np.ndarray
    a: float  # semi-axis along x (mm)
    b: float  # semi-axis along y (mm)
    r: np.ndarray  # elliptic radius, 1 at the skin
    fat_mm: float
    muscle_mm: float
    inside: np.ndarray
    cavity: np.ndarray  # inside the muscle wall

    @property
    def spine_y(self):
        return self.shift[1] - self.b * 0.62


@dataclass(frozen=True)
class _Domes:
    right: float
    left: float
    apex: float  # the lungs' top


def _frame(grid: Grid, rng: np.random.Generator) -> _Frame:
    fov_x = grid.shape[0] * grid.spacing_mm[0] / 2
    fov_z = grid.shape[2] * grid.spacing_mm[2] / 2
    s = min(fov_x / 192.0, 1.6)
    return _Frame(*grid.mesh(), grid.shape, s, fov_z / 160.0, fov_z, rng)


def build_anatomy(grid: Grid, rng: np.random.Generator, *, heart_scale: float = 1.0) -> Anatomy:
    f = _frame(grid, rng)
    labels = np.zeros(grid.shape, dtype=np.uint8)
    body = _draw_body(f, labels)
    lungs, domes = _draw_lungs(f, body, labels)
    _draw_liver(f, body, domes, lungs, labels)
    heart = _draw_heart(f, body, domes, heart_scale, lungs, labels)
    aorta = _draw_aorta(f, body, domes, heart, lungs, labels)
    carina = _draw_airways(f, body, heart, lungs, labels)
    _draw_spine(f, body, lungs, labels)
    _draw_ribs(f, body, domes, labels)
    _draw_vessels(f, carina, lungs, labels)
    return Anatomy(
        labels=labels,
        lung_side=lungs,
        lobe=_lobes(f, body, domes, lungs),
        heart=heart,
        aorta=aorta,
        shift=body.shift,
        body_radii=(body.a, body.b),
        carina=carina,
        spine_y=body.spine_y,
        domes=(domes.right, domes.left),
        scale=f.s,
        zscale=f.zs,
    )


def _draw_body(f: _Frame, labels: np.ndarray) -> _Body:
    """An elliptic cylinder, flattened posteriorly, slightly tapering up:
    subcutaneous fat, the muscle wall, and mediastinal fat inside."""
    x, y, z, s, zs, u = f.x, f.y, f.z, f.s, f.zs, f.uniform
    shift = np.array([u(-6, 6) * s, u(-8, 4) * s, u(-8, 8) * zs])
    body_a, body_b = u(150, 175) * s, u(105, 125) * s
    taper = 1.0 - 0.10 * np.clip((z - shift[2]) / (160 * zs), -1, 1)
    bx, by = (x - shift[0]) / (body_a * taper), (y - shift[1]) / (body_b * taper)
    body_r = np.sqrt(bx**2 + by**2 * np.where(y < shift[1], 1.15, 1.0))
    fat_mm = u(8, 22) * s
    muscle_mm = u(8, 14) * s
    inside = body_r <= 1.0
    labels[f.full(inside)] = L["subcutaneous_fat"]
    labels[f.full(body_r <= 1.0 - fat_mm / body_a)] = L["muscle"]
    cavity = body_r <= 1.0 - (fat_mm + muscle_mm) / body_a
    labels[f.full(cavity)] = L["mediastinum"]
    return _Body(shift, body_a, body_b, body_r, fat_mm, muscle_mm, inside, cavity)


def _draw_lungs(f: _Frame, body: _Body, labels: np.ndarray) -> tuple[np.ndarray, _Domes]:
    """Diaphragm domes (right higher), the lungs above them, and the upper
    abdomen's soft tissue below; returns the lung sides and the domes."""
    x, y, z, s, zs, u = f.x, f.y, f.z, f.s, f.zs, f.uniform
    shift = body.shift
    dome_r = shift[2] + u(-95, -75) * zs
    dome_l = dome_r - u(10, 25) * zs
    apex = shift[2] + u(115, 140) * zs
    lung_a, lung_b = u(62, 72) * s, u(80, 92) * s
    gap = u(28, 38) * s  # half-width of the mediastinum between lungs
    lungs = np.zeros(f.shape, dtype=np.int8)
    for side, sign, dome in ((1, -1.0, dome_r), (2, 1.0, dome_l)):
        cx = shift[0] + sign * (gap + lung_a)
        cy = shift[1] - u(5, 12) * s
        height = (apex - dome) / 2
        cz = dome + height
        # dome-shaped base: the diaphragm rises towards the lung's centre
        base = dome + 25 * zs * (1 - ((x - cx) / lung_a) ** 2 - ((y - cy) / lung_b) ** 2).clip(0, 1)
        ell = ellipsoid(x, y, z, (cx, cy, cz), (lung_a, lung_b, height * 1.05))
        lungs[ell & (z >= base) & f.full(body.cavity)] = side
    labels[lungs > 0] = L["lung"]
    # below the domes: upper abdomen (soft tissue), not mediastinal fat
    abdomen = (
        f.full(body.cavity) & (z < np.where(x < shift[0], dome_r, dome_l) + 5 * zs) & (lungs == 0)
    )
    labels[abdomen] = L["muscle"]
    return lungs, _Domes(dome_r, dome_l, apex)


def _draw_liver(
    f: _Frame, body: _Body, domes: _Domes, lungs: np.ndarray, labels: np.ndarray
) -> None:
    """Under the right dome, filling the right upper abdomen."""
    x, y, z, s, zs, shift = f.x, f.y, f.z, f.s, f.zs, body.shift
    liver = (
        f.full(body.cavity) & (z < domes.right + 10 * zs) & (x < shift[0] + 40 * s) & (lungs == 0)
    )
    liver &= ellipsoid(
        x, y, z, (shift[0] - 40 * s, shift[1], domes.right - 40 * zs), (120 * s, 100 * s, 75 * zs)
    )
    labels[liver] = L["liver"]


def _draw_heart(
    f: _Frame,
    body: _Body,
    domes: _Domes,
    heart_scale: float,
    lungs: np.ndarray,
    labels: np.ndarray,
) -> Heart:
    """Anterior, left of midline, resting on the left dome."""
    s, zs, u, shift = f.s, f.zs, f.uniform, body.shift
    radii = np.array([u(52, 62) * s, u(42, 50) * s, u(48, 58) * zs]) * heart_scale
    centre = np.array(
        [shift[0] + u(12, 22) * s, shift[1] + u(8, 20) * s, domes.left + radii[2] * 0.85]
    )
    heart = ellipsoid(f.x, f.y, f.z, centre, radii) & f.full(body.cavity)
    labels[heart] = L["heart"]
    lungs[heart] = 0
    return Heart(centre, radii)


def _draw_aorta(
    f: _Frame, body: _Body, domes: _Domes, heart: Heart, lungs: np.ndarray, labels: np.ndarray
) -> Aorta:
    """Ascending from the heart, the arch, descending left of the spine."""
    s, zs, u, shift, spine_y = f.s, f.zs, f.uniform, body.shift, body.spine_y
    radius = u(11, 15) * s
    centre = heart.centre
    top = min(centre[2] + heart.radii[2] + u(25, 40) * zs, domes.apex - 20 * zs)
    points = np.array(
        [
            [centre[0] - 10 * s, centre[1] + 5 * s, centre[2] + 10 * zs],
            [shift[0] + 8 * s, shift[1] + 10 * s, top - 15 * zs],
            [shift[0] + 2 * s, shift[1] - 5 * s, top],
            [shift[0] + 18 * s, spine_y + 30 * s, top - 15 * zs],
            [shift[0] + 22 * s, spine_y + 28 * s, centre[2]],
            [shift[0] + 18 * s, spine_y + 30 * s, domes.left - 40 * zs],
        ],
        dtype=np.float32,
    )
    aorta = tube(f.x, f.y, f.z, points, radius)
    labels[aorta] = L["aorta"]
    lungs[aorta] = 0
    return Aorta(points, radius)


def _draw_airways(
    f: _Frame, body: _Body, heart: Heart, lungs: np.ndarray, labels: np.ndarray
) -> np.ndarray:
    """Trachea and main bronchi with a soft tissue wall; returns the carina
    (above the heart)."""
    x, y, z, s, zs, u, shift = f.x, f.y, f.z, f.s, f.zs, f.uniform, body.shift
    carina = np.array(
        [shift[0], shift[1] - 5 * s, heart.centre[2] + heart.radii[2] + u(5, 15) * zs]
    )
    trachea = np.array([[shift[0], shift[1] + 5 * s, f.fov_z + 10], carina], dtype=np.float32)
    r_tr = u(8, 10) * s
    airway = tube(x, y, z, trachea, r_tr)
    for sign in (-1, 1):
        end = carina + np.array([sign * u(35, 45) * s, -u(5, 12) * s, -u(25, 35) * zs])
        airway |= tube(x, y, z, np.stack([carina, end]).astype(np.float32), r_tr * 0.75)
    wall = tube(x, y, z, trachea, r_tr + 2.5 * s) & ~airway
    labels[wall & (labels != L["aorta"])] = L["muscle"]
    labels[airway] = L["airway"]
    lungs[airway | wall] = 0
    return carina


def _draw_spine(f: _Frame, body: _Body, lungs: np.ndarray, labels: np.ndarray) -> None:
    """The vertebral column, posterior midline, with intervertebral discs."""
    x, y, z, s, zs, u = f.x, f.y, f.z, f.s, f.zs, f.uniform
    spine_c = np.array([body.shift[0], body.spine_y])
    spine = ((x - spine_c[0]) ** 2 + ((y - spine_c[1]) / 1.1) ** 2) <= (u(17, 21) * s) ** 2
    spine = f.full(spine) & f.full(body.inside)
    disc_period, disc_mm = u(26, 32) * zs, u(4, 6) * zs
    discs = ((z - body.shift[2]) % disc_period) < disc_mm  # between the vertebral bodies
    labels[spine] = L["spine"]
    labels[spine & f.full(discs)] = L["muscle"]
    lungs[spine] = 0


def _draw_ribs(f: _Frame, body: _Body, domes: _Domes, labels: np.ndarray) -> None:
    """Arcs along the inner body wall every ~28 mm in z, running down anteriorly."""
    y, z, zs, u = f.y, f.z, f.zs, f.uniform
    rib_gap = u(26, 32) * zs
    rib_zs = np.arange(domes.right - 30 * zs, domes.apex + 10 * zs, rib_gap)
    ring = (body.r > 1.0 - (body.fat_mm + body.muscle_mm * 0.9) / body.a) & (
        body.r < 1.0 - body.fat_mm / body.a
    )
    thick = u(5, 7) * zs
    slope = 0.25
    for rz in rib_zs:
        band = np.abs(z - (rz - slope * (y - body.spine_y))) <= thick
        labels[f.full(ring) & band & f.full(body.inside)] = L["rib"]


def _draw_vessels(f: _Frame, carina: np.ndarray, lungs: np.ndarray, labels: np.ndarray) -> None:
    """Pulmonary vessels: branching tubes from each hilum, thinning outwards."""
    s, zs, u, rng = f.s, f.zs, f.uniform, f.rng
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
            vessel = tube(f.x, f.y, f.z, np.array(pts, dtype=np.float32), radius) & (lungs == side)
            labels[vessel] = L["pulmonary_vessel"]


def _lobes(f: _Frame, body: _Body, domes: _Domes, lungs: np.ndarray) -> np.ndarray:
    """Oblique fissures (higher posteriorly) and the right horizontal fissure."""
    lobe = np.zeros(f.shape, dtype=np.uint8)
    mid = (domes.apex + min(domes.right, domes.left)) / 2
    oblique = f.z - (mid - 0.7 * (f.y - body.shift[1]) - 10 * f.zs)
    horizontal = f.z - (mid + 15 * f.zs)
    right, left = lungs == 1, lungs == 2
    lobe[right & (oblique < 0)] = LOBE_IDS[("right", "lower")]
    lobe[right & (oblique >= 0) & (horizontal < 0)] = LOBE_IDS[("right", "middle")]
    lobe[right & (oblique >= 0) & (horizontal >= 0)] = LOBE_IDS[("right", "upper")]
    lobe[left & (oblique < 0)] = LOBE_IDS[("left", "lower")]
    lobe[left & (oblique >= 0)] = LOBE_IDS[("left", "upper")]
    return lobe
