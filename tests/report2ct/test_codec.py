"""The latent codec: HU window, MONAI state-dict compatibility (the slab
decode: test_decode_tiles.py)."""

import torch
from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi

from report2ct.codec import HU_WINDOW, LatentCodec, hu_to_unit, unit_to_hu
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
