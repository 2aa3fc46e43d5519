"""The latent codec: HU volumes <-> scaled latents, through MONAI's
`AutoencoderKlMaisi`.

It owns the three numbers that must not be repeated elsewhere: the HU window
(CT is clipped to [-1000, 1000] HU and mapped to [0, 1]), the latent scale
factor (latents are multiplied by it so the diffusion model sees roughly unit
variance), and how large volumes are decoded: in as few overlapping tiles as
the device's memory allows (`plan_decode`). `codec.vae` *is* a MONAI
`AutoencoderKlMaisi`, so a user's pretrained MAISI VAE state dict loads into
it unchanged.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi
from torch import nn

from report2ct.config import VAEConfig

HU_WINDOW: tuple[float, float] = (-1000.0, 1000.0)
# The largest decode tile edge, in latent voxels, when nothing else bounds it:
# kept for callers that ask for fixed cubic tiles (`decode_tiled`).
DECODE_TILE_LATENT = 32
# Overlap between neighbouring tiles, in latent voxels. The decoder's 3x3x3
# convolutions see zero padding at a tile's edge and its GroupNorm statistics
# are the tile's own, so the seam is blended over the overlap; 4 latent voxels
# (16 output voxels at f = 4) keep the decoded/needed work near 1.1 at the
# paper's latent while leaving room for the cross-fade.
DECODE_OVERLAP_LATENT = 4
# Activation memory of the MAISI decoder per output voxel, in units of the
# first level's channel count times 4 bytes: the GroupNorm keeps its input, a
# float32 copy per group and the concatenated result alive beside the
# residual branch and the upsampled input (bench/bench_decode.py measures 7.0
# on the CPU for the demo VAE).
DECODE_ACTIVATIONS = 8
# Without a CUDA device the budget is this many bytes (a CPU worker shares its
# RAM with the writers); on CUDA it is this fraction of the free memory.
DECODE_BUDGET_CPU_BYTES = 4 << 30
DECODE_BUDGET_CUDA_FRACTION = 0.8


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


def decode_bytes_per_latent_voxel(config: VAEConfig) -> int:
    """Estimated decoder activation memory per latent voxel of a tile.
    MaisiGroupNorm3D computes in float32 whatever the autocast dtype, so the
    estimate is in 4-byte elements under bf16 too."""
    return DECODE_ACTIVATIONS * config.num_channels[0] * config.downsample**3 * 4


@dataclass(frozen=True)
class DecodePlan:
    """How one latent is decoded: `starts[a]` are the tile origins along axis
    a, every tile `tile` latent voxels (the whole latent when one tile)."""

    latent_shape: tuple[int, int, int]
    tile: tuple[int, int, int]
    starts: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]

    @property
    def num_tiles(self) -> int:
        return math.prod(len(s) for s in self.starts)

    @property
    def work_ratio(self) -> float:
        """Decoded / needed work: the tiles' total volume over the latent's."""
        return self.num_tiles * math.prod(self.tile) / math.prod(self.latent_shape)


def _starts(size: int, tile: int, count: int) -> tuple[int, ...]:
    if count == 1:
        return (0,)
    return tuple(round(i * (size - tile) / (count - 1)) for i in range(count))


def _tile_for(size: int, count: int, overlap: int) -> int:
    """The edge that covers `size` with `count` tiles overlapping by `overlap`."""
    return size if count == 1 else min(size, -(-(size + (count - 1) * overlap) // count))


def plan_decode(
    latent_shape: Sequence[int],
    max_tile_voxels: int,
    *,
    overlap: int = DECODE_OVERLAP_LATENT,
) -> DecodePlan:
    """The tiling of least decoded volume whose tiles hold at most
    `max_tile_voxels` latent voxels each, neighbours overlapping by `overlap`
    (the whole latent when it fits)."""
    shape = tuple(int(n) for n in latent_shape)
    if len(shape) != 3:
        raise ValueError(f"latent shape {shape}: expected (x, y, z)")
    best = None
    # Tile counts per axis while a tile stays over twice the overlap thick
    # (thinner tiles would be mostly seam).
    counts = [range(1, max(1, (n - overlap) // (overlap + 1)) + 1) for n in shape]
    for combo in itertools.product(*counts):
        tile = tuple(_tile_for(n, c, overlap) for n, c in zip(shape, combo, strict=True))
        if math.prod(tile) > max_tile_voxels or any(
            c > 1 and t <= 2 * overlap for t, c in zip(tile, combo, strict=True)
        ):
            continue
        work = math.prod(combo) * math.prod(tile)
        key = (work, math.prod(combo))
        if best is None or key < best[0]:
            best = (key, tile, combo)
    if best is None:
        raise ValueError(
            f"no tiling of latent {shape} fits {max_tile_voxels} latent voxels per tile "
            f"with overlap {overlap}: raise the memory budget"
        )
    _, tile, combo = best
    starts = tuple(_starts(n, t, c) for n, t, c in zip(shape, tile, combo, strict=True))
    return DecodePlan(shape, tile, starts)


def _axis_weights(size: int, tile: int, starts: Sequence[int], factor: int) -> list[torch.Tensor]:
    """Per-tile blend weights along one axis, at output resolution, summing
    to 1 at every position: each tile's weight ramps linearly across the
    middle half of its overlap with a neighbour and is 0 on the outer quarter
    (the voxels that saw the tile's zero padding)."""
    positions = torch.arange(size * factor, dtype=torch.float64) + 0.5
    raw = []
    for i, start in enumerate(starts):
        low, high = start * factor, (start + tile) * factor
        weight = torch.ones(size * factor, dtype=torch.float64)
        if i > 0:  # overlap with the previous tile: [low, previous high)
            previous_high = (starts[i - 1] + tile) * factor
            width = previous_high - low
            ramp = ((positions - low - width / 4) / max(width / 2, 1e-9)).clamp(0, 1)
            weight = weight * ramp
        if i < len(starts) - 1:
            next_low = starts[i + 1] * factor
            width = high - next_low
            ramp = ((high - width / 4 - positions) / max(width / 2, 1e-9)).clamp(0, 1)
            weight = weight * ramp
        weight[:low] = 0
        weight[high:] = 0
        raw.append(weight)
    total = torch.stack(raw).sum(0)
    if bool((total <= 0).any()):
        raise ValueError(f"tiles {list(starts)} of {tile} leave gaps in {size}: overlap too small")
    return [
        (w / total)[s * factor : (s + tile) * factor].float()
        for w, s in zip(raw, starts, strict=True)
    ]


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

    def decode_bytes_per_latent_voxel(self) -> int:
        return decode_bytes_per_latent_voxel(self.config)

    def decode_budget_bytes(self, device: torch.device) -> int:
        """The memory a decode may use on `device`: most of the free memory
        of a CUDA device, a fixed budget elsewhere."""
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            # Blocks PyTorch's caching allocator holds but no tensor uses
            # (the sampler's activations) are free to the decode as well.
            cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
            return int((free + cached) * DECODE_BUDGET_CUDA_FRACTION)
        return DECODE_BUDGET_CPU_BYTES

    def plan(self, latent: torch.Tensor, *, budget_bytes: int | None = None) -> DecodePlan:
        """The decode plan of `latent` (B=1) under `budget_bytes` (default:
        the device's, `decode_budget_bytes`)."""
        if budget_bytes is None:
            budget_bytes = self.decode_budget_bytes(latent.device)
        per_voxel = self.decode_bytes_per_latent_voxel()
        return plan_decode(latent.shape[2:], max(1, budget_bytes // per_voxel))

    def decode_volume(
        self, latent: torch.Tensor, *, budget_bytes: int | None = None
    ) -> torch.Tensor:
        """Scaled latent -> HU: whole when it fits the memory budget, in the
        fewest-work overlapping tiles that fit otherwise (`plan`)."""
        plan = self.plan(latent, budget_bytes=budget_bytes)
        if plan.num_tiles == 1:
            return self.decode(latent)
        return self.decode_plan(latent, plan)

    def decode_plan(self, latent: torch.Tensor, plan: DecodePlan) -> torch.Tensor:
        """Scaled latent (B, C, x, y, z) -> HU (B, 1, X, Y, Z) tile by tile,
        blended by separable weights that sum to 1; memory bounded by one
        tile plus the float32 output."""
        f = self.downsample
        if tuple(latent.shape[2:]) != plan.latent_shape:
            raise ValueError(
                f"latent {tuple(latent.shape)} does not match plan {plan.latent_shape}"
            )
        weights = [
            _axis_weights(n, t, s, f)
            for n, t, s in zip(plan.latent_shape, plan.tile, plan.starts, strict=True)
        ]
        out_shape = (latent.shape[0], 1, *(n * f for n in plan.latent_shape))
        out = torch.zeros(out_shape, dtype=torch.float32, device=latent.device)
        tx, ty, tz = plan.tile
        for (i, x0), (j, y0), (k, z0) in itertools.product(*(enumerate(s) for s in plan.starts)):
            tile = latent[:, :, x0 : x0 + tx, y0 : y0 + ty, z0 : z0 + tz]
            unit = self.vae.decode(tile / self.latent_scale).float()
            w = (
                weights[0][i].to(out.device)[:, None, None]
                * weights[1][j].to(out.device)[None, :, None]
                * weights[2][k].to(out.device)[None, None, :]
            )
            out[:, :, x0 * f : (x0 + tx) * f, y0 * f : (y0 + ty) * f, z0 * f : (z0 + tz) * f] += (
                unit * w
            )
            del unit
        return unit_to_hu(out)

    def decode_tiled(
        self,
        latent: torch.Tensor,
        *,
        tile_latent: int = DECODE_TILE_LATENT,
        overlap: float = 0.25,
    ) -> torch.Tensor:
        """Scaled latent -> HU in overlapping tiles of at most `tile_latent`
        latent voxels per axis, neighbours overlapping by about `overlap` of
        a tile: for a fixed tile size; `decode_volume` sizes tiles to memory."""
        shape = tuple(latent.shape[2:])
        tile = tuple(min(tile_latent, n) for n in shape)
        step = [max(1, round(t * (1 - overlap))) for t in tile]
        starts = tuple(
            _starts(n, t, 1 if t >= n else -(-(n - t) // s) + 1)
            for n, t, s in zip(shape, tile, step, strict=True)
        )
        return self.decode_plan(latent, DecodePlan(shape, tile, starts))
