"""The latent codec: HU window, MONAI state-dict compatibility, tiled decode."""

import pytest
import torch
from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi

from report2ct.codec import HU_WINDOW, LatentCodec, hu_to_unit, plan_decode, unit_to_hu
from report2ct.config import preset


def test_hu_window_round_trip_and_clip():
    hu = torch.tensor([-3024.0, -1000.0, -8192.0, 0.0, 40.0, 1000.0, 2500.0])
    unit = hu_to_unit(hu)
    assert unit.min() == 0.0 and unit.max() == 1.0
    torch.testing.assert_close(unit_to_hu(unit), hu.clamp(*HU_WINDOW))


def test_loads_a_monai_maisi_vae_state_dict_unchanged(tmp_path):
    # A user's pretrained MAISI VAE: MONAI's own class, saved, then loaded through ours.
    config = preset("tiny").vae
    torch.manual_seed(5)
    theirs = AutoencoderKlMaisi(
        spatial_dims=3,
        in_channels=1,
        out_channels=1,
        num_res_blocks=config.num_res_blocks,
        num_channels=config.num_channels,
        attention_levels=config.attention_levels,
        latent_channels=config.latent_channels,
        norm_num_groups=config.norm_num_groups,
        num_splits=1,
        dim_split=1,
        save_mem=False,
    ).eval()
    from safetensors.torch import load_file, save_file

    save_file(theirs.state_dict(), tmp_path / "maisi_vae.safetensors")
    ours = LatentCodec(config)
    ours.vae.load_state_dict(load_file(tmp_path / "maisi_vae.safetensors"))
    ours.eval()
    x = torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        z_theirs, _ = theirs.encode(x)
        torch.testing.assert_close(ours.encode(unit_to_hu(x)), z_theirs)
        torch.testing.assert_close(
            hu_to_unit(ours.decode(z_theirs)), theirs.decode(z_theirs).clamp(0, 1)
        )


def _local_decoder(codec):
    """A stand-in for the VAE decoder whose every output voxel depends only
    on the latent voxel under it (nearest upsampling of a channel mix, no
    padding, no per-tile statistics): tiling it changes nothing, so a tiled
    decode must equal the whole decode everywhere, blends included."""
    f = codec.downsample

    def decode(z):
        mixed = torch.tanh(z[:, :1] + 0.5 * z[:, 1:2] - 0.25 * z[:, 2:3] * z[:, 3:4])
        return (
            torch.sigmoid(3 * mixed)
            .repeat_interleave(f, 2)
            .repeat_interleave(f, 3)
            .repeat_interleave(f, 4)
        )

    return decode


@torch.no_grad()
def test_tiled_decode_blends_exactly_where_tiles_overlap(monkeypatch):
    codec = LatentCodec(preset("tiny").vae).eval()
    monkeypatch.setattr(codec.vae, "decode", _local_decoder(codec))
    torch.manual_seed(1)
    latent = torch.randn(1, 4, 24, 20, 18)
    whole = codec.decode(latent)
    plan = plan_decode(latent.shape[2:], 2000)
    assert plan.num_tiles > 1 and all(len(s) > 1 for s in plan.starts)
    # Overlapping tiles on every axis: the blend weights sum to 1 and each
    # tile lands where it was cut from, to float rounding (HU, of 2000).
    torch.testing.assert_close(codec.decode_plan(latent, plan), whole, atol=1e-2, rtol=0)
    torch.testing.assert_close(
        codec.decode_tiled(latent, tile_latent=8, overlap=0.5), whole, atol=1e-2, rtol=0
    )
    per_voxel = codec.decode_bytes_per_latent_voxel()
    budget = per_voxel * 2000
    assert codec.plan(latent, budget_bytes=budget).num_tiles > 1
    torch.testing.assert_close(
        codec.decode_volume(latent, budget_bytes=budget), whole, atol=1e-2, rtol=0
    )


@torch.no_grad()
def test_a_tile_placed_one_voxel_off_fails_the_comparison(monkeypatch):
    # The check above must catch a misplaced tile: shift the output of one
    # tile (not the first) by one voxel along x and the tiled decode differs.
    codec = LatentCodec(preset("tiny").vae).eval()
    local = _local_decoder(codec)
    calls = []

    def misplacing(z):
        calls.append(z.shape)
        out = local(z)
        return torch.roll(out, 1, dims=2) if len(calls) == 2 else out

    monkeypatch.setattr(codec.vae, "decode", misplacing)
    torch.manual_seed(1)
    latent = torch.randn(1, 4, 24, 20, 18)
    plan = plan_decode(latent.shape[2:], 2000)
    tiled = codec.decode_plan(latent, plan)
    monkeypatch.setattr(codec.vae, "decode", local)
    whole = codec.decode(latent)
    assert len(calls) == plan.num_tiles > 1
    with pytest.raises(AssertionError):
        torch.testing.assert_close(tiled, whole, atol=1e-2, rtol=0)
    assert (tiled - whole).abs().max() > 10.0  # HU: far from rounding


@torch.no_grad()
def test_tiled_decode_matches_whole_decode_with_bounded_tiles():
    config = preset("tiny").vae
    torch.manual_seed(0)
    codec = LatentCodec(config).eval()
    latent = torch.randn(1, 4, 16, 16, 8) * 0.5
    whole = codec.decode(latent)

    # A tile as large as the volume is the whole decode, exactly.
    torch.testing.assert_close(codec.decode_tiled(latent, tile_latent=16), whole, atol=1e-3, rtol=0)

    # Smaller tiles: the decoder only ever sees tiles (bounded memory)...
    seen = []
    decode = codec.vae.decode
    codec.vae.decode = lambda z: seen.append(tuple(z.shape[2:])) or decode(z)
    tiled = codec.decode_tiled(latent, tile_latent=12, overlap=0.5)
    codec.vae.decode = decode
    assert tiled.shape == whole.shape == (1, 1, 64, 64, 32)
    assert len(seen) > 1 and max(max(shape) for shape in seen) <= 12
    # ...and the blend stays close to the whole decode even for random
    # weights (GroupNorm statistics are per tile; trained VAEs differ less).
    assert (tiled - whole).abs().mean() / whole.std() < 0.15
    assert torch.corrcoef(torch.stack([tiled.flatten(), whole.flatten()]))[0, 1] > 0.95
