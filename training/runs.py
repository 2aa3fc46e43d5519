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
is made by rank 0 first while the others wait: the imported encoders (then
read from a shared run directory, or made the same way in a rank's own),
and the latent cache, which must be where every rank reads it (a shared run
directory, or `latents` on s3://); the others poll for it rather than wait
on a collective, whose timeout a paper-size encode outlasts. Keyword
arguments left over (`resume`, `on_checkpoint`, ...) go to
`training.engine.train`.

The data set (a local path or s3://) is streamed, volume by volume, in
DataLoader workers (`training.data.stream.VolumeStream`): no stage holds the
split in memory, so a paper-size split trains as a phantom one does.
- VAE: one random crop of each volume per epoch (`VolumeCrops`), each volume
  resampled to a spacing drawn per (seed, epoch, index) within the preset's
  spacing range.
- LDM: the latents and report contexts are encoded once, volume by volume,
  into shards (`training.shard_cache.build_latent_shards`, resumable) at
  OUT/latents/ (or `latents`, e.g. an s3:// prefix every rank shares); the
  index records the latent scale (1 / std of every latent value) and how the
  stream was read. Each sample carries the spacing it was resampled to, so
  the spacing input is trained. Training reads the shards sample by sample
  (`LatentShards`).
- ControlNet: the LDM run's shards, each sample's label map read from the
  data set at the same spacing (`training.stages.MaskedLatents`).
The engine reads streamed data sets through a DataLoader in the training
loop's own deterministic, resumable order (`training.engine.micro_batches`).
An LDM run made before the shards (one OUT/cache.safetensors) is still
read by `load_ldm_run` (its latent scale, for export). An LDM
run holds the text encoders its cache was computed with (`encoders/<name>/`,
their specs in `encoders.json`), so the export ships exactly those. A VAE
run is `checkpoints/step-N/ema.safetensors` + `client.json`, which a
pretrained MAISI VAE can become too (`training.maisi.import_maisi_vae`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from report2ct.codec import LatentCodec
from report2ct.config import ControlConfig, EncoderSpec, ModelConfig
from report2ct.denoiser import Denoiser
from training.caches import load_latent_cache
from training.data.ctrate import mask_legend
from training.data.shards import INDEX, LatentShards, ShardError, read_index
from training.data.stream import VolumeCrops, VolumeStream, open_fs
from training.encoder import ENCODERS_JSON, EncoderImportError, import_encoders
from training.engine import TrainConfig, TrainResult, load_ema, process_rank
from training.shard_cache import build_latent_shards
from training.stages import MaskedLatents, train_controlnet, train_ldm, train_vae

LATENTS = "latents"  # an LDM run's latent and text cache: shards (training.data.shards)
CACHE = "cache.safetensors"  # the single cache file of LDM runs made before the shards

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


def rank_zero_builds(
    make: Callable[[], T], ready: Callable[[], bool], *, poll_s: float = 10.0
) -> T:
    """`make()` on rank 0 while the other ranks poll `ready()` (no
    collective: encoding a paper-size split takes longer than the process
    group's timeout), then `make()` on them, which finds what rank 0 made.
    What is made must be where every rank sees it (a shared run directory,
    or s3://). One process: just `make()`."""
    import torch.distributed as dist

    rank, world = process_rank()
    if world == 1 or not dist.is_initialized():
        return make()
    if rank == 0:
        made = make()
    else:
        while not ready():
            time.sleep(poll_s)
    dist.barrier()
    if rank != 0:
        made = make()
    return made


def _finished(source: str) -> bool:
    try:
        read_index(source)
    except ShardError:
        return False
    return True


@dataclass
class LdmRun:
    config: ModelConfig  # with the run's latent scale (and a data set's mask legend)
    denoiser: Denoiser  # the run's latest EMA weights
    cache: dict[str, torch.Tensor] | None  # an older run's cache file (latents scaled, ...)
    step: int
    latents: str | None = None  # the run's latent shards (None for an older run)


def load_ldm_run(
    config: ModelConfig,
    ldm_run: str | Path,
    data: str | Path | None = None,
    *,
    latents: str | None = None,
) -> LdmRun:
    """A `train ldm` run: its latent scale (its shards' index; an older
    run's cache file), where its latents are and its trained denoiser; given
    a data set, the config also gets its mask legend (the ControlNet's).
    `latents` says where the shards are when not under the run (s3://)."""
    ldm_run = Path(ldm_run)
    cache = None
    if latents is not None or (ldm_run / LATENTS / INDEX).is_file():
        latents = str(latents if latents is not None else ldm_run / LATENTS)
        scale = float(read_index(latents)["latent_scale"])
    elif (ldm_run / CACHE).is_file():
        cache, scale = load_latent_cache(ldm_run / CACHE)
    else:
        raise FileNotFoundError(
            f"{ldm_run}: no latent cache ({LATENTS}/{INDEX}, or an older run's {CACHE}): "
            "not a finished `train ldm` run"
        )
    config = dataclasses.replace(config, latent_scale=scale)
    denoiser = Denoiser.for_model(config)
    step = load_ema(denoiser, ldm_run)
    if data is not None:
        config = dataclasses.replace(config, control=ControlConfig(legend=data_legend(data)))
    return LdmRun(config, denoiser, cache, step, latents)


def data_legend(data: str | Path) -> tuple[tuple[int, str], ...]:
    """The data set's mask legend (`mask_legend`), of a local data set or
    one on s3:// (its masks/legend.json fetched)."""
    if "://" not in str(data):
        return mask_legend(data)
    fs, base = open_fs(data)
    with tempfile.TemporaryDirectory(prefix="ct-legend-") as scratch:
        local = Path(scratch) / "masks" / "legend.json"
        local.parent.mkdir()
        with contextlib.suppress(FileNotFoundError):  # mask_legend says what is missing
            fs.get_file(f"{base}/masks/legend.json", str(local))
        return mask_legend(scratch)


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
    spacing: str = "varied",
    num_workers: int = 2,
    **train_options: Any,
) -> TrainResult:
    """The VAE on one random crop of each volume per epoch, streamed
    (`VolumeCrops`; `spacing="varied"`: each volume resampled to a spacing
    drawn within the preset's range, "fixed": the preset's default), read in
    `num_workers` DataLoader workers."""
    stream = VolumeStream(data, config, seed=train_config.seed, spacing=spacing, hu_rule=hu_rule)
    crops = VolumeCrops(stream, crop, seed=train_config.seed)
    _, result = train_vae(
        config, crops, train_config, Path(out), num_workers=num_workers, **train_options
    )
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
    spacing: str = "varied",
    views: int = 1,
    latents: str | None = None,
    num_workers: int = 2,
    **train_options: Any,
) -> tuple[float, TrainResult]:
    """(the latent scale factor, the result); the latent and text cache goes
    to OUT/latents/ (or `latents`: e.g. an s3:// prefix all ranks share) as
    shards, built volume by volume by rank 0 while the others wait
    (`rank_zero_builds`; `build_latent_shards`:
    `views` spacings of each volume, drawn as `spacing` says; volumes that
    cannot be read or are not chest CT are skipped, listed in its index); the
    text encoders go to OUT/encoders/ (`prepare_run_encoders`: `encoders` maps
    a preset encoder's name to a local directory or a cached hub id)."""
    out = Path(out)
    config = rank_zero_first(
        lambda: prepare_run_encoders(
            config, out, encoders, allow_remote_code=allow_remote_code, encoders_dir=encoders_dir
        )
    )
    config = dataclasses.replace(config, control=None)  # the mask condition is the ControlNet's
    codec = LatentCodec(config.vae)
    load_ema(codec.vae, vae_run)
    source = str(latents if latents is not None else out / LATENTS)
    stream = VolumeStream(
        data,
        config,
        seed=train_config.seed,
        spacing=spacing,
        hu_rule=hu_rule,
        non_chest="skip",
        errors="skip",
    )
    rank_zero_builds(
        lambda: build_latent_shards(
            source,
            stream,
            codec,
            config,
            encoders_dir=out,
            allow_remote_code=allow_remote_code,
            views=views,
            num_workers=num_workers,
        ),
        lambda: _finished(source),
    )
    shards = LatentShards.for_model(source, config)
    config = dataclasses.replace(config, latent_scale=shards.latent_scale)
    _, result = train_ldm(
        config, shards, train_config, out, num_workers=num_workers, **train_options
    )
    return shards.latent_scale, result


def train_controlnet_run(
    data: str | Path,
    ldm_run: str | Path,
    out: str | Path,
    config: ModelConfig,
    train_config: TrainConfig,
    *,
    hu_rule: str = "auto",
    latents: str | None = None,
    num_workers: int = 2,
    **train_options: Any,
) -> TrainResult:
    """The mask condition on the data set's label maps, the LDM run frozen:
    each sample of the LDM run's shards (`latents` when not under the run)
    with its volume's label map, read from `data` as the LDM's cache read
    the volume (the seed, spacing and split its index records), so the mask
    lines up with the latent (`MaskedLatents` checks the spacing)."""
    run = load_ldm_run(config, ldm_run, data, latents=latents)
    if run.latents is None:
        raise ValueError(
            f"{ldm_run}: an LDM run with one {CACHE} (made before the latent shards): "
            f"train its LDM stage again (same --out) to get {LATENTS}/ for the ControlNet"
        )
    read = read_index(run.latents).get("stream") or {}
    stream = VolumeStream(
        data,
        run.config,
        split=read.get("split", "train"),
        seed=read.get("seed", train_config.seed),
        spacing=read.get("spacing", "varied"),
        spacing_range_mm=read.get("spacing_range_mm"),
        masks=True,
        hu_rule=read.get("hu_rule") or hu_rule,
    )
    shards = LatentShards.for_model(run.latents, dataclasses.replace(run.config, control=None))
    data_set = MaskedLatents(shards, stream, run.config)
    _, result = train_controlnet(
        run.config,
        run.denoiser,
        data_set,
        train_config,
        Path(out),
        num_workers=num_workers,
        **train_options,
    )
    return result
