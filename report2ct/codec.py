"""The latent codec: HU volumes <-> scaled latents, through MONAI's
`AutoencoderKlMaisi`.

It owns the three numbers that must not be repeated elsewhere: the HU window
(CT is clipped to [-1000, 1000] HU and mapped to [0, 1]), the latent scale
factor (latents are multiplied by it so the diffusion model sees roughly unit
variance), and how large volumes are decoded (`plan_decode`): whole when the
decoder's activations fit the device's memory, otherwise layer by layer in
slabs along x. A slab decode is exact: every GroupNorm normalises with the
statistics of the whole volume (gathered over the slabs of its input before
it is applied), every convolution reads its neighbours' planes as a halo, so
the result equals the whole decode to float rounding and no voxel is decoded
twice. Only the widest full-resolution activation is held whole (as separate
slabs, freed as soon as no later slab needs them; on the host when even that
does not fit the device), beside one slab's working memory. `codec.vae` *is*
a MONAI `AutoencoderKlMaisi`, so a user's pretrained MAISI VAE state dict
loads into it unchanged.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.apps.generation.maisi.networks.autoencoderkl_maisi import (
    AutoencoderKlMaisi,
    MaisiConvolution,
    MaisiGroupNorm3D,
    MaisiResBlock,
    MaisiUpsample,
)
from monai.networks.nets.autoencoderkl import AEKLResBlock
from torch import nn

from report2ct.config import VAEConfig

HU_WINDOW: tuple[float, float] = (-1000.0, 1000.0)
# Activation memory of the whole MAISI decode per output voxel, in units of
# the first level's channel count times 4 bytes: the GroupNorm keeps its
# input, a float32 copy per group and the concatenated result alive beside
# the residual branch and the upsampled input (bench/bench_decode.py measures
# 7.0 on the CPU for the demo VAE).
DECODE_ACTIVATIONS = 8
# A slab decode holds the widest full-resolution activation whole: the last
# upsampling's output (the second level's channels) or a residual block's
# input beside its first convolution's output (twice the first level's).
# Its working memory is about this many times the second level's channels x
# 4 bytes per output voxel of a slab (the upsampled planes, their padded copy,
# the convolution's output and oneDNN's reordered copies: bench_decode.py
# measures 4.8 on the CPU for the demo VAE).
DECODE_SLAB_ACTIVATIONS = 5
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


def build_vae(config: VAEConfig, *, num_splits: int = 1, dim_split: int = 1) -> AutoencoderKlMaisi:
    """MONAI's MAISI VAE for `config`. `num_splits` > 1 runs its convolutions
    in that many slabs along spatial axis `dim_split` (MAISI's own memory
    option, exact; training's large-volume encode uses it); the decode here
    has its own slab plan instead."""
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
        num_splits=num_splits,
        dim_split=dim_split,
        save_mem=num_splits > 1,
    )


def _per_output_voxel(config: VAEConfig) -> tuple[int, int, int]:
    """(whole decode, slab decode resident, slab working memory) bytes per
    output voxel, in 4-byte elements (GroupNorm computes in float32 under
    bf16 autocast too)."""
    c0 = config.num_channels[0]
    c1 = config.num_channels[1] if len(config.num_channels) > 1 else c0
    resident = max(2 * c0, c1) * 4 + 4  # and the float32 output
    return DECODE_ACTIVATIONS * c0 * 4, resident, DECODE_SLAB_ACTIVATIONS * c1 * 4


def decode_bytes_per_latent_voxel(config: VAEConfig) -> int:
    """Estimated activation memory of a whole decode per latent voxel."""
    return _per_output_voxel(config)[0] * config.downsample**3


@dataclass(frozen=True)
class DecodePlan:
    """How one latent is decoded: whole (one slab), or in slabs along x whose
    latent planes are `bounds[k]:bounds[k + 1]`, with the activations held
    whole on the host when `offload` (they do not fit the device)."""

    latent_shape: tuple[int, int, int]
    bounds: tuple[int, ...]
    offload: bool = False

    @property
    def num_tiles(self) -> int:
        return len(self.bounds) - 1

    @property
    def tile(self) -> tuple[int, int, int]:
        """The largest slab, in latent voxels."""
        thickest = max(b - a for a, b in itertools.pairwise(self.bounds))
        return (thickest, *self.latent_shape[1:])

    @property
    def work_ratio(self) -> float:
        """Decoded / needed work: the slabs' total volume over the latent's
        (halos are read, never decoded, so 1.0)."""
        decoded = sum(b - a for a, b in itertools.pairwise(self.bounds))
        return decoded / self.latent_shape[0]


def _even_bounds(size: int, count: int) -> tuple[int, ...]:
    return tuple(round(i * size / count) for i in range(count + 1))


def plan_decode(
    latent_shape: Sequence[int], budget_bytes: int, config: VAEConfig, *, batch: int = 1
) -> DecodePlan:
    """Whole when the whole decode's activations fit `budget_bytes`; else the
    fewest slabs whose working memory fits beside the resident activation,
    with that activation on the host when it does not fit at all."""
    shape = tuple(int(n) for n in latent_shape)
    if len(shape) != 3:
        raise ValueError(f"latent shape {shape}: expected (x, y, z)")
    whole, resident, work = (n * batch for n in _per_output_voxel(config))
    f3 = config.downsample**3
    voxels = math.prod(shape) * f3  # output voxels
    if whole * voxels <= budget_bytes:
        return DecodePlan(shape, (0, shape[0]))
    plane = voxels // shape[0]  # output voxels per latent plane
    for offload in (False, True):
        room = budget_bytes - (0 if offload else resident * voxels)
        thickest = room // (work * plane)
        if thickest >= 1:
            count = -(-shape[0] // min(thickest, shape[0]))
            return DecodePlan(shape, _even_bounds(shape[0], max(count, 2)), offload)
    raise ValueError(
        f"latent {shape}: one latent plane's working memory ({work * plane / 2**30:.2f} GiB) "
        f"exceeds the budget {budget_bytes / 2**30:.2f} GiB: raise the memory budget"
    )


class _Slabs:
    """A (B, C, X, Y, Z) activation as slabs along X, each its own
    allocation: `parts[k]` holds planes `bounds[k]:bounds[k + 1]`, None once
    freed (no later step reads it)."""

    def __init__(self, bounds: Sequence[int], parts: list[torch.Tensor | None] | None = None):
        self.bounds = list(bounds)
        self.parts: list[torch.Tensor | None] = parts or [None] * (len(self.bounds) - 1)

    @classmethod
    def split(cls, whole: torch.Tensor, bounds: Sequence[int], store: torch.device) -> _Slabs:
        return cls(bounds, [whole[:, :, a:b].to(store).clone() for a, b in _pairs(bounds)])

    @property
    def size(self) -> int:
        return self.bounds[-1]

    def _any(self) -> torch.Tensor:
        return next(p for p in self.parts if p is not None)

    def pieces(self, lo: int, hi: int):
        """(source planes, offset from lo) of the planes lo:hi."""
        for (a, b), part in zip(_pairs(self.bounds), self.parts, strict=True):
            if b <= lo or a >= hi:
                continue
            if part is None:
                raise RuntimeError(f"slab {a}:{b} read after it was freed")
            yield part[:, :, max(lo, a) - a : min(hi, b) - a], max(lo, a) - lo

    def planes(self, lo: int, hi: int, device: torch.device) -> torch.Tensor:
        """A copy of planes lo:hi on `device`."""
        return torch.cat([p.to(device) for p, _ in self.pieces(lo, hi)], dim=2)

    def free_below(self, plane: int) -> None:
        """Free the slabs that end at or before `plane`."""
        for k, (_, b) in enumerate(_pairs(self.bounds)):
            if b <= plane:
                self.parts[k] = None

    def whole(self, device: torch.device) -> torch.Tensor:
        out = self.planes(0, self.size, device)
        self.parts = [None] * len(self.parts)
        return out


def _pairs(bounds: Sequence[int]) -> list[tuple[int, int]]:
    return list(itertools.pairwise(bounds))


def _conv3d(module: nn.Module) -> nn.Conv3d:
    """The plain Conv3d inside a MONAI convolution wrapper, checked to be one
    a slab can run with explicit zero padding."""
    while not isinstance(module, nn.Conv3d):
        module = module.conv
    k, p = module.kernel_size, module.padding
    if (
        module.stride != (1, 1, 1)
        or module.dilation != (1, 1, 1)
        or module.groups != 1
        or module.padding_mode != "zeros"
        or any(kk != 2 * pp + 1 for kk, pp in zip(k, p, strict=True))
        or len(set(p)) != 1
    ):
        raise NotImplementedError(f"slab decode: unsupported convolution {module}")
    return module


_Transform = Callable[[torch.Tensor], None]  # in place, pointwise


def _group_norm(src: _Slabs, norm: nn.GroupNorm, *, silu: bool) -> _Transform:
    """`norm` (then SiLU) with the statistics of the whole activation,
    gathered slab by slab (float32 per slab as MAISI computes them, combined
    in float64), as a per-channel in-place transform of any planes."""
    if getattr(norm, "norm_float16", False):
        raise NotImplementedError("slab decode: norm_float16 GroupNorm")
    B, C = src._any().shape[:2]
    G = norm.num_groups
    parts = []
    for part in src.parts:
        values = part.float().reshape(B, G, -1)
        var, mean = torch.var_mean(values, dim=-1, correction=0)
        parts.append((values.shape[-1], mean.double().cpu(), var.double().cpu()))
    n = sum(p[0] for p in parts)
    mean = sum(k * m for k, m, _ in parts) / n
    m2 = sum(k * (v + (m - mean) ** 2) for k, m, v in parts)
    std = (m2 / n + norm.eps).sqrt()
    device = src._any().device
    per_channel = C // G
    shift = mean.repeat_interleave(per_channel, 1).float()
    scale = (1.0 / std).repeat_interleave(per_channel, 1)
    if norm.affine:
        scale = scale * norm.weight.detach().double().cpu()
    bias = (
        norm.bias.detach().float().cpu().expand(B, C)
        if norm.affine
        else torch.zeros(B, C, dtype=torch.float32)
    )

    def view(t: torch.Tensor) -> torch.Tensor:
        return t.float().to(device).view(B, C, 1, 1, 1)

    shift, scale, bias = view(shift), view(scale), view(bias)

    def transform(planes: torch.Tensor) -> None:
        planes.sub_(shift.to(planes.device)).mul_(scale.to(planes.device))
        planes.add_(bias.to(planes.device))
        if silu:
            F.silu(planes, inplace=True)

    return transform


def _conv_input(
    src: _Slabs, lo: int, hi: int, pad: int, transform: _Transform | None, device: torch.device
) -> torch.Tensor:
    """Planes lo - pad : hi + pad of `src` on `device`, transformed (a
    GroupNorm), zero where they fall outside the volume and padded by `pad`
    on y and z: a convolution without padding then gives planes lo:hi of the
    zero-padded convolution of the whole activation."""
    sample = src._any()
    B, C, _, Y, Z = sample.shape
    dtype = torch.float32 if transform is not None else sample.dtype
    buf = torch.zeros(B, C, hi - lo + 2 * pad, Y + 2 * pad, Z + 2 * pad, dtype=dtype, device=device)
    a, b = max(lo - pad, 0), min(hi + pad, src.size)
    inner = buf[:, :, a - lo + pad : b - lo + pad, pad : pad + Y, pad : pad + Z]
    for piece, offset in src.pieces(a, b):
        inner[:, :, offset : offset + piece.shape[2]].copy_(piece)
    if transform is not None:
        transform(inner)
    return buf


def _run(buf: torch.Tensor, conv: nn.Conv3d) -> torch.Tensor:
    return F.conv3d(buf, conv.weight, conv.bias)


def _upsample_conv(src: _Slabs, block: MaisiUpsample, lo: int, hi: int, device) -> torch.Tensor:
    """Planes 2lo:2hi of `block` (trilinear x2, then a 3^3 convolution) from
    input planes lo - 1 : hi + 1: the upsampled planes 2lo - 1 : 2hi + 1 see
    the same neighbours and weights as in the whole volume."""
    conv = _conv3d(block.conv)
    if block.use_convtranspose or conv.padding[0] != 1:
        raise NotImplementedError(f"slab decode: unsupported upsampling {block}")
    a, b = max(lo - 1, 0), min(hi + 1, src.size)
    up = F.interpolate(src.planes(a, b, device), scale_factor=2.0, mode="trilinear")
    first, last = max(2 * lo - 1, 0), min(2 * hi + 1, 2 * src.size)
    up = up[:, :, first - 2 * a : last - 2 * a]
    up = F.pad(up, (1, 1, 1, 1, int(lo == 0), int(hi == src.size)))
    return _run(up, conv)


def _conv_stage(
    src: _Slabs, conv: nn.Conv3d, transform: _Transform | None, device, store
) -> _Slabs:
    """A convolution block, slab by slab; frees its input as it goes."""
    pad = conv.padding[0]
    out = _Slabs(src.bounds)
    for k, (lo, hi) in enumerate(_pairs(src.bounds)):
        out.parts[k] = _run(_conv_input(src, lo, hi, pad, transform, device), conv).to(store)
        src.free_below(hi - pad)
    return out


def _upsample_stage(src: _Slabs, block: MaisiUpsample, device, store) -> _Slabs:
    out = _Slabs([2 * b for b in src.bounds])
    for k, (lo, hi) in enumerate(_pairs(src.bounds)):
        out.parts[k] = _upsample_conv(src, block, lo, hi, device).to(store)
        src.free_below(hi - 1)
    return out


def _pointwise(src: _Slabs, transform: _Transform, device, store) -> _Slabs:
    for k, part in enumerate(src.parts):
        planes = part.to(device=device, dtype=torch.float32, copy=True)
        transform(planes)
        src.parts[k] = planes.to(store)
    return src


def _res_stage(x: _Slabs, block: nn.Module, device, store) -> _Slabs:
    """A residual block (norm1, SiLU, conv1, norm2, SiLU, conv2, + the input
    or its 1x1 projection) in two passes over the slabs, each norm with the
    statistics of its whole input: the first makes h = conv1(...) and the
    projected input (freeing the input as it goes), the second the output
    (freeing h and the skip as it goes)."""
    conv1, conv2 = _conv3d(block.conv1), _conv3d(block.conv2)
    nin = _conv3d(block.nin_shortcut) if block.in_channels != block.out_channels else None
    norm1 = _group_norm(x, block.norm1, silu=True)
    h = _Slabs(x.bounds)
    skip = _Slabs(x.bounds) if nin is not None else x
    for k, (lo, hi) in enumerate(_pairs(x.bounds)):
        h.parts[k] = _run(_conv_input(x, lo, hi, 1, norm1, device), conv1).to(store)
        if nin is not None:
            skip.parts[k] = _run(x.parts[k].to(device), nin).to(store)  # 1x1: no halo
            x.free_below(hi - 1)
    norm2 = _group_norm(h, block.norm2, silu=True)
    out = _Slabs(x.bounds)
    for k, (lo, hi) in enumerate(_pairs(x.bounds)):
        residual = _run(_conv_input(h, lo, hi, 1, norm2, device), conv2)
        out.parts[k] = (skip.parts[k].to(device) + residual).to(store)
        skip.parts[k] = None
        h.free_below(hi - 1)
    return out


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
        """The decode plan of `latent` under `budget_bytes` (default: the
        device's, `decode_budget_bytes`)."""
        if budget_bytes is None:
            budget_bytes = self.decode_budget_bytes(latent.device)
        return plan_decode(latent.shape[2:], budget_bytes, self.config, batch=latent.shape[0])

    def decode_volume(
        self, latent: torch.Tensor, *, budget_bytes: int | None = None
    ) -> torch.Tensor:
        """Scaled latent -> HU: whole when it fits the memory budget, in
        exact slabs otherwise (`plan`)."""
        plan = self.plan(latent, budget_bytes=budget_bytes)
        if plan.num_tiles == 1:
            return self.decode(latent)
        return self.decode_plan(latent, plan)

    def decode_plan(self, latent: torch.Tensor, plan: DecodePlan) -> torch.Tensor:
        """Scaled latent (B, C, x, y, z) -> float32 HU (B, 1, X, Y, Z), block
        by block of the MAISI decoder in the slabs of `plan`: equal to the
        whole decode to float rounding."""
        if tuple(latent.shape[2:]) != plan.latent_shape:
            raise ValueError(
                f"latent {tuple(latent.shape)} does not match plan {plan.latent_shape}"
            )
        device = latent.device
        store = torch.device("cpu") if plan.offload else device
        z = self.vae.post_quant_conv(latent / self.latent_scale)  # 1x1, at latent size
        x = _Slabs.split(z, plan.bounds, store)
        del z
        pending: _Transform | None = None  # a GroupNorm block, applied by the next convolution
        for block in self.vae.decoder.blocks:
            if isinstance(block, MaisiGroupNorm3D | nn.GroupNorm) and pending is None:
                pending = _group_norm(x, block, silu=False)
                continue
            if pending is not None and not isinstance(block, MaisiConvolution):
                x = _pointwise(x, pending, device, store)
                pending = None
                if isinstance(block, MaisiGroupNorm3D | nn.GroupNorm):
                    pending = _group_norm(x, block, silu=False)
                    continue
            if isinstance(block, MaisiConvolution):
                x = _conv_stage(x, _conv3d(block), pending, device, store)
                pending = None
            elif isinstance(block, MaisiUpsample):
                x = _upsample_stage(x, block, device, store)
            elif isinstance(block, MaisiResBlock | AEKLResBlock):
                x = _res_stage(x, block, device, store)
            else:  # attention and anything else: whole (small: the lowest level)
                whole = block(x.whole(device))
                scale = whole.shape[2] // x.size
                x = _Slabs.split(whole, [b * scale for b in x.bounds], store)
                del whole
        if pending is not None:
            x = _pointwise(x, pending, device, store)
        B, C, _, Y, Z = x._any().shape
        out = torch.empty(B, C, x.size, Y, Z, dtype=torch.float32, device=device)
        for k, (a, b) in enumerate(_pairs(x.bounds)):
            out[:, :, a:b] = x.parts[k]
            x.parts[k] = None
        low, high = HU_WINDOW
        return out.clamp_(0.0, 1.0).mul_(high - low).add_(low)  # unit_to_hu, in place
