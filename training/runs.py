"""Each `ctfactory train` stage as one call, from a CT-RATE-layout data set
and the run directories of the stages before it:

    train_vae_run(data, "runs/vae", config, train_config)
    train_ldm_run(data, "runs/vae", "runs/ldm", config, train_config, encoders_dir=...)
    train_controlnet_run(data, "runs/ldm", "runs/controlnet", config, train_config)

A later stage reads an earlier run's latest EMA weights and, after the LDM,
its latent cache (`load_ldm_run`), so the runs chain without a bundle.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from report2ct.codec import LatentCodec
from report2ct.config import ControlConfig, ModelConfig
from report2ct.denoiser import Denoiser
from training.caches import latent_text_cache, load_latent_cache
from training.data.ctrate import mask_legend
from training.data.volumes import load_volumes
from training.engine import TrainConfig, TrainResult, load_ema
from training.stages import LatentSet, train_controlnet, train_ldm, train_vae

CACHE = "cache.safetensors"  # an LDM run's latent and text cache


@dataclass
class LdmRun:
    config: ModelConfig  # with the run's latent scale (and a data set's mask legend)
    denoiser: Denoiser  # the run's latest EMA weights
    cache: dict[str, torch.Tensor]  # latents scaled, contexts, spacings
    step: int


def load_ldm_run(
    config: ModelConfig, ldm_run: str | Path, data: str | Path | None = None
) -> LdmRun:
    """A `train ldm` run: its latent scale, cache and trained denoiser; given
    a data set, the config also gets its mask legend (the ControlNet's)."""
    ldm_run = Path(ldm_run)
    cache, scale = load_latent_cache(ldm_run / CACHE)
    config = dataclasses.replace(config, latent_scale=scale)
    denoiser = Denoiser.for_model(config)
    step = load_ema(denoiser, ldm_run)
    if data is not None:
        config = dataclasses.replace(config, control=ControlConfig(legend=mask_legend(data)))
    return LdmRun(config, denoiser, cache, step)


def train_vae_run(
    data: str | Path,
    out: str | Path,
    config: ModelConfig,
    train_config: TrainConfig,
    *,
    crop: tuple[int, int, int] = (32, 32, 32),
) -> TrainResult:
    volumes, _ = load_volumes(data, config)
    _, result = train_vae(config, volumes, train_config, Path(out), crop=crop)
    return result


def train_ldm_run(
    data: str | Path,
    vae_run: str | Path,
    out: str | Path,
    config: ModelConfig,
    train_config: TrainConfig,
    *,
    encoders_dir: Path | None = None,
) -> tuple[float, TrainResult]:
    """(the latent scale factor, the result); the caches go to OUT/cache.safetensors."""
    out = Path(out)
    codec = LatentCodec(config.vae)
    load_ema(codec.vae, vae_run)
    volumes, conditions = load_volumes(data, config)
    cached, scale = latent_text_cache(
        out / CACHE, codec, config, volumes, conditions, encoders_dir=encoders_dir
    )
    config = dataclasses.replace(config, latent_scale=scale)
    _, result = train_ldm(
        config, LatentSet.from_cache(cached, conditions, config), train_config, out
    )
    return scale, result


def train_controlnet_run(
    data: str | Path,
    ldm_run: str | Path,
    out: str | Path,
    config: ModelConfig,
    train_config: TrainConfig,
) -> TrainResult:
    """The mask condition on the data set's label maps, the LDM run frozen."""
    run = load_ldm_run(config, ldm_run, data)
    _, conditions = load_volumes(data, run.config, masks=True)
    data_set = LatentSet.from_cache(run.cache, conditions, run.config)
    _, result = train_controlnet(run.config, run.denoiser, data_set, train_config, Path(out))
    return result
