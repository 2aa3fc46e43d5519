"""Decode tiles sized to a memory budget: the least-work tiling, counted at
the paper's latent without building the paper VAE; blending that is exact for
a decoder without context; the whole decode when the latent fits."""

import math

import pytest
import torch

from report2ct.codec import (
    DecodePlan,
    LatentCodec,
    _axis_weights,
    decode_bytes_per_latent_voxel,
    plan_decode,
)
from report2ct.config import preset

PAPER_LATENT = (120, 120, 64)


@pytest.mark.parametrize("budget_gib", [12, 16, 24, 40, 64])  # an A10G leaves ~14 GiB
def test_paper_latent_decodes_with_at_most_1_2x_the_needed_work(budget_gib):
    per_voxel = decode_bytes_per_latent_voxel(preset("paper").vae)
    plan = plan_decode(PAPER_LATENT, (budget_gib << 30) // per_voxel)
    decoded = plan.num_tiles * math.prod(plan.tile)
    assert decoded / math.prod(PAPER_LATENT) == plan.work_ratio <= 1.2
    assert math.prod(plan.tile) * per_voxel <= budget_gib << 30  # every tile fits
    for size, tile, starts in zip(PAPER_LATENT, plan.tile, plan.starts, strict=True):
        assert starts[0] == 0 and starts[-1] + tile == size  # covered end to end


def test_the_old_fixed_tiles_did_2_67x_the_work():
    # 32^3 tiles at overlap 0.25 (MONAI's sliding window): 5 x 5 x 3 = 75 tiles.
    assert 75 * 32**3 / math.prod(PAPER_LATENT) == pytest.approx(2.667, abs=1e-3)


def test_a_latent_that_fits_is_one_tile_and_a_tiny_budget_is_refused():
    assert plan_decode((24, 24, 16), 24 * 24 * 16).num_tiles == 1
    with pytest.raises(ValueError, match="raise the memory budget"):
        plan_decode(PAPER_LATENT, 100)


@pytest.mark.parametrize(("size", "tile", "count"), [(64, 34, 2), (120, 43, 3), (32, 12, 3)])
def test_blend_weights_sum_to_one_and_skip_the_tile_edges(size, tile, count):
    from report2ct.codec import _starts

    starts = _starts(size, tile, count)
    weights = _axis_weights(size, tile, starts, 4)
    total = torch.zeros(size * 4)
    for weight, start in zip(weights, starts, strict=True):
        total[start * 4 : (start + tile) * 4] += weight
    torch.testing.assert_close(total, torch.ones(size * 4))
    # The outermost voxels of a tile's inner edges (beside its zero padding) carry no weight.
    assert weights[1][0] == 0 and weights[0][-1] == 0


@torch.no_grad()
def test_tiling_is_exact_for_a_decoder_without_context():
    codec = LatentCodec(preset("tiny").vae).eval()
    codec.vae.decode = lambda z: (
        torch.sigmoid(z[:, :1])
        .repeat_interleave(4, 2)
        .repeat_interleave(4, 3)
        .repeat_interleave(4, 4)
    )
    latent = torch.randn(1, 4, 40, 24, 20)
    plan = plan_decode(latent.shape[2:], 20 * 20 * 20)
    assert plan.num_tiles > 1
    hu = codec.decode_plan(latent, plan)
    torch.testing.assert_close(hu, codec.decode(latent), atol=1e-3, rtol=0)  # HU, float32


@torch.no_grad()
def test_decode_volume_follows_the_budget():
    torch.manual_seed(0)
    codec = LatentCodec(preset("tiny").vae).eval()
    latent = torch.randn(1, 4, 16, 16, 8) * 0.5
    seen = []
    decode = codec.vae.decode
    codec.vae.decode = lambda z: seen.append(tuple(z.shape[2:])) or decode(z)
    per_voxel = codec.decode_bytes_per_latent_voxel()
    whole = codec.decode_volume(latent, budget_bytes=per_voxel * 16 * 16 * 8)
    assert seen == [(16, 16, 8)]
    seen.clear()
    tiled = codec.decode_volume(latent, budget_bytes=per_voxel * 16 * 10 * 8)
    assert len(seen) == 2 and all(math.prod(s) <= 16 * 10 * 8 for s in seen)
    assert tiled.shape == whole.shape == (1, 1, 64, 64, 32)
    # Each tile normalises with its own GroupNorm statistics: close, not equal.
    assert torch.corrcoef(torch.stack([tiled.flatten(), whole.flatten()]))[0, 1] > 0.95


def test_a_plan_for_another_latent_is_refused():
    codec = LatentCodec(preset("tiny").vae)
    plan = DecodePlan((8, 8, 4), (8, 8, 4), ((0,), (0,), (0,)))
    with pytest.raises(ValueError, match="does not match plan"):
        codec.decode_plan(torch.zeros(1, 4, 8, 8, 8), plan)
