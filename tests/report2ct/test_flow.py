"""Samplers against MONAI's scheduler, guidance batching, per-sample seeds."""

import dataclasses
import itertools

import numpy as np
import pytest
import torch
from monai.networks.schedulers import RFlowScheduler

from report2ct.config import preset
from report2ct.denoiser import Denoiser, perturb_zero_init
from report2ct.flow import Condition, euler_sample, guided_velocity, heun_sample, linear_times
from report2ct.pipeline import NonFiniteOutput, VolumeRequest, generate


@pytest.fixture(scope="module")
def denoiser():
    config = preset("tiny")
    torch.manual_seed(0)
    denoiser = Denoiser(config.unet, latent_channels=4, context_dim=config.context_dim)
    return perturb_zero_init(denoiser).eval()


def _cond(batch, dim, seed=1):
    g = torch.Generator().manual_seed(seed)
    return Condition(
        context=torch.randn(batch, 2, dim, generator=g),
        spacing_mm=torch.tensor([[8.0, 8.0, 10.0]] * batch),
    )


@torch.no_grad()
def test_euler_matches_monai_rflow_scheduler_step_by_step(denoiser):
    num_steps, dim = 10, preset("tiny").context_dim
    cond = _cond(1, dim)
    noise = torch.randn(1, 4, 8, 8, 4, generator=torch.Generator().manual_seed(3))

    scheduler = RFlowScheduler(num_train_timesteps=1000, use_discrete_timesteps=False)
    scheduler.set_timesteps(num_inference_steps=num_steps)
    monai_times = torch.cat([scheduler.timesteps.float(), torch.zeros(1)])
    ours_times = linear_times(num_steps)
    np.testing.assert_allclose(monai_times.numpy() / 1000, ours_times.numpy(), atol=1e-3)

    x_ref, x_ours = noise.clone(), noise.clone()
    for k, (t, t_next) in enumerate(itertools.pairwise(monai_times)):
        v = denoiser(x_ref, (t / 1000).expand(1), cond.context, cond.spacing_mm)
        x_ref, _ = scheduler.step(v, t, x_ref, t_next)
        x_ours = euler_sample(denoiser, x_ours, cond, monai_times[k : k + 2].double() / 1000)
        torch.testing.assert_close(x_ours, x_ref, atol=1e-5, rtol=1e-5, msg=f"step {k}")


@torch.no_grad()
def test_batched_guidance_equals_two_forwards(denoiser):
    dim = preset("tiny").context_dim
    cond = _cond(2, dim)
    x = torch.randn(2, 4, 8, 8, 4)
    t = 0.6
    tv = torch.full((2,), t)
    v_c = denoiser(x, tv, cond.context, cond.spacing_mm)
    v_u = denoiser(x, tv, torch.zeros_like(cond.context), cond.spacing_mm)
    expected = v_u + 4.0 * (v_c - v_u)
    torch.testing.assert_close(
        guided_velocity(denoiser, x, t, cond, 4.0), expected, atol=1e-5, rtol=1e-4
    )


@torch.no_grad()
def test_heun_converges_faster_than_euler_on_a_linear_field():
    # dx/d(-t) = -x from t=1 to t=0 has the exact solution x(0) = x(1) / e: Heun's error
    # must be far below Euler's at the same number of steps.
    def field(x, t, context, spacing_mm):
        return -x

    cond = Condition(context=torch.zeros(1, 2, 1), spacing_mm=torch.zeros(1, 3))
    x1 = torch.ones(1, 1, 2, 2, 2)
    exact = torch.exp(torch.tensor(-1.0))
    times = linear_times(8)
    err_euler = (euler_sample(field, x1, cond, times).mean() - exact).abs()
    err_heun = (heun_sample(field, x1, cond, times).mean() - exact).abs()
    assert err_heun < err_euler / 10


