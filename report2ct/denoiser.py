"""The denoiser: MONAI's `DiffusionModelUNetMaisi` behind one call,
`denoiser(x_t, t, context, spacing_mm, labels=None, control=None) -> velocity`.

Optional conditions, each switched on by the model config:
- `labels` (B, 18) in {+1 present, -1 absent, 0 not given}: a bias-free
  linear map makes them one more context token, so "nothing given" is the
  zero token, the same empty condition as dropped text;
- `control` (B, K, x, y, z) mask-class occupancy (`report2ct.control`): a
  `ControlNetMaisi` branch adds its outputs to the UNet's skip connections.

Attention (UNet and ControlNet alike) runs fused, through PyTorch's
`scaled_dot_product_attention` (MONAI's `use_flash_attention` path), when the
inputs are on a CUDA device, and unfused elsewhere: at the paper's 14,400
tokens the unfused path materialises a 3.3e9-element score matrix per block.
The switch is an attribute of MONAI's attention blocks, not a weight, so the
state dict is the same either way.

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
from monai.apps.generation.maisi.networks.controlnet_maisi import ControlNetMaisi
from monai.apps.generation.maisi.networks.diffusion_model_unet_maisi import (
    DiffusionModelUNetMaisi,
)
from monai.networks.blocks.crossattention import CrossAttentionBlock
from monai.networks.blocks.selfattention import SABlock
from torch import nn

from report2ct.condition import empty
from report2ct.config import ControlConfig, ModelConfig, UNetConfig
from report2ct.labels import NUM_LABELS

# MAISI feeds spacing in units of 10 micrometres (spacing_mm * 100) to its
# spacing embedding; keep its convention so MAISI checkpoints stay compatible.
SPACING_INPUT_SCALE = 100.0


def attention_blocks(module: nn.Module) -> list[nn.Module]:
    """MONAI's self- and cross-attention blocks inside `module`."""
    return [m for m in module.modules() if isinstance(m, SABlock | CrossAttentionBlock)]


def set_fused_attention(module: nn.Module, enabled: bool) -> int:
    """Switch every MONAI attention block in `module` to PyTorch's fused
    `scaled_dot_product_attention` (or back); returns how many. MONAI reads
    the flag at each forward; its constructors refuse it without CUDA, which
    this sidesteps (SDPA also runs on the CPU)."""
    blocks = attention_blocks(module)
    for block in blocks:
        block.use_flash_attention = bool(enabled)
    return len(blocks)


class Denoiser(nn.Module):
    def __init__(
        self,
        config: UNetConfig,
        *,
        latent_channels: int,
        context_dim: int,
        num_train_timesteps: int = 1000,
        label_condition: bool = False,
        control: ControlConfig | None = None,
        fused_attention: bool | None = None,
    ) -> None:
        """`fused_attention`: None (default) fuses attention whenever the
        inputs are on a CUDA device; True or False forces it."""
        super().__init__()
        self.config = config
        self.fused_attention = fused_attention
        self._fused_now: bool | None = None
        self.num_train_timesteps = num_train_timesteps
        shared = dict(
            spatial_dims=3,
            in_channels=latent_channels,
            num_res_blocks=config.num_res_blocks,
            num_channels=config.num_channels,
            attention_levels=config.attention_levels,
            norm_num_groups=config.norm_num_groups,
            num_head_channels=config.num_head_channels,
            with_conditioning=True,
            cross_attention_dim=context_dim,
        )
        self.unet = DiffusionModelUNetMaisi(
            **shared,
            out_channels=latent_channels,
            include_spacing_input=config.include_spacing_input,
        )
        self.label_embedding = (
            nn.Linear(NUM_LABELS, context_dim, bias=False) if label_condition else None
        )
        self.control = control
        self.controlnet = (
            ControlNetMaisi(
                **shared,
                conditioning_embedding_in_channels=control.num_classes,
                conditioning_embedding_num_channels=control.embedding_channels,
                use_checkpointing=False,
            )
            if control is not None
            else None
        )

    def init_controlnet_from_unet(self) -> None:
        """ControlNet's start (Zhang et al. 2023, MAISI): the branch begins as
        a copy of the trained UNet encoder; its zero-initialised output
        convolutions make the controlled model equal the UNet at step 0.
        Weights whose shapes differ stay fresh (the UNet's residual blocks
        also see the spacing embedding; the ControlNet's do not)."""
        from monai.networks.utils import copy_model_state

        _, copied, _ = copy_model_state(self.controlnet, self.unet.state_dict(), inplace=True)
        if not copied:
            raise RuntimeError("no UNet weight fits the ControlNet: configs disagree")

    @classmethod
    def for_model(cls, config: ModelConfig) -> Denoiser:
        """The denoiser a whole model config asks for (latent channels from
        its VAE, context width from its text encoders)."""
        return cls(
            config.unet,
            latent_channels=config.vae.latent_channels,
            context_dim=config.context_dim,
            num_train_timesteps=config.num_train_timesteps,
            label_condition=config.label_condition,
            control=config.control,
        )

    def _use_fused_attention(self, device: torch.device) -> None:
        wanted = self.fused_attention
        if wanted is None:
            wanted = device.type == "cuda"
        if wanted != self._fused_now:
            set_fused_attention(self, wanted)
            self._fused_now = wanted

    def forward(
        self,
        x_t: torch.Tensor,  # (B, C, x, y, z) noisy latent
        t: torch.Tensor,  # (B,) flow time in [0, 1], 1 = noise
        context: torch.Tensor,  # (B, 2, D) report tokens (zeros = unconditional)
        spacing_mm: torch.Tensor,  # (B, 3) voxel spacing of the output volume
        labels: torch.Tensor | None = None,  # (B, 18) +1 / -1 / 0 (not given)
        control: torch.Tensor | None = None,  # (B, K, x, y, z) mask-class occupancy
    ) -> torch.Tensor:  # (B, C, x, y, z) velocity x_0 - noise
        self._use_fused_attention(x_t.device)
        timesteps = (t * self.num_train_timesteps).to(x_t.dtype)  # MONAI's scale: [0, 1000]
        spacing = spacing_mm * SPACING_INPUT_SCALE if self.config.include_spacing_input else None
        dtype = x_t.dtype
        context = context.to(dtype)
        if self.label_embedding is not None:
            if labels is None:
                labels = empty(len(x_t), NUM_LABELS, device=x_t.device)
            token = self.label_embedding(labels.to(dtype=self.label_embedding.weight.dtype))
            context = torch.cat([context, token.to(dtype)[:, None]], dim=1)
        elif labels is not None and labels.any():
            raise ValueError("this model has no label condition: ask by text")
        residuals = {}
        if control is not None:
            if self.controlnet is None:
                raise ValueError("this model has no mask condition (ControlNet)")
            down, mid = self.controlnet(
                x=x_t,
                timesteps=timesteps,
                controlnet_cond=control.to(dtype),
                conditioning_scale=self.control.conditioning_scale,
                context=context,
            )
            residuals = {
                "down_block_additional_residuals": tuple(down),
                "mid_block_additional_residual": mid,
            }
        return self.unet(
            x=x_t,
            timesteps=timesteps,
            context=context,
            spacing_tensor=None if spacing is None else spacing.to(dtype),
            **residuals,
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
