import json

import pytest
import torch

from report2ct.config import ModelConfig, preset


@pytest.mark.parametrize("name", ["tiny", "demo", "paper"])
def test_config_round_trips_through_json(name):
    config = preset(name)
    assert ModelConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_unknown_config_fields_are_refused():
    data = preset("tiny").to_dict()
    data["evil_hook"] = "os.system"
    with pytest.raises(ValueError, match="evil_hook"):
        ModelConfig.from_dict(data)


def test_check_output_reasons():
    config = preset("demo")
    config.check_output((96, 96, 64), (4.0, 4.0, 5.0))
    with pytest.raises(ValueError, match="multiple of 16"):
        config.check_output((100, 96, 64), (4.0, 4.0, 5.0))
    with pytest.raises(ValueError, match="outside the model's range"):
        config.check_output((96, 96, 64), (40.0, 4.0, 5.0))
    with pytest.raises(ValueError, match="finite and positive"):
        config.check_output((96, 96, 64), (float("nan"), 4.0, 5.0))
    with pytest.raises(ValueError, match="finite and positive"):
        config.check_output((96, 96, 64), (4.0, 0.0, 5.0))


def test_paper_preset_shapes_on_meta_device():
    from report2ct.codec import LatentCodec
    from report2ct.denoiser import Denoiser

    config = preset("paper")
    assert config.context_dim == 2560
    assert config.latent_shape(config.default_shape) == (4, 120, 120, 64)
    with torch.device("meta"):
        denoiser = Denoiser(config.unet, latent_channels=4, context_dim=config.context_dim)
        codec = LatentCodec(config.vae)
        unet_params = sum(p.numel() for p in denoiser.parameters())
        print(
            f"paper UNet parameters: {unet_params / 1e6:.1f}M, VAE: "
            f"{sum(p.numel() for p in codec.parameters()) / 1e6:.1f}M"
        )
        assert abs(unet_params - 233e6) / 233e6 < 0.10
        x = torch.empty(1, 4, 120, 120, 64)
        v = denoiser(x, torch.ones(1), torch.empty(1, 2, 2560), torch.ones(1, 3))
    assert v.shape == x.shape


@torch.no_grad()
def test_demo_preset_shapes_through_vae_unet_and_sampler():
    from report2ct.codec import LatentCodec
    from report2ct.denoiser import Denoiser
    from report2ct.flow import Condition, euler_sample, linear_times

    config = preset("demo")
    codec = LatentCodec(config.vae).eval()
    denoiser = Denoiser(config.unet, latent_channels=4, context_dim=config.context_dim).eval()
    latent_shape = config.latent_shape(config.default_shape)
    assert latent_shape == (4, 24, 24, 16)
    cond = Condition(
        context=torch.randn(1, 2, config.context_dim),
        spacing_mm=torch.tensor([config.default_spacing_mm]),
    )
    latent = euler_sample(
        denoiser, torch.randn(1, *latent_shape), cond, linear_times(2), guidance_scale=2.0
    )
    assert latent.shape == (1, *latent_shape)
    volume = codec.decode(latent)
    assert volume.shape == (1, 1, 96, 96, 64)
    assert codec.encode(volume).shape == (1, *latent_shape)