def test_same_seed_same_volume_whatever_the_batch(tiny_model):
    reports = [
        (f"Finding number {i} in the right lower lobe.", f"Impression {i}.") for i in range(4)
    ]
    requests = [
        VolumeRequest(seed=10 + i, findings=f, impression=imp, spacing_mm=(8.0, 8.0, 10.0))
        for i, (f, imp) in enumerate(reports)
    ]
    batched = generate(tiny_model, requests, precision="fp32").volumes_hu
    single = generate(tiny_model, requests[2:3], precision="fp32").volumes_hu
    # Kernels may sum in another order at another batch size: allow 1 HU.
    assert np.abs(batched[2].astype(int) - single[0].astype(int)).max() <= 1
    again = generate(tiny_model, requests[2:3], precision="fp32").volumes_hu
    np.testing.assert_array_equal(single, again)
    reseeded = dataclasses.replace(requests[2], seed=99)
    other = generate(tiny_model, [reseeded], precision="fp32").volumes_hu
    assert np.abs(single.astype(int) - other.astype(int)).mean() > 1


def test_generate_shapes_precisions_and_timings(tiny_model):
    normal = VolumeRequest(seed=1, findings="Normal.", impression="Normal.")
    for precision in ("bf16", "fp16", "fp32"):
        result = generate(tiny_model, [normal], precision=precision, num_steps=2)
        assert result.volumes_hu.shape == (1, 32, 32, 16)
        assert result.volumes_hu.dtype == np.int16
        assert result.volumes_hu.min() >= -1000 and result.volumes_hu.max() <= 1000
        assert set(result.timings_s) == {"text", "sample", "decode", "host"}
    with pytest.raises(ValueError, match="precision"):
        generate(tiny_model, [normal], precision="int4")
    with pytest.raises(ValueError, match="outside the model's range"):
        generate(tiny_model, [dataclasses.replace(normal, spacing_mm=(100, 8, 10))])


@pytest.mark.parametrize("where", ["denoiser", "decoder"])
def test_a_model_that_produces_nan_fails_instead_of_writing_zeros(tiny_model, monkeypatch, where):
    """A diverged model's NaN must never become plausible 0-HU volumes."""
    module = tiny_model.denoiser if where == "denoiser" else tiny_model.codec.vae
    name = "forward" if where == "denoiser" else "decode"
    original = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: original(*a, **k) * float("nan"))
    request = VolumeRequest(seed=1, findings="Normal.", impression="Normal.")
    with pytest.raises(NonFiniteOutput, match="NaN/Inf"):
        generate(tiny_model, [request], num_steps=2)


@torch.no_grad()
def test_the_test_denoiser_is_not_trivial(denoiser):
    # MONAI zero-initialises output layers; a zero velocity would make every
    # sampler comparison above pass vacuously.
    dim = preset("tiny").context_dim
    cond = _cond(1, dim)
    v = denoiser(torch.randn(1, 4, 8, 8, 4), torch.full((1,), 0.5), cond.context, cond.spacing_mm)
    assert v.abs().mean() > 1e-3
    v_null = denoiser(
        torch.randn(1, 4, 8, 8, 4),
        torch.full((1,), 0.5),
        torch.zeros_like(cond.context),
        cond.spacing_mm,
    )
    assert not torch.allclose(v, v_null)


def test_loss_drops_text_and_labels_independently_at_their_own_rates():
    """The denoiser sees every mix of conditions: over many samples the text
    is dropped at `cond_dropout`, the labels at `label_dropout`, and the two
    draws are independent (each combination at the product of its rates)."""
    from report2ct.loss import RectifiedFlowLoss

    seen = {}

    def spy(x_t, t, context, spacing_mm, labels=None):
        seen["text"] = context.flatten(1).any(1)
        seen["labels"] = labels.any(1)
        return torch.zeros_like(x_t)

    n = 20000
    loss = RectifiedFlowLoss(cond_dropout=0.2, label_dropout=0.5)
    loss(
        spy,
        torch.zeros(n, 1, 1, 1, 1),
        torch.ones(n, 2, 3),
        torch.ones(n, 3),
        labels=torch.ones(n, 18),
        generator=torch.Generator().manual_seed(0),
    )
    text, labels = seen["text"].float(), seen["labels"].float()
    assert abs(text.mean() - 0.8) < 0.02 and abs(labels.mean() - 0.5) < 0.02
    assert abs((text * labels).mean() - 0.4) < 0.02  # independent: 0.8 * 0.5
    assert abs(((1 - text) * (1 - labels)).mean() - 0.1) < 0.02  # the unconditional share
