"""The latent codec: HU volumes <-> scaled latents, through MONAI's
`AutoencoderKlMaisi`.

It owns the three numbers that must not be repeated elsewhere: the HU window
(CT is clipped to [-1000, 1000] HU and mapped to [0, 1]), the latent scale
factor (latents are multiplied by it so the diffusion model sees roughly unit
variance), and the tile size of sliding-window decoding (bounded memory for
large volumes). `codec.vae` *is* a MONAI `AutoencoderKlMaisi`, so a user's
pretrained MAISI VAE state dict loads into it unchanged.
"""

from __future__ import annotations

import torch
from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi
from monai.inferers import SlidingWindowInferer
from torch import nn

from report2ct.config import VAEConfig

HU_WINDOW: tuple[float, float] = (-1000.0, 1000.0)
# Sliding-window decode tile, in latent voxels per axis: latents up to this
# size decode whole, larger ones in overlapping tiles of this size.
DECODE_TILE_LATENT = 32


def hu_to_unit(hu: torch.Tensor) -> torch.Tensor:
    """Clip to the HU window and map it linearly onto [0, 1]."""
    low, high = HU_WINDOW
    return (hu.clamp(low, high) - low) / (high - low)


def unit_to_hu(unit: torch.Tensor) -> torch.Tensor:
    low, high = HU_WINDOW
    return unit.clamp(0.0, 1.0) * (high - low) + low


def build_vae(config: VAEConfig) -> AutoencoderKlMaisi:
    return AutoencoderKlMaisi(
        spatial_dims=3,
        in_channels=1,
        out_channels=1,
        num_res_blocks=config.num_res_blocks,
        num_channels=config.num_channels,
        attention_levels=config.attention_levels,
        latent_channels=config.latent_channels,
        norm_num_groups=config.norm_num_groups,
        with_encoder_nonlocal_attn=config.with_encoder_nonlocal_attn,
        with_decoder_nonlocal_attn=config.with_decoder_nonlocal_attn,
        use_checkpointing=False,
        use_convtranspose=False,
        norm_float16=False,
        num_splits=1,  # MAISI's channel splitting saves GPU memory; tiling does that here
        dim_split=1,
        save_mem=False,
    )


class LatentCodec(nn.Module):
    """HU <-> latent. Tensors are (B, 1, X, Y, Z) HU and (B, C, X/f, Y/f, Z/f)
    latents, f = `config.downsample` (4 for MAISI)."""

    def __init__(self, config: VAEConfig, *, latent_scale: float = 1.0) -> None:
        super().__init__()
        self.config = config
        self.vae = build_vae(config)
        self.latent_scale = latent_scale

    @property
    def downsample(self) -> int:
        return self.config.downsample

    def encode(
        self, hu: torch.Tensor, *, sample: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """HU (B,1,X,Y,Z) -> scaled latent (B,C,X/f,Y/f,Z/f): the posterior
        mean, or a draw from it when `sample`."""
        mu, sigma = self.vae.encode(hu_to_unit(hu))
        if sample:
            mu = mu + sigma * torch.randn(
                mu.shape, generator=generator, device=mu.device, dtype=mu.dtype
            )
        return mu * self.latent_scale

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Scaled latent -> HU, decoded whole."""
        return unit_to_hu(self.vae.decode(latent / self.latent_scale))

    def decode_volume(self, latent: torch.Tensor) -> torch.Tensor:
        """Scaled latent -> HU: whole when it fits one tile, tiled otherwise."""
        if max(latent.shape[2:]) > DECODE_TILE_LATENT:
            return self.decode_tiled(latent)
        return self.decode(latent)

    def decode_tiled(
        self,
        latent: torch.Tensor,
        *,
        tile_latent: int = DECODE_TILE_LATENT,
        overlap: float = 0.25,
    ) -> torch.Tensor:
        """Scaled latent -> HU in overlapping tiles of `tile_latent`^3 latent
        voxels blended with Gaussian weights: memory bounded by the tile, not
        the volume (MAISI decodes 480x480x256 this way)."""
        roi = tuple(min(tile_latent, size) for size in latent.shape[2:])
        inferer = SlidingWindowInferer(
            roi_size=roi, sw_batch_size=1, overlap=overlap, mode="gaussian", progress=False
        )
        unit = inferer(latent / self.latent_scale, self.vae.decode)
        return unit_to_hu(unit)
