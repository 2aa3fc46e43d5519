"""Trained runs -> a verified bundle that the model core loads.

export_bundle(out, config, codec, denoiser, encoders_dir=..., runs=...)
export_runs(out, config, vae_run, ldm_run, encoders_dir=..., controlnet_run=..., data=...,
            encoders={name: source}, allow_remote_code=...)
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch

from report2ct.bundle import save_bundle
from report2ct.codec import LatentCodec
from report2ct.config import ModelConfig
from report2ct.denoiser import Denoiser
from report2ct.pipeline import weight_modules
from training.encoder import EncoderImportError, import_encoders
from training.engine import load_ema
from training.runs import load_ldm_run, run_encoders


def export_bundle(
    out: str | Path,
    config: ModelConfig,
    codec,
    denoiser,
    *,
    encoders_dir: Path | None,
    runs: dict[str, Path],
    extra_files: dict[str, Path] | None = None,
    metadata: dict | None = None,
    encoder_dirs: Mapping[str, Path] | None = None,
    weights_dtype: torch.dtype | None = None,
) -> str:
    """Write trained (EMA) weights as a verified bundle the model core loads:
    the `bundle:` text encoders copied from `encoders_dir` (or, per
    `encoders/<name>`, from `encoder_dirs`), each run's loss curve under
    training/. Returns the bundle's sha256."""
    local = [
        e.source.removeprefix("bundle:") for e in config.encoders if e.source.startswith("bundle:")
    ]
    given = dict(encoder_dirs or {})
    if any(name not in given for name in local) and encoders_dir is None:
        raise ValueError(f"encoders {local} live in the bundle: give the directory that holds them")
    curves = {f"training/loss_{name}.png": Path(run) / "loss.png" for name, run in runs.items()}
    return save_bundle(
        out,
        config=config,
        weights={name: m.state_dict() for name, m in weight_modules(codec, denoiser).items()},
        extra_dirs={name: given.get(name) or Path(encoders_dir) / name for name in local},
        extra_files={**{k: v for k, v in curves.items() if v.exists()}, **(extra_files or {})},
        metadata={"trained": True, "latent_scale": config.latent_scale, **(metadata or {})},
        weights_dtype=weights_dtype,
    )


def export_runs(
    out: str | Path,
    config: ModelConfig,
    vae_run: str | Path,
    ldm_run: str | Path,
    *,
    encoders_dir: Path | None,
    controlnet_run: str | Path | None = None,
    data: str | Path | None = None,
    encoders: Mapping[str, str] | None = None,
    allow_remote_code: bool = False,
) -> str:
    """The latest EMA weights of `train vae`, `train ldm` (and `train
    controlnet`, whose data set gives the mask legend) runs as a bundle;
    the metadata records each run's step. Returns the bundle's sha256.

    The text encoders are those the LDM run recorded (its cache was computed
    with them); for a run that recorded none, the preset's, with `encoders`
    (name -> local directory or cached hub id) imported as `bundle init`
    does."""
    if (controlnet_run is None) != (data is None):
        raise ValueError("a ControlNet run needs its data set (the mask legend), and only it")
    recorded = run_encoders(ldm_run)
    if recorded is not None:
        clash = sorted(set(encoders or {}) & {e.name for e in recorded})
        if clash:
            raise EncoderImportError(
                f"--encoder {', '.join(clash)}: the LDM run {ldm_run} was trained with its own "
                "copy (encoders/), which the bundle ships; another would not match its cache"
            )
        config = dataclasses.replace(config, encoders=recorded)
        encoders_dir = Path(ldm_run)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".encoders-", dir=Path(out).parent) as scratch:
        config, dirs = import_encoders(
            config,
            scratch,
            encoders,
            allow_remote_code=allow_remote_code,
            encoders_dir=encoders_dir,
        )
        return _export_runs(
            out, config, vae_run, ldm_run, dirs, controlnet_run=controlnet_run, data=data
        )


def _export_runs(out, config, vae_run, ldm_run, encoder_dirs, *, controlnet_run, data) -> str:
    ldm = load_ldm_run(config, ldm_run, data)
    codec = LatentCodec(ldm.config.vae)
    steps = {"vae": load_ema(codec.vae, vae_run), "ldm": ldm.step}
    runs = {"vae": Path(vae_run), "ldm": Path(ldm_run)}
    denoiser = ldm.denoiser
    if controlnet_run is not None:
        controlled = Denoiser.for_model(ldm.config)
        controlled.load_state_dict(denoiser.state_dict(), strict=False)
        steps["controlnet"] = load_ema(controlled, controlnet_run)
        denoiser, runs["controlnet"] = controlled, Path(controlnet_run)
    return export_bundle(
        out,
        ldm.config,
        codec,
        denoiser,
        encoders_dir=None,
        encoder_dirs=encoder_dirs,
        runs=runs,
        metadata={"steps": steps},
    )
