"""Computed once, reused every step: latents of the training volumes (with
the latent scale factor that gives them unit variance) and report contexts
from the text conditioner. Stored as safetensors beside the run."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from report2ct.codec import LatentCodec
from report2ct.config import ModelConfig
from report2ct.text import TextConditioner
from training.data.volumes import VolumeConditions


@torch.no_grad()
def encode_latents(codec: LatentCodec, volumes_hu: torch.Tensor, *, batch: int = 4) -> torch.Tensor:
    """Posterior means (unscaled), (N, C, x, y, z)."""
    codec.eval()
    scale, codec.latent_scale = codec.latent_scale, 1.0
    out = torch.cat(
        [codec.encode(volumes_hu[i : i + batch].float()) for i in range(0, len(volumes_hu), batch)]
    )
    codec.latent_scale = scale
    return out


def latent_scale_factor(latents: torch.Tensor) -> float:
    """1 / std: the diffusion model sees unit-variance latents (LDM, sec. 4.3)."""
    return float(1.0 / latents.float().std().clamp(min=1e-6))


@torch.no_grad()
def encode_reports(
    conditioner: TextConditioner, findings: list[str], impressions: list[str], *, batch: int = 32
) -> torch.Tensor:
    return torch.cat(
        [
            conditioner.encode(findings[i : i + batch], impressions[i : i + batch]).cpu()
            for i in range(0, len(findings), batch)
        ]
    )


def save_cache(path: Path, **tensors: torch.Tensor) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))


def load_cache(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def latent_text_cache(
    path: Path,
    codec: LatentCodec,
    config: ModelConfig,
    volumes_hu: torch.Tensor,
    conditions: list[VolumeConditions],
    *,
    encoders_dir: Path | None,
    allow_remote_code: bool = False,
) -> tuple[dict[str, torch.Tensor], float]:
    """The diffusion stage's inputs, computed once into `path` and reused:
    see `load_latent_cache`. `encoders_dir` holds `bundle:` text encoders;
    `allow_remote_code` lets those that ship their own code run it."""
    if not path.exists():
        latents = encode_latents(codec, volumes_hu)
        conditioner = TextConditioner(
            config.encoders, bundle_dir=encoders_dir, allow_remote_code=allow_remote_code
        )
        contexts = encode_reports(
            conditioner, [c.findings for c in conditions], [c.impression for c in conditions]
        )
        spacings = torch.tensor([c.spacing_mm for c in conditions], dtype=torch.float32)
        save_cache(path, latents=latents, contexts=contexts, spacings=spacings)
    return load_latent_cache(path)


def load_latent_cache(path: Path) -> tuple[dict[str, torch.Tensor], float]:
    """(the cache with its latents scaled to unit variance, its contexts and
    spacings; the latent scale factor, which the model config must carry)."""
    cached = load_cache(path)
    scale = latent_scale_factor(cached["latents"])
    cached["latents"] = cached["latents"] * scale
    return cached, scale
