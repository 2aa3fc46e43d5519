"""Decode in slabs sized to a memory budget: equal to the whole decode (every
GroupNorm with the whole volume's statistics, every convolution with its
halo) on small random VAEs; the plans at the paper's latent counted without
building the paper VAE; a slab's working memory bounded by the slab."""

import math

import pytest
import torch

import report2ct.codec as codec_module
from report2ct.codec import DecodePlan, LatentCodec, decode_bytes_per_latent_voxel, plan_decode
from report2ct.config import VAEConfig, preset

PAPER_LATENT = (120, 120, 64)
LATENT = (1, 4, 13, 10, 6)  # odd sizes: uneven slabs, one-plane slabs


def _random_codec(config: VAEConfig, seed: int = 0) -> LatentCodec:
    """A codec whose every weight (GroupNorm affines included) is random, so
    each norm's statistics matter."""
    torch.manual_seed(seed)
    codec = LatentCodec(config, latent_scale=0.7).eval()
    with torch.no_grad():
        for parameter in codec.vae.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return codec


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


CONFIGS = {
    "tiny": preset("tiny").vae,
    "demo": preset("demo").vae,  # 1x1 projections on every level
    # Two residual blocks (identity skips), decoder attention (run whole).
    "attention": VAEConfig(
        num_channels=(8, 16, 16),
        num_res_blocks=(2, 1, 1),
        norm_num_groups=4,
        attention_levels=(False, False, True),
        with_decoder_nonlocal_attn=True,
    ),
}
BOUNDS = [(0, 1, 2, 7, 13), (0, 3, 6, 9, 11, 13), tuple(range(14))]


@pytest.mark.parametrize(
    ("name", "bounds", "offload"),
    [
        ("tiny", BOUNDS[0], False),
        ("tiny", BOUNDS[1], True),
        ("tiny", BOUNDS[2], False),
        ("demo", BOUNDS[0], False),
        ("attention", BOUNDS[1], False),
    ],
)
@torch.no_grad()
def test_slab_decode_equals_the_whole_decode(name, bounds, offload):
    codec = _random_codec(CONFIGS[name])
    latent = torch.randn(*LATENT)
    whole = codec.decode(latent)
    assert whole.std() > 100  # HU: the random decoder does not saturate the window
    slabs = codec.decode_plan(latent, DecodePlan(LATENT[2:], bounds, offload))
    assert slabs.shape == whole.shape and slabs.dtype == torch.float32
    assert _relative(slabs, whole) < 1e-5  # the goal: 1e-3


@torch.no_grad()
def test_a_batch_keeps_each_volume_own_statistics():
    codec = _random_codec(CONFIGS["tiny"], seed=1)
    latent = torch.randn(2, *LATENT[1:])
    latent[1] *= 3
    slabs = codec.decode_plan(latent, DecodePlan(LATENT[2:], BOUNDS[0]))
    assert _relative(slabs, codec.decode(latent)) < 1e-5


@torch.no_grad()
def test_a_slab_without_its_halo_fails_the_comparison(monkeypatch):
    # The comparison above must catch a seam: drop the neighbours' planes
    # (zeros in their place, as an independent tile would see) and it does.
    codec = _random_codec(CONFIGS["tiny"])
    latent = torch.randn(*LATENT)
    whole = codec.decode(latent)
    real = codec_module._conv_input

    def no_halo(src, lo, hi, pad, transform, device):
        buf = real(src, lo, hi, pad, transform, device)
        if pad and lo > 0:
            buf[:, :, :pad] = 0
        return buf

    monkeypatch.setattr(codec_module, "_conv_input", no_halo)
    slabs = codec.decode_plan(latent, DecodePlan(LATENT[2:], BOUNDS[1]))
    assert _relative(slabs, whole) > 1e-3


