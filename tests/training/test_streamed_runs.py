"""The `train` stage runs on the streaming path: VAE, LDM and ControlNet a
few steps each on a tiny phantom split read volume by volume (the
whole-split loaders are never called), the LDM's latent cache built as shards
whose count, latent scale and spacings are checked, the ControlNet on those
shards with each volume's label map; and the engine's streamed batches are
the in-memory loop's, in the same order."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from phantom.ctrate_layout import DatasetSpec, write_dataset
from report2ct.bundle import write_random_bert
from report2ct.config import preset
from training.engine import TrainConfig, _stack, batch_indices, micro_batches

STAGE = TrainConfig(
    steps=2, micro_batch=2, warmup_steps=1, checkpoint_every=100, log_every=1, seed=3
)


class Items:
    """A map-style data set whose item is its index (as a tensor)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"i": torch.tensor(index)}


class KeyedItems(Items):
    """The same, read by (epoch, index) keys, as a streamed split is."""

    takes_epoch_keys = True

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        epoch, index = key
        return {"i": torch.tensor(index), "epoch": torch.tensor(epoch)}


@pytest.mark.parametrize("world, rank", [(1, 0), (2, 1)])
def test_streamed_batches_are_the_in_memory_order_and_resume_mid_stream(world, rank):
    config = dataclasses.replace(STAGE, micro_batch=3, grad_accum=2, seed=5)
    n, steps = 7, 4
    options = dict(rank=rank, world=world)
    in_memory = list(micro_batches(Items(n), config, _stack, start_step=0, steps=steps, **options))
    assert len(in_memory) == steps * config.grad_accum
    per_step = config.micro_batch * config.grad_accum * world
    for number, batch in enumerate(in_memory):
        step, micro = divmod(number, config.grad_accum)
        first = step * per_step + (micro * world + rank) * config.micro_batch
        assert batch["i"].tolist() == batch_indices(n, config.seed, first, config.micro_batch)
    # Through a DataLoader (workers; keys with the epoch): the same batches.
    streamed = list(
        micro_batches(
            KeyedItems(n), config, _stack, start_step=0, steps=steps, num_workers=2, **options
        )
    )
    plain = list(
        micro_batches(Items(n), config, _stack, start_step=0, steps=steps, num_workers=1, **options)
    )
    for a, b, c in zip(in_memory, streamed, plain, strict=True):
        assert torch.equal(a["i"], b["i"]) and torch.equal(a["i"], c["i"])
    # Each key carries the epoch of its position in the endless stream.
    epochs = [e for batch in streamed for e in batch["epoch"].tolist()]
    assert sorted(set(epochs)) == list(range(max(epochs) + 1)) and max(epochs) >= 1
    # A resumed run (from step 2) reads what the uninterrupted one read there.
    resumed = list(micro_batches(KeyedItems(n), config, _stack, start_step=2, steps=2, **options))
    for a, b in zip(streamed[2 * config.grad_accum :], resumed, strict=True):
        assert torch.equal(a["i"], b["i"]) and torch.equal(a["epoch"], b["epoch"])


def _refuse(*args, **kwargs):
    raise AssertionError("the split was read whole into memory")


