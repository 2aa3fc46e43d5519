"""The DeepSpeed loop on CPU: ZeRO-2 + bf16, the loss goes down on a fixed
batch, a run killed with SIGKILL and resumed gives the same next losses and
EMA (VAE and LDM), each sample's noise does not depend on the batch split,
a DeepSpeed JSON reaches the engine, and a non-finite loss stops the run."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from report2ct.config import preset
from report2ct.denoiser import Denoiser
from training.engine import (
    NonFiniteLossError,
    TrainConfig,
    batch_indices,
    lr_lambda,
    read_deepspeed_config,
    sample_generator,
    train,
    with_deepspeed,
)
from training.stages import LatentSet, LDMLoss, RandomCrops, VAELoss

ROOT = Path(__file__).resolve().parents[2]


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

    def fixed(
        engine, batch, generators
    ):  # the same noise and times every step: a truly fixed batch
        return loss(engine, batch, [g.manual_seed(0) for g in generators])

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

    def fixed(engine, batch, generators):
        return loss(engine, batch, [g.manual_seed(0) for g in generators])

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


class GlobalRNGLoss:
    """A stage's loss scaled by draws from the global torch, numpy and python
    RNGs (as dropout or augmentation would draw): a resumed run matches the
    straight one only if the checkpoint restored all three."""

    def __init__(self, inner, *, block_after: int | None = None):
        self.inner, self.block_after, self.calls = inner, block_after, 0

    def __call__(self, engine, batch, generators):
        self.calls += 1
        if self.block_after is not None and self.calls > self.block_after:
            # The step after the checkpoint has begun, so the checkpoint is on
            # disk: tell the test, then wait to be killed.
            print("CHECKPOINTED", flush=True)
            sys.stdin.readline()
        jitter = float(torch.rand(())) + float(np.random.rand()) + random.random()
        return self.inner(engine, batch, generators) * (1 + 0.01 * jitter)


RESUME_CONFIG = TrainConfig(
    steps=6, micro_batch=2, lr=1e-3, warmup_steps=2, checkpoint_every=3, log_every=1
)


def resume_stage(stage: str, out: str, *, block_after: int | None = None):
    """Train stage `stage` ("ldm" or "vae") of the resume test into `out`."""
    if stage == "ldm":
        module, loss, data = tiny_denoiser(), LDMLoss(0.15), fixed_latents(n=5)
    else:
        from report2ct.codec import LatentCodec

        torch.manual_seed(0)
        volumes = (torch.rand(3, 1, 16, 16, 16) * 2000 - 1000).round().to(torch.int16)
        module, loss = LatentCodec(preset("tiny").vae).vae, VAELoss()
        data = RandomCrops(volumes, (16, 16, 16), crops_per_volume=1)
    # One thread in both processes: another thread count sums the batched
    # kernels in another order (1e-6 apart), and earlier tests in the same
    # pytest process may have changed it.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(module, GlobalRNGLoss(loss, block_after=block_after), data, RESUME_CONFIG, out)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("stage", ["ldm", "vae"])
def test_killed_and_resumed_run_gives_the_same_next_losses(tmp_path, stage):
    straight = resume_stage(stage, str(tmp_path / "straight"))
    # A real kill: a process SIGKILLed once its step-3 checkpoint is on disk,
    # in the middle of step 4; then the same run again in a fresh RNG state.
    killed = tmp_path / "killed"
    code = (
        "from tests.training.test_engine import resume_stage; "
        f"resume_stage({stage!r}, {str(killed)!r}, block_after=3)"
    )
    # A fresh process: not this one's process group (port, rank) either.
    launch = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    child = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if k not in launch},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        lines = []
        for line in child.stdout:  # ends when the child exits, so never hangs on a crash
            lines.append(line)
            if line.strip() == "CHECKPOINTED":
                break
        else:
            pytest.fail("the run ended before its checkpoint:\n" + "".join(lines[-40:]))
    finally:
        child.kill()
        child.wait(timeout=60)
    assert sorted(p.name for p in (killed / "checkpoints").glob("step-*")) == ["step-3"]
    torch.manual_seed(1234)
    np.random.seed(1234)
    random.seed(1234)
    resumed = resume_stage(stage, str(killed))
    assert resumed.steps == 6
    assert resumed.losses[3:] == pytest.approx(straight.losses[3:], rel=1e-6, abs=1e-7)
    for key, value in straight.ema.items():
        torch.testing.assert_close(resumed.ema[key], value)


def test_resume_false_starts_afresh(tmp_path):
    config = TrainConfig(steps=2, micro_batch=2, warmup_steps=1, checkpoint_every=1, log_every=1)
    train(tiny_denoiser(), LDMLoss(0.15), fixed_latents(), config, tmp_path)
    shorter = TrainConfig(steps=1, micro_batch=2, warmup_steps=1, log_every=1)
    result = train(tiny_denoiser(), LDMLoss(0.15), fixed_latents(), shorter, tmp_path, resume=False)
    assert result.steps == 1 and len(result.losses) == 1
    assert [p.name for p in (tmp_path / "checkpoints").glob("step-*")] == ["step-1"]
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) == 1
    saved = json.loads((tmp_path / "train_config.json").read_text())
    assert saved["train"]["steps"] == 1 and saved["world_size"] == 1


class Indexed(torch.utils.data.Dataset):
    """Sample i is the number i: the loss can tell which sample it holds."""

    def __len__(self):
        return 4

    def __getitem__(self, index):
        return {"x": torch.tensor([float(index)])}


def test_each_samples_noise_does_not_depend_on_the_batch_split(tmp_path):
    """The same global batch of 2 as one micro-batch of 2 or two of 1 (as on
    two ranks): every sample draws the same noise at every step."""

    def draws(micro_batch, grad_accum, out):
        seen = []

        def loss_fn(engine, batch, generators):
            for x, generator in zip(batch["x"].tolist(), generators, strict=True):
                seen.append((x[0], torch.rand(3, generator=generator).tolist()))
            return engine(batch["x"]).float().pow(2).mean()

        torch.manual_seed(0)
        config = TrainConfig(
            steps=3, micro_batch=micro_batch, grad_accum=grad_accum, warmup_steps=1, bf16=False
        )
        train(torch.nn.Linear(1, 1), loss_fn, Indexed(), config, out)
        return seen

    whole = draws(2, 1, tmp_path / "whole")
    split = draws(1, 2, tmp_path / "split")
    assert whole == split and len(whole) == 6
    assert len({tuple(noise) for _, noise in whole}) == 6  # no two samples share noise
    # What ranks do: rank r's sample j of micro-batch m is global index (m * world + r) * micro + j.
    one_rank = [sample_generator(0, 5, i).initial_seed() for i in range(4)]
    two_ranks = [
        sample_generator(0, 5, (0 * 2 + r) * 2 + j).initial_seed() for r in (0, 1) for j in (0, 1)
    ]
    assert one_rank == two_ranks


def test_a_non_finite_loss_stops_the_run_with_stage_step_and_value(tmp_path):
    loss, calls = LDMLoss(0.15), []

    def goes_nan(engine, batch, generators):
        calls.append(1)
        value = loss(engine, batch, generators)
        return value * float("nan") if len(calls) == 3 else value

    config = TrainConfig(steps=5, micro_batch=2, warmup_steps=1, checkpoint_every=2)
    with pytest.raises(NonFiniteLossError, match=r"^ldm: .* at step 3 of 5 .*\[nan\]") as error:
        train(tiny_denoiser(), goes_nan, fixed_latents(), config, tmp_path, name="ldm")
    assert "step-2" in str(error.value)  # the last good checkpoint
    assert [p.name for p in (tmp_path / "checkpoints").glob("step-*")] == ["step-2"]


def test_a_deepspeed_json_sets_the_loop_and_reaches_the_engine(tmp_path):
    settings = read_deepspeed_config(ROOT / "infra/deepspeed/zero2_bf16.json")
    config = with_deepspeed(TrainConfig(micro_batch=8), settings)
    assert (config.micro_batch, config.grad_accum, config.zero_stage) == (4, 2, 2)
    engine_config = config.deepspeed_config(world_size=2)
    assert engine_config["train_batch_size"] == 16
    assert engine_config["zero_optimization"]["reduce_bucket_size"] == 50_000_000
    with pytest.raises(ValueError, match="'optimizer' is built by the training loop"):
        with_deepspeed(config, {"optimizer": {"type": "Adam"}})
    with pytest.raises(ValueError, match="ZeRO stage 3"):
        with_deepspeed(config, {"zero_optimization": {"stage": 3}}).deepspeed_config()

    inline = {
        "gradient_clipping": 0.5,
        "zero_optimization": {"stage": 1, "reduce_bucket_size": 1234},
    }
    config = with_deepspeed(
        TrainConfig(steps=1, micro_batch=2, warmup_steps=1, log_every=1),
        read_deepspeed_config(inline),
    )
    train(tiny_denoiser(), LDMLoss(0.15), fixed_latents(), config, tmp_path)
    saved = json.loads((tmp_path / "train_config.json").read_text())
    assert saved["deepspeed"]["zero_optimization"] == {"stage": 1, "reduce_bucket_size": 1234}
    assert saved["deepspeed"]["gradient_clipping"] == 0.5 and saved["train"]["zero_stage"] == 1


def test_a_train_job_reads_its_deepspeed_config_into_every_stage(tmp_path):
    from training.demo_bundle import recipe_for

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 3, "bf16": {"enabled": False}}))
    recipe = recipe_for("tiny", {"ldm": {"steps": 7}, "phantoms": 6}, read_deepspeed_config(path))
    assert recipe.preset == "tiny" and recipe.phantoms == 6 and recipe.ldm.steps == 7
    for stage in (recipe.vae, recipe.ldm, recipe.control):
        assert stage.micro_batch == 3 and stage.bf16 is False
    assert recipe_for("tiny", {"control": None}).control is None