@torch.no_grad()
def test_statistics_of_part_of_the_volume_fail_the_comparison(monkeypatch):
    # Every norm with the statistics of the first slab only (what a tile
    # sees on its own, the old tiles' error): far beyond the goal, so the
    # equality above comes from the statistics gathered over all slabs.
    codec = _random_codec(CONFIGS["tiny"])
    latent = torch.randn(*LATENT)
    whole = codec.decode(latent)
    real = codec_module._group_norm

    def first_slab(src, norm, *, silu):
        return real(codec_module._Slabs(src.bounds[:2], src.parts[:1]), norm, silu=silu)

    monkeypatch.setattr(codec_module, "_group_norm", first_slab)
    slabs = codec.decode_plan(latent, DecodePlan(LATENT[2:], BOUNDS[1]))
    assert _relative(slabs, whole) > 1e-3


@torch.no_grad()
def test_convolutions_only_see_one_slab_and_its_halo(monkeypatch):
    codec = _random_codec(CONFIGS["demo"])
    latent = torch.randn(*LATENT)
    seen = []
    real = codec_module._run
    monkeypatch.setattr(
        codec_module, "_run", lambda buf, conv: seen.append(buf.shape[2]) or real(buf, conv)
    )
    plan = codec.plan(latent, budget_bytes=_budget_for(codec, latent, slabs=4))
    assert plan.num_tiles >= 4 and not plan.offload and plan.work_ratio == 1.0
    codec.decode_plan(latent, plan)
    f = codec.downsample
    assert max(seen) <= plan.tile[0] * f + 2 < LATENT[2] * f  # planes, at output resolution


def _budget_for(codec, latent, slabs):
    _, resident, work = codec_module._per_output_voxel(codec.config)
    voxels = math.prod(latent.shape[2:]) * codec.downsample**3
    thickest = -(-latent.shape[2] // slabs)
    return resident * voxels + work * voxels * thickest // latent.shape[2]


@torch.no_grad()
def test_decode_volume_follows_the_budget():
    codec = _random_codec(CONFIGS["tiny"])
    latent = torch.randn(*LATENT)
    whole_bytes = decode_bytes_per_latent_voxel(codec.config) * math.prod(LATENT[2:])
    assert codec.plan(latent, budget_bytes=whole_bytes).num_tiles == 1
    torch.testing.assert_close(
        codec.decode_volume(latent, budget_bytes=whole_bytes), codec.decode(latent)
    )
    plan = codec.plan(latent, budget_bytes=whole_bytes // 3)
    assert plan.num_tiles > 1
    assert (
        _relative(codec.decode_volume(latent, budget_bytes=whole_bytes // 3), codec.decode(latent))
        < 1e-5
    )


@pytest.mark.parametrize("budget_gib", [12, 16, 24, 40, 64, 160])  # an A10G leaves ~14 GiB
def test_paper_latent_plans_decode_each_voxel_once_within_the_budget(budget_gib):
    config = preset("paper").vae
    budget = budget_gib << 30
    plan = plan_decode(PAPER_LATENT, budget, config)
    assert plan.work_ratio == 1.0  # <= 1.2, the goal: no voxel decoded twice
    assert plan.bounds[0] == 0 and plan.bounds[-1] == PAPER_LATENT[0]
    assert all(b > a for a, b in zip(plan.bounds, plan.bounds[1:], strict=False))
    whole, resident, work = codec_module._per_output_voxel(config)
    voxels = math.prod(PAPER_LATENT) * config.downsample**3
    if plan.num_tiles == 1:
        assert whole * voxels <= budget
        return
    slab = voxels * plan.tile[0] // PAPER_LATENT[0]
    on_device = work * slab + (0 if plan.offload else resident * voxels)
    assert on_device <= budget
    # The resident activation goes to the host only when it cannot stay.
    assert plan.offload == (resident * voxels + work * voxels // PAPER_LATENT[0] > budget)


def test_a_tiny_budget_and_a_plan_for_another_latent_are_refused():
    config = preset("tiny").vae
    with pytest.raises(ValueError, match="raise the memory budget"):
        plan_decode(PAPER_LATENT, 100, config)
    codec = LatentCodec(config)
    with pytest.raises(ValueError, match="does not match plan"):
        codec.decode_plan(torch.zeros(1, 4, 8, 8, 8), DecodePlan((8, 8, 4), (0, 4, 8)))
