"""The label maps a record conditions on: read from a URI or drawn by the
phantom world, checked, and put on the record's output grid.

    mask = resolve_mask(record, seed, shape, spacing_mm, config.control)
    mask.values     # (X, Y, Z) uint8 in the model's legend, on the output grid
    mask.index      # the same map as channel indices 0..K (class_occupancy's input)
    mask.labels     # what the mask shows ({CT-RATE name: 0/1}), phantom masks only
    mask.provenance # where it came from (uri + sha256, or phantom + seed)

A URI mask is a NIfTI (its affine gives orientation and spacing; reoriented
to RAS+ like every volume here) or an OME-Zarr image or label group (axes z,
y, x with a millimetre `scale`). It is resampled by nearest neighbour to the
output spacing over the same field of view, then cropped or padded
symmetrically to the output shape, exactly as the training reader puts a
training mask on the training grid. Refused with a reason (`MaskError`): a
mask that is not 3-D (singleton extra axes are dropped), an oblique grid,
a non-positive or non-finite spacing, a grid whose resampled size would be
absurd, fractional or unknown label values.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from factory.manifest import ManifestRecord
from factory.storage import storage_for
from report2ct.config import ControlConfig
from report2ct.control import MaskError, to_class_index
from report2ct.grid import crop_or_pad, resample

# A mask may cover more than the output (it is cropped), but resampling it
# to more than this many times the output's voxels is refused, not attempted.
MAX_RESAMPLED_RATIO = 64


@dataclass(frozen=True)
class ResolvedMask:
    values: np.ndarray  # (X, Y, Z) uint8 label values in the model's legend, output grid
    provenance: dict[str, Any]
    labels: dict[str, int] | None = field(default=None)  # the findings a phantom mask draws
    # (X, Y, Z) uint8 channel indices 0..K: the class mapping, done once per record
    index: np.ndarray | None = field(default=None, repr=False)


def read_bytes(uri: str) -> bytes:
    store, key = storage_for(uri)
    return store.read_bytes(key)


def is_zarr(uri: str) -> bool:
    """An OME-Zarr group, or a node inside one (e.g. <image>.ome.zarr/mask, a
    factory output's label map, or <image>.ome.zarr/labels/<name>)."""
    return any(part.lower().endswith(".zarr") for part in uri.rstrip("/").split("/"))


def read_mask(uri: str) -> tuple[np.ndarray, tuple[float, float, float], str]:
    """(label map [x, y, z] in RAS+, spacing (x, y, z) mm, sha256 of the
    source) from a NIfTI or OME-Zarr URI."""
    if is_zarr(uri):
        return _read_ome_zarr(uri)
    data = read_bytes(uri)
    return (*_read_nifti(data), hashlib.sha256(data).hexdigest())


def _read_nifti(data: bytes) -> tuple[np.ndarray, tuple[float, float, float]]:
    import nibabel as nib

    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    try:
        image = nib.Nifti1Image.from_bytes(data)
    except Exception as error:  # nibabel raises several types for a broken header
        raise MaskError(f"not a readable NIfTI: {error}") from None
    affine = image.affine
    if not np.all(np.isfinite(affine)):
        raise MaskError("affine has non-finite values")
    if float(np.max(nib.affines.obliquity(affine))) > 1e-3:
        raise MaskError("oblique grid (rotated axes): resample it to an axis-aligned grid first")
    canonical = nib.as_closest_canonical(image)
    array = np.asanyarray(canonical.dataobj)
    return _three_d(array), tuple(float(v) for v in canonical.header.get_zooms()[:3])


def _read_ome_zarr(uri: str) -> tuple[np.ndarray, tuple[float, float, float], str]:
    group, path = _group_and_path(uri)
    try:
        multiscales = group.attrs["ome"]["multiscales"]
        # The array a URI names (a factory output's `mask`): the multiscale
        # that holds it; a group: its first multiscale.
        multiscale = (
            multiscales[0]
            if path is None
            else next(m for m in multiscales if m["datasets"][0]["path"] == path)
        )
        axes = [axis["name"] for axis in multiscale["axes"]]
        dataset = multiscale["datasets"][0]
        scale = next(
            t["scale"] for t in dataset["coordinateTransformations"] if t["type"] == "scale"
        )
        array = group[dataset["path"]][...]
    except (KeyError, IndexError, StopIteration, TypeError) as error:
        raise MaskError(f"not an OME-Zarr image or label group: missing {error}") from None
    spatial = [i for i, name in enumerate(axes) if name in ("x", "y", "z")]
    if len(spatial) != 3:
        raise MaskError(f"axes {axes}: a label map needs x, y and z")
    extra = [i for i in range(array.ndim) if i not in spatial]
    if any(array.shape[i] != 1 for i in extra):
        raise MaskError(f"mask has shape {array.shape} over axes {axes}; a label map is 3-D")
    order = [spatial[[axes[i] for i in spatial].index(name)] for name in ("x", "y", "z")]
    array = np.squeeze(array.transpose(order + extra), axis=tuple(range(3, array.ndim)))
    spacing = tuple(float(scale[i]) for i in order)
    digest = hashlib.sha256(array.tobytes() + json.dumps(scale).encode()).hexdigest()
    return array, spacing, digest


def _group_and_path(uri: str):
    """(OME-Zarr group, path of the array `uri` names in it, or None when
    `uri` names the group itself)."""
    import zarr

    from factory.reader import open_group
    from factory.storage import open_storage

    node = zarr.open(store=open_storage(uri).zarr_store(mode="r"), mode="r")
    if isinstance(node, zarr.Group):
        return node, None
    head, _, name = uri.rstrip("/").rpartition("/")
    return open_group(head), name


def _three_d(array: np.ndarray) -> np.ndarray:
    squeezed = array.reshape([n for i, n in enumerate(array.shape) if i < 3 or n != 1])
    if squeezed.ndim != 3:
        raise MaskError(f"mask has shape {array.shape}; a label map is 3-D (x, y, z)")
    return squeezed


def on_grid(
    array: np.ndarray,
    spacing_mm: tuple[float, float, float],
    shape: tuple[int, int, int],
    target_mm: tuple[float, float, float],
) -> np.ndarray:
    """Nearest-neighbour resample to `target_mm` over the same field of view,
    then symmetric crop/pad (background) to `shape`; a map already on that
    grid is returned as it is (to_class_index reads any integer type)."""
    if not all(math.isfinite(s) and s > 0 for s in spacing_mm):
        raise MaskError(f"spacing {spacing_mm} mm must be finite and positive")
    resampled = [
        max(1, round(n * s / t)) for n, s, t in zip(array.shape, spacing_mm, target_mm, strict=True)
    ]
    if math.prod(resampled) > MAX_RESAMPLED_RATIO * math.prod(shape):
        raise MaskError(
            f"grid {array.shape} at {spacing_mm} mm resamples to {tuple(resampled)} voxels at "
            f"{target_mm} mm, over {MAX_RESAMPLED_RATIO}x the output {shape}: not resampled"
        )
    if array.dtype.kind not in "iub" and not np.all(array == np.round(array)):
        raise MaskError(f"label values must be integers (a {array.dtype} mask with fractions)")
    on_target = all(
        math.isclose(s, t, rel_tol=1e-6) for s, t in zip(spacing_mm, target_mm, strict=True)
    )
    if on_target and array.shape == tuple(shape):
        return array  # already on the output grid: no copy, its own integer type
    tensor = torch.from_numpy(np.ascontiguousarray(array).astype(np.int64))[None]
    tensor = resample(tensor, spacing_mm, target_mm, mode="nearest")
    return crop_or_pad(tensor, shape, 0)[0].round().long().numpy()


def _mapping(uri: str) -> dict[int, str]:
    try:
        document = json.loads(read_bytes(uri))
        return {int(value): str(name) for value, name in document["values"].items()}
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise MaskError(
            f'mask_legend {uri}: expected {{"values": {{"<value>": "<class>"}}}}: {error}'
        ) from None


def resolve_mask(
    record: ManifestRecord,
    seed: int,
    shape: tuple[int, int, int],
    spacing_mm: tuple[float, float, float],
    control: ControlConfig,
) -> ResolvedMask:
    """The record's label map on the output grid, in the model's legend."""
    if record.mask_source == "phantom":
        from phantom.world import labels_of, make_mask

        values, findings = make_mask(
            seed, shape=shape, spacing_mm=spacing_mm, prevalence=0.0, requested=record.labels
        )
        index = to_class_index(values, control)  # the model's legend must know every class drawn
        provenance = {"source": "phantom", "seed": seed, "requested": dict(record.labels)}
        return ResolvedMask(values.astype(np.uint8), provenance, labels_of(findings), index)
    array, source_mm, digest = read_mask(record.mask)
    mapping = _mapping(record.mask_legend) if record.mask_legend else None
    array = on_grid(array, source_mm, shape, spacing_mm)
    index = to_class_index(array, control, mapping)
    legend_values = np.array([0, *(value for value, _ in control.legend)], dtype=np.uint8)
    provenance = {
        "source": "uri",
        "uri": record.mask,
        "sha256": digest,
        "spacing_mm": list(source_mm),
        "mask_legend": record.mask_legend,
    }
    return ResolvedMask(legend_values[index], provenance, index=index)
