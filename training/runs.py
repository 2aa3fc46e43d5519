"""Each `ctfactory train` stage as one call, from a CT-RATE-layout data set
and the run directories of the stages before it:

    train_vae_run(data, "runs/vae", config, train_config)
    train_ldm_run(data, "runs/vae", "runs/ldm", config, train_config, encoders_dir=...,
                  encoders={"Bio_ClinicalBERT": "/models/bio-clinical"}, allow_remote_code=...)
    train_controlnet_run(data, "runs/ldm", "runs/controlnet", config, train_config)

A later stage reads an earlier run's latest EMA weights and, after the LDM,
its latent cache (`load_ldm_run`), so the runs chain without a bundle.

Under several processes (torchrun, DeepSpeed's launcher, Ray Train) every
rank calls the same function: what a run directory gets before training
(the imported encoders, the latent cache) is made by rank 0 first while the
others wait, then read (a shared run directory) or made the same way (a
rank's own directory). Keyword arguments left over (`resume`,
`on_checkpoint`, ...) go to `training.engine.train`.

The training split is read whole into memory here (`load_volumes`): the
stage functions take the data set as their one input, so a volume-by-volume
data set replaces it in `_volumes` without touching the rest. An LDM
run holds the text encoders its cache was computed with (`encoders/<name>/`,
their specs in `encoders.json`), so the export ships exactly those. A VAE
run is `checkpoints/step-N/ema.safetensors` + `client.json`, which a
pretrained MAISI VAE can become too (`training.maisi.import_maisi_vae`).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from report2ct.codec import LatentCodec
from report2ct.config import ControlConfig, EncoderSpec, ModelConfig
from report2ct.denoiser import Denoiser
from training.caches import latent_text_cache, load_latent_cache
from training.data.ctrate import mask_legend
from training.data.volumes import load_volumes
from training.encoder import ENCODERS_JSON, EncoderImportError, import_encoders
from training.engine import TrainConfig, TrainResult, load_ema, process_rank
from training.stages import LatentSet, train_controlnet, train_ldm, train_vae

CACHE = "cache.safetensors"  # an LDM run's latent and text cache

# Each stage's defaults (the `ctfactory train` commands' and the train job's).
STAGE_DEFAULTS: dict[str, TrainConfig] = {
    "vae": TrainConfig(steps=600, micro_batch=4, lr=2e-4),
    "ldm": TrainConfig(steps=2400, micro_batch=8, lr=3e-4),
    "controlnet": TrainConfig(steps=800, micro_batch=8, lr=3e-4),
}

T = TypeVar("T")


def rank_zero_first(make: Callable[[], T]) -> T:
    """`make()` on rank 0, then (after a barrier) on every other rank: in a
    shared run directory they find its output and read it; in their own,
    they make it the same way. One process: just `make()`."""
    import torch.distributed as dist

    rank, world = process_rank()
    if world == 1 or not dist.is_initialized():
        return make()
    if rank == 0:
        made = make()
    dist.barrier()
    if rank != 0:
        made = make()
    return made


def _volumes(data: str | Path, config: ModelConfig, **options: Any):
    """The training split (in memory: today's `load_volumes`)."""
    return load_volumes(data, config, **options)


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


def run_encoders(run: str | Path) -> tuple[EncoderSpec, ...] | None:
    """The text encoder specs an LDM run recorded (None for a run made
    before runs recorded them); their `bundle:` sources are under the run."""
    record = Path(run) / ENCODERS_JSON
    if not record.is_file():
        return None
    return tuple(EncoderSpec(**spec) for spec in json.loads(record.read_text())["encoders"])


def prepare_run_encoders(
    config: ModelConfig,
    run: str | Path,
    overrides: Mapping[str, str] | None = None,
    *,
    allow_remote_code: bool = False,
    encoders_dir: str | Path | None = None,
) -> ModelConfig:
    """Put the run's text encoders under `run/encoders/` once (the preset's
    hub encoders from the local cache, `overrides` from where they say, the
    `bundle:` ones copied from `encoders_dir`) and record their specs; the
    returned config names them as `bundle:` encoders of the run. A resumed
    run must ask for the same encoders it was started with."""
    run = Path(run)
    record = run / ENCODERS_JSON
    asked = {"preset": config.name, "overrides": dict(sorted((overrides or {}).items()))}
    if record.is_file():
        saved = json.loads(record.read_text())
        if saved.get("asked") != asked:
            raise EncoderImportError(
                f"{run}: its text cache was made with encoders {saved.get('asked')}, not "
                f"{asked}; use another --out for other encoders"
            )
        return dataclasses.replace(config, encoders=run_encoders(run))
    run.mkdir(parents=True, exist_ok=True)
    config, dirs = import_encoders(
        config, run, overrides, allow_remote_code=allow_remote_code, encoders_dir=encoders_dir
    )
    for dest, source in dirs.items():
        if source.resolve() != (run / dest).resolve():
            shutil.copytree(source, run / dest, dirs_exist_ok=True)
    document = {"asked": asked, "encoders": [dataclasses.asdict(e) for e in config.encoders]}
    record.write_text(json.dumps(document, indent=2) + "\n")
    return config


def train_vae_run(
    data: str | Path,
    out: str | Path,
    config: ModelConfig,
    train_config: TrainConfig,
    *,
    crop: tuple[int, int, int] = (32, 32, 32),
    hu_rule: str = "auto",
    **train_options: Any,
) -> TrainResult:
    volumes, _ = _volumes(data, config, hu_rule=hu_rule)
    _, result = train_vae(config, volumes, train_config, Path(out), crop=crop, **train_options)
    return result


def train_ldm_run(
    data: str | Path,
    vae_run: str | Path,
    out: str | Path,
    config: ModelConfig,
    train_config: TrainConfig,
    *,
    encoders_dir: Path | None = None,
    encoders: Mapping[str, str] | None = None,
    allow_remote_code: bool = False,
    hu_rule: str = "auto",
    **train_options: Any,
) -> tuple[float, TrainResult]:
    """(the latent scale factor, the result); the caches go to
    OUT/cache.safetensors, the text encoders to OUT/encoders/
    (`prepare_run_encoders`: `encoders` maps a preset encoder's name to a
    local directory or a cached hub id)."""
    out = Path(out)
    config = rank_zero_first(
        lambda: prepare_run_encoders(
            config, out, encoders, allow_remote_code=allow_remote_code, encoders_dir=encoders_dir
        )
    )
    codec = LatentCodec(config.vae)
    load_ema(codec.vae, vae_run)
    volumes, conditions = _volumes(data, config, hu_rule=hu_rule)
    cached, scale = rank_zero_first(
        lambda: latent_text_cache(
            out / CACHE,
            codec,
            config,
            volumes,
            conditions,
            encoders_dir=out,
            allow_remote_code=allow_remote_code,
        )
    )
    config = dataclasses.replace(config, latent_scale=scale)
    _, result = train_ldm(
        config, LatentSet.from_cache(cached, conditions, config), train_config, out, **train_options
    )
    return scale, result


def train_controlnet_run(
    data: str | Path,
    ldm_run: str | Path,
    out: str | Path,
    config: ModelConfig,
    train_config: TrainConfig,
    *,
    hu_rule: str = "auto",
    **train_options: Any,
) -> TrainResult:
    """The mask condition on the data set's label maps, the LDM run frozen
    (the same `hu_rule` as its LDM run, so the same volumes line up)."""
    run = load_ldm_run(config, ldm_run, data)
    _, conditions = _volumes(data, run.config, masks=True, hu_rule=hu_rule)
    data_set = LatentSet.from_cache(run.cache, conditions, run.config)
    _, result = train_controlnet(
        run.config, run.denoiser, data_set, train_config, Path(out), **train_options
    )
    return result
