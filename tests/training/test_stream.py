"""The paper-scale data path, read volume by volume: a CT-RATE-layout split
streamed through two DataLoader workers reads each volume once per epoch and
keeps none; at the model's spacing it equals the in-memory loader; with
varied spacing each sample is resampled to a spacing drawn from (seed, epoch,
index) and says so in its spacing input, as the CT-RATE reader resampled to
that spacing independently gives it."""

from __future__ import annotations

import gc
import os
import pickle
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from phantom.ctrate_layout import DatasetSpec, write_dataset
from report2ct.config import preset
from training.data.ctrate import CTRateDataset, CTRateError
from training.data.stream import StreamKeys, VolumeCrops, VolumeStream, epoch_keys
from training.data.volumes import load_volumes

CONFIG = preset("tiny")


@pytest.fixture(scope="module")
def split(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("stream") / "ctrate"
    write_dataset(
        root,
        DatasetSpec(n=4, seed=3, shape=(40, 40, 20), spacing_mm=(7.0, 7.0, 9.0)),
    )
    return root


# Arrays read from volume files and still alive, in this process (each
# DataLoader worker has its own).
_LIVE: list[weakref.ref] = []


class TracedStream(VolumeStream):
    """The stream as it is, logging each read to a file (pid, epoch, name,
    volume arrays still alive from earlier reads in that process)."""

    log_path: str = ""

    def _item(self, record, epoch, index):
        gc.collect()
        with open(self.log_path, "a") as log:
            live = sum(ref() is not None for ref in _LIVE)
            log.write(f"{os.getpid()} {epoch} {record.name} {live}\n")
        return super()._item(record, epoch, index)

    def _read(self, record, path):
        hu, spacing, decision = super()._read(record, path)
        _LIVE.append(weakref.ref(hu))
        return hu, spacing, decision


def test_two_workers_read_each_volume_once_per_epoch_and_keep_none(split, tmp_path):
    stream = TracedStream(split, CONFIG, seed=5, spacing="varied")
    stream.log_path = str(tmp_path / "reads.log")
    n = len(stream)
    assert n == 4
    volume_bytes = 2 * np.prod(CONFIG.default_shape)
    assert len(pickle.dumps(stream)) < volume_bytes  # what each worker gets: records, no volume
    keys = epoch_keys(n, 5, 0) + epoch_keys(n, 5, 1)
    loader = DataLoader(stream, sampler=keys, batch_size=2, num_workers=2)
    names = []
    for batch in loader:
        assert batch["volume"].shape == (2, 1, *CONFIG.default_shape)
        names += [(int(e), name) for e, name in zip(batch["epoch"], batch["name"], strict=True)]
    reads = [line.split() for line in Path(stream.log_path).read_text().splitlines()]
    every = sorted(r.name for r in stream.records)
    for epoch in (0, 1):
        assert sorted(name for _, e, name, _ in reads if int(e) == epoch) == every
        assert sorted(name for e, name in names if e == epoch) == every
    assert len({pid for pid, *_ in reads}) == 2  # both workers read
    assert all(int(live) == 0 for *_, live in reads)  # no earlier volume kept alive


def test_fixed_spacing_equals_the_in_memory_loader(split):
    volumes, conditions = load_volumes(split, CONFIG, masks=True)
    stream = VolumeStream(split, CONFIG, spacing="fixed", masks=True)
    for i in range(len(stream)):
        item = stream[i]
        assert torch.equal(item["volume"], volumes[i])
        assert item["spacing_mm"].tolist() == list(CONFIG.default_spacing_mm)
        assert tuple(item["labels"].tolist()) == conditions[i].labels
        assert (item["findings"], item["impression"]) == (
            conditions[i].findings,
            conditions[i].impression,
        )
        assert np.array_equal(item["mask"].numpy(), conditions[i].mask)


def test_varied_spacing_is_the_spacing_input_and_a_function_of_seed_epoch_index(split):
    stream = VolumeStream(split, CONFIG, seed=11, spacing="varied")
    ranges = CONFIG.spacing_range_mm
    seen = set()
    for key in [(0, 1), (1, 1), (2, 3)]:
        item = stream[key]
        used = tuple(item["spacing_mm"].tolist())
        seen.add(used)
        assert all(lo <= v <= hi for v, (lo, hi) in zip(used, ranges, strict=True))
        assert used[0] == used[1]  # square pixels
        # The CT-RATE reader, resampling to that spacing by itself, gives the same volume.
        reference = CTRateDataset(
            split, "train", target_spacing_mm=used, target_shape=CONFIG.default_shape
        )[key[1]]
        assert torch.equal(item["volume"], reference["volume"].round().to(torch.int16))
        # Again, in another stream object: the same draw.
        again = VolumeStream(split, CONFIG, seed=11, spacing="varied")[key]
        assert torch.equal(again["volume"], item["volume"])
        assert torch.equal(again["spacing_mm"], item["spacing_mm"])
    assert len(seen) == 3  # epochs and volumes draw different spacings
    other_seed = VolumeStream(split, CONFIG, seed=12, spacing="varied")[(0, 1)]
    assert not torch.equal(other_seed["spacing_mm"], stream[(0, 1)]["spacing_mm"])
    stream.set_epoch(2)
    assert torch.equal(stream[3]["spacing_mm"], stream[(2, 3)]["spacing_mm"])
    with pytest.raises(ValueError, match="within the model's"):
        VolumeStream(split, CONFIG, spacing_range_mm=((1.0, 4.0), (2.0, 4.0), (2.5, 5.0)))


def test_stream_keys_follow_the_training_loop_order():
    from training.engine import batch_indices

    n, seed, micro, accum, world = 5, 2, 2, 2, 2
    per_step = micro * accum * world
    for rank in range(world):
        keys = list(
            StreamKeys(
                n,
                seed,
                micro_batch=micro,
                grad_accum=accum,
                world=world,
                rank=rank,
                start_step=3,
                steps=2,
            )
        )
        expected = []
        for step in (3, 4):
            for m in range(accum):
                first = (m * world + rank) * micro
                expected += batch_indices(n, seed, step * per_step + first, micro)
        assert [index for _, index in keys] == expected
        assert keys[0][0] == (3 * per_step + rank * micro) // n


def test_bad_volumes_are_named_or_skipped(split, tmp_path):
    import shutil

    root = tmp_path / "broken"
    shutil.copytree(split, root)
    victim = sorted((root / "train_fixed").rglob("*.nii.gz"))[1]
    victim.write_bytes(b"not a nifti")
    with pytest.raises(CTRateError, match=victim.name):
        VolumeStream(root, CONFIG)[1]
    skipping = VolumeStream(root, CONFIG, errors="skip")
    assert victim.name in skipping[1]["skipped"] and skipping[1]["name"] == victim.name
    victim.unlink()
    with pytest.raises(CTRateError, match=f"{victim.name}: volume file missing"):
        VolumeStream(root, CONFIG)
    assert [name for name, _ in VolumeStream(root, CONFIG, errors="skip").skipped] == [victim.name]


def test_crops_for_the_vae_are_resumable(split):
    stream = VolumeStream(split, CONFIG, seed=1)
    crops = VolumeCrops(stream, (16, 16, 8), seed=4)
    first, again = crops[(1, 2)], VolumeCrops(stream, (16, 16, 8), seed=4)[(1, 2)]
    assert first["hu"].shape == (1, 16, 16, 8) and torch.equal(first["hu"], again["hu"])
    volume = stream[(1, 2)]["volume"].float()
    windows = volume.unfold(1, 16, 1).unfold(2, 16, 1).unfold(3, 8, 1)
    assert (windows == first["hu"][0]).flatten(-3).all(-1).any()  # a crop of that volume
