"""OME-Zarr 0.5 output: one image group per volume, int16 HU, axes z, y, x
in millimetre with `scale` = the voxel spacing, 64^3 chunks in shards, zstd,
written with the maintained `ome-zarr` library and validated with
`ome-zarr-models`. Provenance and labels go into the group attributes; the
label map a volume was generated from goes into the image group as an
OME-Zarr label image, `labels/mask`, on the same grid, with `image-label`
metadata naming and colouring every value.

Volumes arrive as `[x, y, z]` arrays (docs/conventions.md); the transpose to
OME's `z, y, x` happens here and nowhere else.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from ome_zarr.format import FormatV05
from ome_zarr.writer import write_image, write_labels

CHUNK = 64
MASK_LABEL = "mask"  # the label image: <image>.ome.zarr/labels/mask
SHARD = 128  # one shard file holds up to 8 chunks: few objects per volume on S3


def write_ome_zarr(
    path: Path,
    volume_xyz: np.ndarray,  # (X, Y, Z) int16 HU
    spacing_mm: tuple[float, float, float],  # (x, y, z)
    *,
    attributes: Mapping[str, Any],
    mask_xyz: np.ndarray | None = None,  # (X, Y, Z) label values
    mask_classes: Mapping[int, tuple[str, tuple[int, int, int, int]]] | None = None,
) -> Path:
    """Write a local OME-Zarr image group at `path` (a directory), with the
    mask as `labels/mask` when given (`mask_classes`: value -> (name, rgba))."""
    volume_zyx = np.ascontiguousarray(np.asarray(volume_xyz, dtype=np.int16).transpose(2, 1, 0))
    sx, sy, sz = (float(v) for v in spacing_mm)
    chunks = tuple(min(CHUNK, n) for n in volume_zyx.shape)
    shards = tuple(
        min(SHARD, -(-n // c) * c) for n, c in zip(volume_zyx.shape, chunks, strict=True)
    )
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    # The dict forms of scale / axes_units: the older list form silently
    # writes scale 1 and no units with ome-zarr 0.18 (PLATFORM-NOTES).
    grid = {
        "scale_factors": [],
        "axes": "zyx",
        "scale": {"z": sz, "y": sy, "x": sx},
        "axes_units": {"z": "millimeter", "y": "millimeter", "x": "millimeter"},
        "storage_options": {"chunks": chunks, "shards": shards},
        "fmt": FormatV05(),
    }
    write_image(volume_zyx, group, **grid)
    group.attrs.update(dict(attributes))
    if mask_xyz is not None:
        _write_mask(group, np.asarray(mask_xyz), mask_classes or {}, grid)
    return path


def _write_mask(group: zarr.Group, mask_xyz: np.ndarray, classes, grid: dict) -> None:
    if mask_xyz.shape != tuple(reversed(group["s0"].shape)):
        raise ValueError(f"mask {mask_xyz.shape} is not on the image grid")
    present = sorted(int(v) for v in np.unique(mask_xyz) if v)
    write_labels(
        np.ascontiguousarray(mask_xyz.astype(np.uint8).transpose(2, 1, 0)),
        group,
        name=MASK_LABEL,
        scaler=None,  # no pyramid (scale_factors alone still builds one with 0.18)
        label_metadata={
            "colors": [{"label-value": v, "rgba": list(classes[v][1])} for v in present],
            "properties": [{"label-value": v, "name": classes[v][0]} for v in present],
        },
        **grid,
    )
    # ome-zarr 0.18 leaves "version" out of the labels group; OME-Zarr 0.5
    # (and ome-zarr-models) require it.
    labels = zarr.open_group(store=group.store, path=f"{group.path}/labels".lstrip("/"), mode="a")
    labels.attrs["ome"] = {**labels.attrs["ome"], "version": "0.5"}


def validate_ome_zarr(path: str | Path) -> None:
    """Check the image group against the OME-Zarr 0.5 spec (pydantic models)."""
    from ome_zarr_models.v05.image import Image

    Image.from_zarr(zarr.open_group(str(path), mode="r"))  # with its labels/, when present


def write_nifti(path: Path, volume_xyz: np.ndarray, spacing_mm: tuple[float, float, float]) -> Path:
    """NIfTI with the true affine: RAS+ axes scaled by the spacing."""
    import nibabel as nib

    affine = np.diag([*(float(v) for v in spacing_mm), 1.0])
    image = nib.Nifti1Image(np.asarray(volume_xyz, dtype=np.int16), affine)
    image.header.set_xyzt_units("mm")
    nib.save(image, str(path))
    return path
