"""The denoiser: MONAI's `DiffusionModelUNetMaisi` behind one call,
`denoiser(x_t, t, context, spacing_mm) -> velocity`.

Rectified flow (Liu et al. 2022; MAISI-v2's `RFlowScheduler` convention):
    x_t = (1 - t) * x_0 + t * noise,  t in [0, 1] (1 = pure noise)
    v   = dx_t / d(-t) = x_0 - noise
so a sampler integrates x from t=1 to t=0 with x <- x + v * (t - t_next).
The prediction target, the time scaling and the spacing input all live here,
so samplers, losses and trainers only ever call a denoiser (edm2's `Precond`
idea).
"""

from __future__ import annotations

import torch
from monai.apps.generation.maisi.networks.diffusion_model_unet_maisi import (
    DiffusionModelUNetMaisi,
)
from torch import nn

from report2ct.config import ModelConfig, UNetConfig

# MAISI feeds spacing in units of 10 micrometres (spacing_mm * 100) to its
# spacing embedding; keep its convention so MAISI checkpoints stay compatible.
SPACING_INPUT_SCALE = 100.0


class Denoiser(nn.Module):
    def __init__(
        self,
        config: UNetConfig,
        *,
        latent_channels: int,
        context_dim: int,
        num_train_timesteps: int = 1000,
    ) -> None:
        super().__init__()
        self.config = config
        self.num_train_timesteps = num_train_timesteps
        self.unet = DiffusionModelUNetMaisi(
            spatial_dims=3,
            in_channels=latent_channels,
            out_channels=latent_channels,
            num_res_blocks=config.num_res_blocks,
            num_channels=config.num_channels,
            attention_levels=config.attention_levels,
            norm_num_groups=config.norm_num_groups,
            num_head_channels=config.num_head_channels,
            with_conditioning=True,
            cross_attention_dim=context_dim,
            include_spacing_input=config.include_spacing_input,
        )

    @classmethod
    def for_model(cls, config: ModelConfig) -> Denoiser:
        """The denoiser a whole model config asks for (latent channels from
        its VAE, context width from its text encoders)."""
        return cls(
            config.unet,
            latent_channels=config.vae.latent_channels,
            context_dim=config.context_dim,
            num_train_timesteps=config.num_train_timesteps,
        )

    def forward(
        self,
        x_t: torch.Tensor,  # (B, C, x, y, z) noisy latent
        t: torch.Tensor,  # (B,) flow time in [0, 1], 1 = noise
        context: torch.Tensor,  # (B, 2, D) report tokens (zeros = unconditional)
        spacing_mm: torch.Tensor,  # (B, 3) voxel spacing of the output volume
    ) -> torch.Tensor:  # (B, C, x, y, z) velocity x_0 - noise
        timesteps = t * self.num_train_timesteps  # MONAI's scale: [0, 1000]
        spacing = spacing_mm * SPACING_INPUT_SCALE if self.config.include_spacing_input else None
        dtype = x_t.dtype
        return self.unet(
            x=x_t,
            timesteps=timesteps.to(dtype),
            context=context.to(dtype),
            spacing_tensor=None if spacing is None else spacing.to(dtype),
        )


def perturb_zero_init(module: nn.Module, *, std: float = 0.02, seed: int = 0) -> nn.Module:
    """Give MONAI's zero-initialised layers (output convs, attention
    projections: a fresh UNet predicts exactly 0) small random weights, so an
    untrained model computes a non-trivial function. For random bundles in
    tests and benchmarks; training starts from MONAI's init."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            if param.ndim >= 2 and not param.any():
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    return module
