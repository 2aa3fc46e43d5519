"""The DeepSpeed loop on CPU: ZeRO-2 + bf16, the loss goes down on a fixed
batch, and a killed run resumed gives the same next losses."""

import json

import pytest
import torch

from report2ct.config import preset
from report2ct.denoiser import Denoiser
from training.engine import TrainConfig, batch_indices, lr_lambda, train
from training.stages import LatentSet, LDMLoss, RandomCrops, VAELoss


def fixed_latents(n=2):
    g = torch.Generator().manual_seed(0)
    config = preset("tiny")
    return LatentSet(
        torch.randn(n, 4, 8, 8, 4, generator=g),
        torch.randn(n, 2, config.context_dim, generator=g),
        torch.tensor([[8.0, 8.0, 10.0]] * n),
    )


def tiny_denoiser():
    config = preset("tiny")
    torch.manual_seed(0)
    return Denoiser(config.unet, latent_channels=4, context_dim=config.context_dim)


def test_deepspeed_config_is_explicit():
    ds = TrainConfig(micro_batch=4, grad_accum=2).deepspeed_config(world_size=2)
    assert ds["zero_optimization"]["stage"] == 2 and ds["bf16"]["enabled"] is True
    assert ds["gradient_clipping"] == 1.0 and ds["train_batch_size"] == 16
    schedule = lr_lambda(TrainConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1))
    assert schedule(0) == pytest.approx(0.1) and schedule(9) == pytest.approx(1.0)
    assert schedule(100) == pytest.approx(0.1) and schedule(55) < schedule(20)


def test_data_order_is_a_pure_function_of_seed_and_position():
    assert batch_indices(5, 3, 7, 4) == batch_indices(5, 3, 7, 4)
    epoch = batch_indices(5, 3, 0, 5)
    assert sorted(epoch) == [0, 1, 2, 3, 4]


def test_ldm_loss_goes_down_on_a_fixed_batch(tmp_path):
    config = TrainConfig(
        steps=30, micro_batch=2, lr=2e-3, warmup_steps=2, checkpoint_every=1000, log_every=5
    )
    loss = LDMLoss(cond_dropout=0.0)

    def fixed(engine, batch, generator):  # the same noise and times every step: a truly fixed batch
        return loss(engine, batch, generator.manual_seed(0))

    result = train(tiny_denoiser(), fixed, fixed_latents(), config, tmp_path)
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < 0.9 * first, result.losses
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert {"step", "loss", "lr", "samples_per_s"} <= set(log[-1]) and log[-1]["step"] == 30
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert set(result.ema) == set(tiny_denoiser().state_dict())


def test_controlnet_trains_through_deepspeed_on_a_frozen_denoiser(tmp_path):
    """A tiny ControlNet learns latents that are a function of the mask (the
    UNet cannot: it is frozen and never sees the mask); the loss goes down,
    the frozen weights come back bit for bit in fp32, the branch changed."""
    import dataclasses

    from report2ct.config import ControlConfig
    from report2ct.control import class_occupancy
    from report2ct.denoiser import perturb_zero_init
    from training.stages import train_controlnet

    config = dataclasses.replace(
        preset("tiny"), control=ControlConfig(legend=((3, "lung"), (4, "heart")))
    )
    trained = perturb_zero_init(Denoiser.for_model(dataclasses.replace(config, control=None)))
    g = torch.Generator().manual_seed(0)
    index = torch.randint(0, 3, (2, 32, 32, 16), generator=g)
    control = torch.stack([class_occupancy(i, 2, 4) for i in index])  # (2, 2, 8, 8, 4)
    latents = torch.cat([control * 3 - 1, control * 2 - 1], dim=1)  # what the mask says
    data = LatentSet(
        latents,
        torch.randn(2, 2, config.context_dim, generator=g),
        torch.tensor([[8.0, 8.0, 10.0]] * 2),
        labels=torch.zeros(2, 18),
        control=control,
    )
    loss = LDMLoss(cond_dropout=0.0)

    def fixed(engine, batch, generator):
        return loss(engine, batch, generator.manual_seed(0))

    train_config = TrainConfig(
        steps=30, micro_batch=2, lr=2e-3, warmup_steps=2, checkpoint_every=1000, log_every=5
    )
    controlled, result = train_controlnet(
        config, trained, data, train_config, tmp_path, loss_fn=fixed
    )
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < 0.9 * first, result.losses
    for name, value in trained.state_dict().items():
        assert torch.equal(controlled.state_dict()[name], value), name
    fresh = Denoiser.for_model(config)
    fresh.load_state_dict(trained.state_dict(), strict=False)
    fresh.init_controlnet_from_unet()
    changed = [
        name
        for name, value in controlled.controlnet.state_dict().items()
        if not torch.equal(value, fresh.controlnet.state_dict()[name])
    ]
    assert any("controlnet_down_blocks" in name for name in changed)


def test_vae_loss_goes_down_on_fixed_crops(tmp_path):
    from report2ct.codec import LatentCodec

    torch.manual_seed(0)
    volumes = (torch.rand(2, 1, 16, 16, 16) * 2000 - 1000).round().to(torch.int16)
    codec = LatentCodec(preset("tiny").vae)
    config = TrainConfig(steps=20, micro_batch=2, lr=3e-3, warmup_steps=2, checkpoint_every=1000)
    result = train(
        codec.vae,
        VAELoss(),
        RandomCrops(volumes, (16, 16, 16), crops_per_volume=1),
        config,
        tmp_path,
    )
    assert sum(result.losses[-4:]) / 4 < sum(result.losses[:4]) / 4


def test_killed_and_resumed_run_gives_the_same_next_losses(tmp_path):
    config = TrainConfig(
        steps=6, micro_batch=2, lr=1e-3, warmup_steps=2, checkpoint_every=3, log_every=1
    )
    data = fixed_latents(n=5)
    straight = train(tiny_denoiser(), LDMLoss(0.15), data, config, tmp_path / "straight")
    # A run killed after its step-3 checkpoint, then the same command again.
    train(tiny_denoiser(), LDMLoss(0.15), data, config, tmp_path / "killed", stop_after=3)
    torch.manual_seed(1234)  # the resumed process starts with other RNG state
    resumed = train(tiny_denoiser(), LDMLoss(0.15), data, config, tmp_path / "killed")
    assert resumed.steps == 6
    assert resumed.losses[3:] == pytest.approx(straight.losses[3:], rel=1e-6, abs=1e-7)
    for key, value in straight.ema.items():
        torch.testing.assert_close(resumed.ema[key], value)