@pytest.mark.slow
def test_the_three_stages_train_from_the_streamed_split(tmp_path, monkeypatch):
    import training.caches
    import training.data.ctrate
    import training.data.volumes
    import training.runs
    import training.stages
    from training.caches import latent_scale_factor
    from training.data.shards import LatentShards, ShardSet, read_index
    from training.data.stream import VolumeStream
    from training.runs import (
        load_ldm_run,
        train_controlnet_run,
        train_ldm_run,
        train_vae_run,
    )
    from training.stages import MaskedLatents

    # Nothing may hold the split in memory: the whole-split loaders refuse.
    monkeypatch.setattr(training.data.volumes, "load_volumes", _refuse)
    monkeypatch.setattr(training.data.ctrate.CTRateDataset, "__init__", _refuse)
    monkeypatch.setattr(training.caches, "latent_text_cache", _refuse)
    monkeypatch.setattr(training.stages.RandomCrops, "__init__", _refuse)
    assert not hasattr(training.runs, "load_volumes")

    tiny = preset("tiny")
    config = dataclasses.replace(
        tiny, encoders=tuple(e for e in tiny.encoders if e.name == "tiny-bert")
    )
    data = tmp_path / "data"
    counts = write_dataset(
        data,
        DatasetSpec(n=4, seed=1, shape=tiny.default_shape, spacing_mm=tiny.default_spacing_mm),
    )
    write_random_bert(tmp_path / "enc/encoders/tiny-bert", hidden_size=32)

    # The LDM's spacing inputs, as its loss sees them batch by batch.
    seen: list[tuple[float, ...]] = []
    call = training.stages.LDMLoss.__call__

    def recording(self, engine, batch, generators):
        seen.extend(tuple(row) for row in batch["spacing_mm"].float().tolist())
        return call(self, engine, batch, generators)

    monkeypatch.setattr(training.stages.LDMLoss, "__call__", recording)

    vae = train_vae_run(data, tmp_path / "vae", config, STAGE, crop=(16, 16, 16))
    assert vae.steps == 2 and all(math.isfinite(x) for x in vae.losses)

    scale, ldm = train_ldm_run(
        data,
        tmp_path / "vae",
        tmp_path / "ldm",
        config,
        STAGE,
        encoders_dir=tmp_path / "enc",
        num_workers=0,
    )
    assert ldm.steps == 2 and all(math.isfinite(x) for x in ldm.losses)
    latents = tmp_path / "ldm/latents"
    index = read_index(str(latents))
    assert index["count"] == counts["train"] == len(VolumeStream(data, config))
    assert not (tmp_path / "ldm/cache.safetensors").exists()
    # The scale recorded is 1 / std of every latent in the shards, as the
    # in-memory cache computed it; the run reads it back.
    raw = ShardSet(str(latents), columns=["latent"])
    computed = latent_scale_factor(torch.stack([raw[i]["latent"] for i in range(len(raw))]))
    assert scale == index["latent_scale"] == pytest.approx(computed, rel=1e-5)
    assert load_ldm_run(config, tmp_path / "ldm").config.latent_scale == scale
    # Each sample was resampled to its own spacing within the preset's range,
    # and the LDM trained on those spacings.
    shards = LatentShards.for_model(str(latents), config)
    spacings = {tuple(shards[i]["spacing_mm"].tolist()) for i in range(len(shards))}
    assert len(spacings) == len(shards) and tuple(tiny.default_spacing_mm) not in spacings
    for spacing in spacings:
        for value, (low, high) in zip(spacing, tiny.spacing_range_mm, strict=True):
            assert low <= value <= high
    # (The engine casts floating inputs to the module's bf16.)
    as_fed = {tuple(torch.tensor(s).bfloat16().float().tolist()) for s in spacings}
    assert len(seen) == STAGE.steps * STAGE.micro_batch and set(seen) <= as_fed
    assert len(set(seen)) > 1

    seen.clear()
    control = train_controlnet_run(data, tmp_path / "ldm", tmp_path / "control", config, STAGE)
    assert control.steps == 2 and all(math.isfinite(x) for x in control.losses)
    assert set(seen) <= as_fed and len(seen) == STAGE.steps * STAGE.micro_batch
    trained = json.loads((tmp_path / "control/checkpoints/step-2/client.json").read_text())
    assert trained["step"] == 2
    assert any(key.startswith("controlnet.") for key in control.ema)
    # A label map read at another spacing than its latent's is refused.
    run = load_ldm_run(config, tmp_path / "ldm", data)
    other = VolumeStream(data, run.config, seed=STAGE.seed + 1, masks=True)
    shards = LatentShards.for_model(str(latents), config)
    with pytest.raises(ValueError, match="not read as the latent cache's was"):
        MaskedLatents(shards, other, run.config)[0]
