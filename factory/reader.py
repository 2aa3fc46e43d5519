"""The downstream reader: a PyTorch Dataset over a generate job's index.

Each item is one committed volume: `volume` (1, X, Y, Z) float32 HU in the
model's RAS+ axes, `labels` (18,) float32 in CT-RATE's order, the report, the
spacing and the id. Only volumes whose commit marker exists are served:
uncommitted leftovers of killed attempts are invisible here.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
import zarr
from torch.utils.data import Dataset

from factory import commit
from factory.storage import Storage, is_s3, storage_for
from report2ct.labels import CTRATE_LABELS


def open_volume(uri: str) -> tuple[np.ndarray, tuple[float, float, float], dict[str, Any]]:
    """(volume [x, y, z] int16, spacing_mm (x, y, z), group attributes) of an
    OME-Zarr image written by the factory, local or on S3."""
    if is_s3(uri):
        from zarr.core.buffer import default_buffer_prototype

        # A volume is a few objects (shards + metadata): fetch them with the
        # factory's own S3 client (same retries, same settings) into memory.
        storage, buffer = Storage(uri), default_buffer_prototype().buffer
        objects = {key: buffer.from_bytes(storage.read_bytes(key)) for key in storage.list("")}
        group = zarr.open_group(store=zarr.storage.MemoryStore(objects), mode="r")
    else:
        group = zarr.open_group(uri, mode="r")
    multiscale = group.attrs["ome"]["multiscales"][0]
    dataset = multiscale["datasets"][0]
    scale_zyx = next(
        t["scale"] for t in dataset["coordinateTransformations"] if t["type"] == "scale"
    )
    volume_zyx = group[dataset["path"]][...]
    return volume_zyx.transpose(2, 1, 0), tuple(reversed(scale_zyx)), dict(group.attrs)


class GeneratedVolumes(Dataset):
    """Committed volumes of one job run, from its `index.jsonl`."""

    def __init__(self, index_uri: str, *, check_commits: bool = True) -> None:
        store, key = storage_for(index_uri)
        self.entries = [json.loads(line) for line in store.iter_lines(key) if line.strip()]
        if check_commits:
            run = Storage(index_uri.rsplit("/", 1)[0])
            self.entries = [e for e in self.entries if run.exists(commit.commit_path(e["key"]))]

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict[str, Any]:
        entry = self.entries[index]
        volume, spacing, _attrs = open_volume(entry["uri"])
        return {
            "id": entry["id"],
            "volume": torch.from_numpy(volume.astype(np.float32))[None],  # (1, X, Y, Z) HU
            "labels": torch.tensor(
                [entry["labels"][name] for name in CTRATE_LABELS], dtype=torch.float32
            ),
            "findings": entry["findings"],
            "impression": entry["impression"],
            "spacing_mm": torch.tensor(spacing, dtype=torch.float32),
            "seed": entry["seed"],
        }
