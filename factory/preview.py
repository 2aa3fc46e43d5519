"""Preview PNGs: axial, coronal and sagittal mid-slices in the lung and the
mediastinal window, drawn with the voxel spacing as aspect ratio."""

from __future__ import annotations

import io

import numpy as np

WINDOWS = {"lung": (-600.0, 1500.0), "mediastinal": (40.0, 400.0)}  # (level, width) HU


def render_preview(volume_xyz: np.ndarray, spacing_mm, *, title: str = "") -> bytes:
    """PNG bytes of a 2x3 grid: windows (rows) x planes (columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vol = np.asarray(volume_xyz, dtype=np.float32)
    sx, sy, sz = (float(v) for v in spacing_mm)
    cx, cy, cz = (n // 2 for n in vol.shape)
    # Radiological display: patient's right on the image's left, anterior up,
    # superior up (arrays are RAS+, docs/conventions.md).
    planes = {
        "axial": (np.flipud(vol[:, :, cz].T), sy / sx),
        "coronal": (np.flipud(vol[:, cy, :].T), sz / sx),
        "sagittal": (np.flipud(vol[cx, :, :].T), sz / sy),
    }
    fig, axes = plt.subplots(2, 3, figsize=(9, 6.4), facecolor="black")
    for row, (window, (level, width)) in enumerate(WINDOWS.items()):
        for col, (plane, (image, aspect)) in enumerate(planes.items()):
            ax = axes[row, col]
            ax.imshow(
                image,
                cmap="gray",
                vmin=level - width / 2,
                vmax=level + width / 2,
                aspect=aspect,
                interpolation="nearest",
            )
            ax.set_axis_off()
            ax.set_title(f"{plane} · {window}", color="white", fontsize=9)
    if title:
        fig.suptitle(title, color="white", fontsize=11)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80, facecolor="black")
    plt.close(fig)
    return buffer.getvalue()
