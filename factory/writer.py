"""OME-Zarr 0.5 output: one image group per volume, int16 HU, axes z, y, x
in millimetre with `scale` = the voxel spacing, validated with
`ome-zarr-models`. Provenance and labels go into the group attributes; the
label map a volume was generated from goes into the image group as a second
array, `mask`, on the same grid: the group's second multiscale (named
"mask", same axes and scale as the image, so an OME-Zarr reader that picks a
multiscale by name finds it), with OME's `image-label` metadata (the name and
colour of every value) in the array's own attributes.

Each array is one shard (Zarr v3 `sharding_indexed`) of 64^3 inner chunks, so
a viewer reads a chunk with one ranged request while object storage holds
few objects: a volume is 3 (group and array metadata, the shard), its label
map 2 more (its array metadata and shard), an optional 2x downsampled level
of the image 2 more. (An OME `labels/` group would cost 4 objects a mask: the
labels group, the label image group, its array metadata and shard.) The group is encoded in
memory (`encode_ome_zarr`) and written object by object, to a directory
(`write_ome_zarr`) or straight to a `Storage` (`put_ome_zarr`): no local
temporary copy on the way to object storage.

Volumes arrive as `[x, y, z]` arrays (docs/conventions.md); the transpose to
OME's `z, y, x` happens here and nowhere else, one chunk at a time (a whole-
volume transpose of 480x480x256 int16 walks memory with a stride and costs
more than the compression).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec, BloscShuffle, ZstdCodec
from zarr.storage import MemoryStore

if TYPE_CHECKING:
    from factory.storage import Storage

CHUNK = 64  # inner chunk edge: a viewer's unit of reading
MASK_LABEL = "mask"  # the label map: the array <image>.ome.zarr/mask, multiscale "mask"
OME_VERSION = "0.5"
AXES = ("z", "y", "x")
# Objects of one volume go to object storage concurrently (each is one PUT).
PUT_THREADS = 8


@dataclass(frozen=True)
class Compression:
    """The shard's inner-chunk compressor. `codec`: "zstd" (Zarr v3's own
    codec) or "blosc-zstd" (blosc around zstd, with `shuffle` of the int16
    bytes or bits); both read by every Zarr v3 implementation."""

    codec: str = "zstd"
    level: int = 3
    shuffle: str = "noshuffle"  # blosc only: noshuffle, shuffle, bitshuffle

    def codecs(self, itemsize: int) -> list:
        if self.codec == "zstd":
            if self.shuffle != "noshuffle":
                raise ValueError("zstd has no shuffle: use blosc-zstd for a shuffled stream")
            return [ZstdCodec(level=self.level, checksum=False)]
        if self.codec == "blosc-zstd":
            return [
                BloscCodec(
                    cname="zstd",
                    clevel=self.level,
                    shuffle=BloscShuffle[self.shuffle],
                    typesize=itemsize,
                )
            ]
        raise ValueError(f"unknown codec {self.codec!r}: zstd or blosc-zstd")


# Chosen by bench/bench_write.py (docs/factory.md, Output): see there.
DEFAULT_COMPRESSION = Compression("blosc-zstd", 1, "shuffle")


def encode_ome_zarr(
    volume_xyz: np.ndarray,  # (X, Y, Z) int16 HU
    spacing_mm: tuple[float, float, float],  # (x, y, z)
    *,
    attributes: Mapping[str, Any],
    mask_xyz: np.ndarray | None = None,  # (X, Y, Z) label values
    mask_classes: Mapping[int, tuple[str, tuple[int, int, int, int]]] | None = None,
    compression: Compression = DEFAULT_COMPRESSION,
    downsampled: bool = False,
) -> dict[str, bytes]:
    """The objects of one OME-Zarr image group, {key relative to the group:
    bytes}, encoded in memory. `downsampled` adds `s1`, the image at half
    the resolution per axis (2x2x2 means), for viewers."""
    volume_xyz = np.asarray(volume_xyz, dtype=np.int16)
    if volume_xyz.ndim != 3:
        raise ValueError(f"volume of shape {volume_xyz.shape}: expected (X, Y, Z)")
    if mask_xyz is not None and np.shape(mask_xyz) != volume_xyz.shape:
        raise ValueError(f"mask {np.shape(mask_xyz)} is not on the image grid")
    objects: dict = {}
    group = zarr.open_group(store=MemoryStore(objects), mode="w", zarr_format=3)
    spacing_zyx = [float(v) for v in reversed(tuple(spacing_mm))]
    levels = [("s0", volume_xyz, 1)]
    if downsampled and min(volume_xyz.shape) >= 2:
        levels.append(("s1", _half(volume_xyz), 2))
    datasets = [
        _array(group, path, data, compression, spacing_zyx, factor) for path, data, factor in levels
    ]
    multiscales = [_multiscale("image", datasets)]
    if mask_xyz is not None:
        mask = _write_mask(
            group, np.asarray(mask_xyz), mask_classes or {}, compression, spacing_zyx
        )
        multiscales.append(_multiscale(MASK_LABEL, [mask]))
    group.attrs.update({"ome": {"version": OME_VERSION, "multiscales": multiscales}})
    group.attrs.update(dict(attributes))
    return {key: buffer.to_bytes() for key, buffer in objects.items()}


def write_ome_zarr(
    path: Path, volume_xyz: np.ndarray, spacing_mm: tuple[float, float, float], **options: Any
) -> Path:
    """Write a local OME-Zarr image group at `path` (a directory), with the
    mask as the array `mask` when given; `options` are `encode_ome_zarr`'s
    (`attributes` required; `mask_xyz`, `mask_classes` value -> (name,
    rgba), `compression`, `downsampled`)."""
    from factory.storage import LocalStorage

    put_ome_zarr(LocalStorage(str(path)), "", volume_xyz, spacing_mm, **options)
    return Path(path)


def put_ome_zarr(
    storage: Storage,
    key: str,
    volume_xyz: np.ndarray,
    spacing_mm: tuple[float, float, float],
    *,
    attributes: Mapping[str, Any],
    mask_xyz: np.ndarray | None = None,
    mask_classes: Mapping[int, tuple[str, tuple[int, int, int, int]]] | None = None,
    compression: Compression = DEFAULT_COMPRESSION,
    downsampled: bool = False,
) -> dict[str, str]:
    """Encode the image group in memory and write its objects under `key`
    of `storage` ("" for its root), one `write_bytes` each, concurrently;
    returns {key of each object under `storage`: sha256}, what a commit
    marker records."""
    from concurrent.futures import ThreadPoolExecutor

    from factory.storage import join

    objects = encode_ome_zarr(
        volume_xyz,
        spacing_mm,
        attributes=attributes,
        mask_xyz=mask_xyz,
        mask_classes=mask_classes,
        compression=compression,
        downsampled=downsampled,
    )

    def put(item: tuple[str, bytes]) -> tuple[str, str]:
        name, data = item
        target = join(key, name) if key else name
        storage.write_bytes(target, data)
        return target, hashlib.sha256(data).hexdigest()

    with ThreadPoolExecutor(min(PUT_THREADS, len(objects))) as pool:
        return dict(pool.map(put, sorted(objects.items())))


def _half(volume_xyz: np.ndarray) -> np.ndarray:
    """2x2x2 means (rounded), the odd last plane of an axis dropped."""
    X, Y, Z = (n - n % 2 for n in volume_xyz.shape)
    blocks = volume_xyz[:X, :Y, :Z].reshape(X // 2, 2, Y // 2, 2, Z // 2, 2)
    return np.round(blocks.mean(axis=(1, 3, 5), dtype=np.float32)).astype(np.int16)


def _array(
    group: zarr.Group,
    path: str,
    data_xyz: np.ndarray,
    compression: Compression,
    spacing_zyx: list[float],
    factor: int,
    *,
    centred: bool = True,
) -> dict:
    """One single-shard array at `path`, written chunk by chunk from the
    x, y, z array; returns its OME dataset entry."""
    shape = tuple(reversed(data_xyz.shape))
    chunks = tuple(min(CHUNK, n) for n in shape)
    array = group.create_array(
        path,
        shape=shape,
        dtype=data_xyz.dtype,
        chunks=chunks,
        shards=tuple(-(-n // c) * c for n, c in zip(shape, chunks, strict=True)),
        compressors=compression.codecs(data_xyz.dtype.itemsize),
        fill_value=0,
        dimension_names=AXES,
    )
    # The zyx array in memory, one chunk-sized block transposed at a time,
    # then one write: the shard is encoded once.
    zyx = np.empty(shape, dtype=data_xyz.dtype)
    for z0 in range(0, shape[0], CHUNK):
        for y0 in range(0, shape[1], CHUNK):
            for x0 in range(0, shape[2], CHUNK):
                block = data_xyz[x0 : x0 + CHUNK, y0 : y0 + CHUNK, z0 : z0 + CHUNK]
                zyx[z0 : z0 + CHUNK, y0 : y0 + CHUNK, x0 : x0 + CHUNK] = block.T
    array[...] = zyx
    scale = [s * factor for s in spacing_zyx]
    # A voxel of a 2x level is centred between the two it averages (a
    # label level picks every other voxel instead: no shift).
    translation = [0.5 * (factor - 1) * s if centred else 0.0 for s in spacing_zyx]
    return {
        "path": path,
        "coordinateTransformations": [
            {"type": "scale", "scale": scale},
            {"type": "translation", "translation": translation},
        ],
    }


def _multiscale(name: str, datasets: list[dict]) -> dict:
    return {
        "axes": [{"name": axis, "type": "space", "unit": "millimeter"} for axis in AXES],
        "datasets": datasets,
        "name": name,
    }


def _write_mask(
    group: zarr.Group,
    mask_xyz: np.ndarray,
    classes: Mapping[int, tuple[str, tuple[int, int, int, int]]],
    compression: Compression,
    spacing_zyx: list[float],
) -> dict:
    """The label map as the array `mask` of the image group (one level: a
    viewer overlays it on the full-resolution image), its values named and
    coloured by OME's `image-label` in the array's attributes; returns its
    OME dataset entry."""
    if mask_xyz.dtype != np.uint8:
        if mask_xyz.size and (mask_xyz.min() < 0 or mask_xyz.max() > 255):
            raise ValueError("label values must fit uint8")
        mask_xyz = mask_xyz.astype(np.uint8)
    # torch counts uint8 as is; np.bincount would widen 59M values to int64 first.
    flat = np.require(mask_xyz.reshape(-1), requirements=["C", "W"])  # from_numpy: writable
    counts = torch.bincount(torch.from_numpy(flat), minlength=256)
    present = [int(v) for v in torch.nonzero(counts).flatten() if v]
    dataset = _array(group, MASK_LABEL, mask_xyz, compression, spacing_zyx, 1, centred=False)
    group[MASK_LABEL].attrs["image-label"] = {
        "version": OME_VERSION,
        "colors": [{"label-value": v, "rgba": list(classes[v][1])} for v in present],
        "properties": [{"label-value": v, "name": classes[v][0]} for v in present],
    }
    return dataset


def validate_ome_zarr(path: str | Path | zarr.Group) -> None:
    """Check the image group against the OME-Zarr 0.5 spec (pydantic models)."""
    from ome_zarr_models.v05.image import Image

    group = path if isinstance(path, zarr.Group) else zarr.open_group(str(path), mode="r")
    Image.from_zarr(group)  # every multiscale, the mask's included


def write_nifti(path: Path, volume_xyz: np.ndarray, spacing_mm: tuple[float, float, float]) -> Path:
    """NIfTI with the true affine: RAS+ axes scaled by the spacing."""
    import nibabel as nib

    affine = np.diag([*(float(v) for v in spacing_mm), 1.0])
    image = nib.Nifti1Image(np.asarray(volume_xyz, dtype=np.int16), affine)
    image.header.set_xyzt_units("mm")
    nib.save(image, str(path))
    return path
