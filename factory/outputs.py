"""What the factory writes for one volume: a list of output writers.

Every writer puts its objects under the attempt's own folder
(`volumes/<key>/<attempt>/`, factory.commit), so an attempt that loses its
commit is removed with one prefix delete, whatever it wrote. Each returns the
sha256 of every object it wrote (the commit marker records them) and the
index fields that point at its output.

    OmeZarrOutput   <key>.ome.zarr   always: the image, its label map, provenance
    NiftiOutput     <key>.nii.gz     --nifti: for tools that read NIfTI
    PreviewOutput   <key>.png        --preview: three planes, two windows
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from factory.storage import Storage, join
from factory.writer import MASK_LABEL, put_ome_zarr, write_nifti


@dataclass(frozen=True, eq=False)
class VolumeOutput:
    """One generated volume, ready to write."""

    key: str
    title: str
    volume_xyz: np.ndarray  # (X, Y, Z) int16 HU
    spacing_mm: tuple[float, float, float]
    attributes: Mapping[str, Any]  # provenance and labels, stored with the image
    mask_xyz: np.ndarray | None = None  # (X, Y, Z) label values on the same grid
    mask_classes: Mapping[int, tuple[str, tuple[int, int, int, int]]] = field(default_factory=dict)


@dataclass(frozen=True)
class Written:
    files: dict[str, str]  # run-relative key -> sha256
    index: dict[str, str]  # IndexEntry field -> URI


class Output(Protocol):
    def write(self, run: Storage, prefix: str, item: VolumeOutput) -> Written: ...


def _put(run: Storage, key: str, data: bytes) -> dict[str, str]:
    run.write_bytes(key, data)
    return {key: hashlib.sha256(data).hexdigest()}


class OmeZarrOutput:
    def write(self, run: Storage, prefix: str, item: VolumeOutput) -> Written:
        # Encoded in memory and put straight to storage: one shard per array,
        # no local copy (factory.writer).
        key = join(prefix, f"{item.key}.ome.zarr")
        files = put_ome_zarr(
            run,
            key,
            item.volume_xyz,
            item.spacing_mm,
            attributes=item.attributes,
            mask_xyz=item.mask_xyz,
            mask_classes=item.mask_classes,
        )
        index = {"uri": run.uri(key)}
        if item.mask_xyz is not None:
            index["mask"] = run.uri(join(key, MASK_LABEL))  # the label map's array
        return Written(files, index)


class NiftiOutput:
    def write(self, run: Storage, prefix: str, item: VolumeOutput) -> Written:
        key = join(prefix, f"{item.key}.nii.gz")
        with tempfile.TemporaryDirectory() as scratch:
            path = write_nifti(Path(scratch) / "volume.nii.gz", item.volume_xyz, item.spacing_mm)
            files = _put(run, key, path.read_bytes())
        return Written(files, {"nifti_uri": run.uri(key)})


class PreviewOutput:
    def write(self, run: Storage, prefix: str, item: VolumeOutput) -> Written:
        from factory.preview import render_preview

        key = join(prefix, f"{item.key}.png")
        png = render_preview(item.volume_xyz, item.spacing_mm, title=item.title)
        return Written(_put(run, key, png), {"preview_uri": run.uri(key)})


def outputs_for(*, nifti: bool, preview: bool) -> list[Output]:
    """The writers a job asked for, the OME-Zarr image first."""
    chosen: list[Output] = [OmeZarrOutput()]
    if nifti:
        chosen.append(NiftiOutput())
    if preview:
        chosen.append(PreviewOutput())
    return chosen


def write_all(outputs: list[Output], run: Storage, prefix: str, item: VolumeOutput) -> Written:
    files: dict[str, str] = {}
    index: dict[str, str] = {}
    for output in outputs:
        written = output.write(run, prefix, item)
        files |= written.files
        index |= written.index
    return Written(files, index)
