"""The voxel grid and the closed-form shapes the phantom world is drawn with.

World coordinates are millimetres from the centre of the field of view in
RAS+: x to the patient's Left, y Anterior, z Superior (arrays are `[x, y, z]`,
docs/conventions.md). Shapes take the broadcastable mesh of `Grid.mesh()` and
return boolean masks.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import binary_erosion


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


def ellipsoid(x, y, z, centre, radii) -> np.ndarray:
    """Voxels inside the axis-aligned ellipsoid (centre, radii in mm)."""
    return (
        ((x - centre[0]) / radii[0]) ** 2
        + ((y - centre[1]) / radii[1]) ** 2
        + ((z - centre[2]) / radii[2]) ** 2
    ) <= 1.0


def tube(x, y, z, points: np.ndarray, radius: float) -> np.ndarray:
    """Voxels within `radius` of a polyline (points (N, 3) mm)."""
    mask = np.zeros(np.broadcast_shapes(x.shape, y.shape, z.shape), dtype=bool)
    for a, b in itertools.pairwise(points):
        lo, hi = np.minimum(a, b) - radius, np.maximum(a, b) + radius
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


def random_point(mask: np.ndarray, rng: np.random.Generator, grid: Grid) -> np.ndarray | None:
    """The world position (mm) of a voxel of `mask` drawn uniformly; None,
    without drawing, when the mask is empty."""
    index = np.flatnonzero(mask)
    if not len(index):
        return None
    ijk = np.array(np.unravel_index(index[rng.integers(len(index))], mask.shape))
    axes = grid.axes()
    return np.array([axes[d][ijk[d]] for d in range(3)], dtype=np.float32)


def shrink(mask: np.ndarray, grid: Grid, mm: float) -> np.ndarray:
    """`mask` eroded by about `mm` (at least one voxel)."""
    iterations = max(1, round(mm / max(grid.spacing_mm)))
    return binary_erosion(mask, iterations=iterations)
