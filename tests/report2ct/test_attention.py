"""Fused attention: the same weights and the same outputs as MONAI's unfused
path, switched on CUDA and forced here on the CPU (SDPA runs there too)."""

from unittest import mock

import torch
from monai.apps.generation.maisi.networks.diffusion_model_unet_maisi import (
    DiffusionModelUNetMaisi,
)
from monai.networks.blocks.selfattention import SABlock

from report2ct.config import ControlConfig, preset
from report2ct.denoiser import Denoiser, attention_blocks, perturb_zero_init, set_fused_attention

CONFIG = preset("tiny")
CONTROL = ControlConfig(legend=((1, "lung"), (2, "heart")))


def unet_kwargs(config):
    unet = config.unet
    return dict(
        spatial_dims=3,
        in_channels=4,
        out_channels=4,
        num_res_blocks=unet.num_res_blocks,
        num_channels=unet.num_channels,
        attention_levels=unet.attention_levels,
        norm_num_groups=unet.norm_num_groups,
        num_head_channels=unet.num_head_channels,
        with_conditioning=True,
        cross_attention_dim=config.context_dim,
    )


def flagged(module):
    return sorted(
        name for name, m in module.named_modules() if getattr(m, "use_flash_attention", 0)
    )


def test_the_switch_flips_exactly_the_blocks_monai_builds_fused_and_no_weight():
    # MONAI refuses the flag without CUDA at construction only: pretend, to
    # see which blocks its own constructor marks.
    with mock.patch("torch.cuda.is_available", return_value=True):
        theirs = DiffusionModelUNetMaisi(**unet_kwargs(CONFIG), use_flash_attention=True)
    ours = DiffusionModelUNetMaisi(**unet_kwargs(CONFIG))
    assert flagged(ours) == []
    assert set_fused_attention(ours, True) == len(attention_blocks(ours)) > 0
    assert flagged(ours) == flagged(theirs)
    assert list(ours.state_dict()) == list(theirs.state_dict())


def test_denoiser_state_dict_is_the_same_fused_or_not():
    on = Denoiser.for_model(CONFIG)
    off = Denoiser.for_model(CONFIG)
    on.fused_attention, off.fused_attention = True, False
    assert list(on.state_dict()) == list(off.state_dict())


@torch.no_grad()
def test_sdpa_block_matches_the_unfused_block_on_cpu():
    torch.manual_seed(0)
    block = SABlock(hidden_size=64, num_heads=4, dim_head=16, use_flash_attention=False).eval()
    x = torch.randn(2, 300, 64)
    unfused = block(x)
    block.use_flash_attention = True
    torch.testing.assert_close(block(x), unfused, atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_fused_denoiser_with_controlnet_matches_unfused_on_cpu():
    config = preset("tiny", control=CONTROL)
    torch.manual_seed(1)
    denoiser = perturb_zero_init(Denoiser.for_model(config), seed=1).eval()
    x = torch.randn(2, 4, 8, 8, 4)
    args = dict(
        t=torch.tensor([0.3, 0.9]),
        context=torch.randn(2, 2, config.context_dim),
        spacing_mm=torch.tensor([[8.0, 8.0, 10.0]] * 2),
        labels=torch.zeros(2, 18),
        control=torch.rand(2, 2, 8, 8, 4),
    )
    denoiser.fused_attention = False
    unfused = denoiser(x, **args)
    assert flagged(denoiser) == []
    denoiser.fused_attention = True
    fused = denoiser(x, **args)
    assert len(flagged(denoiser)) == len(attention_blocks(denoiser)) > 0
    torch.testing.assert_close(fused, unfused, atol=1e-5, rtol=1e-4)
    # bf16 autocast: within bf16's own tolerance of the float32 result.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused_bf16 = denoiser(x, **args).float()
    assert (fused_bf16 - unfused).abs().max() < 0.05 * unfused.abs().max()


def test_the_default_follows_the_device():
    denoiser = Denoiser.for_model(CONFIG)
    denoiser._use_fused_attention(torch.device("cpu"))
    assert flagged(denoiser) == []
    denoiser._use_fused_attention(torch.device("cuda", 0))  # no tensor moves: only the switch
    assert len(flagged(denoiser)) == len(attention_blocks(denoiser))
