"""The downstream reader: a PyTorch Dataset over a generate job's index.

Each item is one committed volume: `volume` (1, X, Y, Z) float32 HU in the
model's RAS+ axes, `labels` (18,) float32 in CT-RATE's order, the report, the
spacing and the id, and for a volume generated from a label map, `mask`
(1, X, Y, Z) int64 on the same grid with `mask_classes` ({value: name}).
Only committed volumes are served (the index lists nothing else):
uncommitted leftovers of killed attempts are invisible here. Opening the
dataset reads the run's index parts, not one request per volume.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import zarr
from torch.utils.data import Dataset

from factory.index import INDEX, read_index
from factory.records import IndexEntry
from factory.storage import open_storage
from factory.writer import MASK_LABEL
from report2ct.labels import CTRATE_LABELS


def open_group(uri: str) -> zarr.Group:
    """An OME-Zarr group, local or on S3 (read-only)."""
    return zarr.open_group(store=open_storage(uri).zarr_store(mode="r"), mode="r")


def _image_xyz(
    group: zarr.Group, multiscale: int = 0
) -> tuple[np.ndarray, tuple[float, float, float]]:
    dataset = group.attrs["ome"]["multiscales"][multiscale]["datasets"][0]
    scale_zyx = next(
        t["scale"] for t in dataset["coordinateTransformations"] if t["type"] == "scale"
    )
    return group[dataset["path"]][...].transpose(2, 1, 0), tuple(reversed(scale_zyx))


def _classes(image_label: dict) -> dict[int, str]:
    return {int(p["label-value"]): p["name"] for p in image_label.get("properties", [])}


def open_volume(uri: str) -> tuple[np.ndarray, tuple[float, float, float], dict[str, Any]]:
    """(volume [x, y, z] int16, spacing_mm (x, y, z), group attributes) of an
    OME-Zarr image written by the factory, local or on S3."""
    group = open_group(uri)
    volume, spacing = _image_xyz(group)
    return volume, spacing, dict(group.attrs)


def open_volume_and_mask(uri: str):
    """(volume, spacing, attributes, mask [x, y, z] or None, {value: class
    name}) of a factory output: the mask is the group's multiscale named
    "mask" (its array `mask`, classes in the array's `image-label`); outputs
    written before that layout keep it as the OME label image `labels/mask`."""
    group = open_group(uri)
    volume, spacing = _image_xyz(group)
    attributes = dict(group.attrs)
    names = [m.get("name") for m in group.attrs["ome"]["multiscales"]]
    if MASK_LABEL in names[1:]:
        mask, _ = _image_xyz(group, names.index(MASK_LABEL, 1))
        path = group.attrs["ome"]["multiscales"][names.index(MASK_LABEL, 1)]["datasets"][0]["path"]
        return volume, spacing, attributes, mask, _classes(group[path].attrs["image-label"])
    try:
        label = group[f"labels/{MASK_LABEL}"]
    except KeyError:
        return volume, spacing, attributes, None, {}
    mask, _ = _image_xyz(label)
    return volume, spacing, attributes, mask, _classes(label.attrs["ome"]["image-label"])


def run_of(uri: str) -> str:
    """A run's root from the run URI itself, its index folder, its
    summary.json, or an index part."""
    uri = uri.rstrip("/")
    for tail in ("/summary.json", "/index.jsonl"):
        if uri.endswith(tail):
            return uri[: -len(tail)]
    head, _, name = uri.rpartition("/")
    if name == INDEX:
        return head
    if head.endswith("/" + INDEX) and name.endswith(".jsonl"):
        return head.rpartition("/")[0]
    return uri


class GeneratedVolumes(Dataset):
    """Committed volumes of one job run, from its index parts (only
    committed volumes are ever listed there, each once)."""

    def __init__(self, run_uri: str) -> None:
        run = open_storage(run_of(run_uri))
        self.entries: list[IndexEntry] = list(read_index(run))

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict[str, Any]:
        plain = volume_item(self.entries[index])
        item = {
            "id": plain["id"],
            "volume": torch.from_numpy(plain["volume"])[None],  # (1, X, Y, Z) HU
            "labels": torch.from_numpy(plain["labels"]),
            "findings": plain["findings"],
            "impression": plain["impression"],
            "spacing_mm": torch.from_numpy(plain["spacing_mm"]),
            "seed": plain["seed"],
        }
        if plain["mask"] is not None:
            item["mask"] = torch.from_numpy(plain["mask"])[None]  # (1, X, Y, Z)
            item["mask_classes"] = {int(k): v for k, v in plain["mask_classes"].items()}
        return item


def volume_item(entry: IndexEntry) -> dict[str, Any]:
    """One committed volume as plain arrays: image (X, Y, Z) float32 HU,
    labels (18,), spacing, report, id, seed; mask (X, Y, Z) int64 or None."""
    volume, spacing, _attrs, mask, classes = open_volume_and_mask(entry.uri)
    return {
        "id": entry.id,
        "volume": volume.astype(np.float32),
        "labels": np.array([entry.labels[n] for n in CTRATE_LABELS], dtype=np.float32),
        "spacing_mm": np.array(spacing, dtype=np.float32),
        "findings": entry.findings,
        "impression": entry.impression,
        "seed": entry.seed,
        "mask": None if mask is None else mask.astype(np.int64),
        "mask_classes": {str(k): v for k, v in classes.items()},
    }


def ray_dataset(run_uri: str, **read_args: Any):
    """A Ray Data dataset of a run's committed volumes, for training
    consumers on a cluster: the index is read on the driver (parts, not one
    request per volume), each volume is read by the task that needs it.
    `read_args` go to `map` (e.g. num_cpus, concurrency)."""
    import ray

    run = open_storage(run_of(run_uri))
    rows = [{"entry": entry.to_json()} for entry in read_index(run)]
    return ray.data.from_items(rows).map(
        lambda row: volume_item(IndexEntry.from_json(row["entry"])), **read_args
    )
