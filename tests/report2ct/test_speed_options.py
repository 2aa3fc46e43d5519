"""load_bundle's speed options: applied, no weight or key changed, the same
outputs (torch.compile's forward only in a slow test: it compiles for
tens of seconds on the CPU)."""

import pytest
import torch

from report2ct.bundle import load_bundle


def inputs(model, seed=0):
    config = model.config
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, *config.latent_shape(config.default_shape), generator=generator)
    return x, dict(
        t=torch.tensor([0.2, 0.8]),
        context=torch.randn(2, 2, config.context_dim, generator=generator),
        spacing_mm=torch.tensor([list(config.default_spacing_mm)] * 2),
    )


@torch.no_grad()
def outputs(model):
    """The velocity and the decoded volume, both on a unit scale (HU / 1000)."""
    x, args = inputs(model)
    return model.denoiser(x, **args), model.codec.decode(x[:1]) / 1000


def test_channels_last_changes_the_layout_not_the_outputs(tiny_bundle, tiny_model):
    model = load_bundle(tiny_bundle, channels_last=True)
    weight = model.codec.vae.decoder.blocks[0].conv.conv.weight
    assert weight.is_contiguous(memory_format=torch.channels_last_3d)
    assert not weight.is_contiguous()
    assert model.state_dict().keys() == tiny_model.state_dict().keys()
    for ours, plain in zip(outputs(model), outputs(tiny_model), strict=True):
        torch.testing.assert_close(ours, plain, atol=1e-4, rtol=1e-4)


def test_cudnn_benchmark_is_switched_on(tiny_bundle):
    before = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = False
        model = load_bundle(tiny_bundle, cudnn_benchmark=True)
        assert torch.backends.cudnn.benchmark is True
        assert model.speed_options["cudnn_benchmark"] is True
    finally:
        torch.backends.cudnn.benchmark = before


def test_compile_wraps_in_place_and_keeps_the_state_dict_keys(tiny_bundle, tiny_model):
    model = load_bundle(tiny_bundle, torch_compile=True)
    for module in (model.denoiser.unet, model.codec.vae.decoder):
        assert module._compiled_call_impl is not None
    assert tiny_model.denoiser.unet._compiled_call_impl is None
    assert model.state_dict().keys() == tiny_model.state_dict().keys()


@pytest.mark.slow
def test_compiled_outputs_equal_eager(tiny_bundle, tiny_model):
    model = load_bundle(tiny_bundle, torch_compile=True)
    for ours, plain in zip(outputs(model), outputs(tiny_model), strict=True):
        torch.testing.assert_close(ours, plain, atol=1e-4, rtol=1e-4)
