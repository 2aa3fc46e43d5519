"""Build the committed demo bundle end to end on one CPU:

    phantoms -> report BERT -> VAE (DeepSpeed) -> latent + text caches
    -> latent diffusion on the text (DeepSpeed; the label token present,
       always the zero token)
    -> the label token alone on the frozen text model (DeepSpeed)
    -> ControlNet on the phantoms' label maps (DeepSpeed, UNet and label
       token frozen)
    -> export EMA weights to a bundle, stored in half precision

`ctfactory train demo-bundle` (and `make demo-bundle`) runs it; every stage
writes under --work and is skipped when its output exists, so a killed build
resumes (the DeepSpeed stages resume from their last checkpoint); with
`resume=False` every stage starts afresh (the phantoms, a pure function of
the recipe's seed, are kept).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from phantom.ctrate_layout import DatasetSpec, write_dataset
from report2ct.config import ControlConfig, preset
from training.caches import latent_text_cache
from training.data.ctrate import mask_legend
from training.data.volumes import load_volumes
from training.encoder import train_report_bert
from training.engine import TrainConfig, with_deepspeed
from training.export import export_bundle
from training.label_token import text_only, train_label_token
from training.stages import LatentSet, train_controlnet, train_ldm, train_vae

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoRecipe:
    preset: str = "demo"
    # Names of the preset's text encoders to keep (None: all of them); the
    # paper's one-encoder ablation keeps one.
    encoders: tuple[str, ...] | None = None
    phantoms: int = 500
    seed: int = 0
    bert_steps: int = 200
    vae: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            steps=500, micro_batch=4, lr=2e-4, warmup_steps=30, ema_decay=0.99, checkpoint_every=200
        )
    )
    vae_crop: tuple[int, int, int] = (32, 32, 32)
    ldm: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            steps=3600,
            micro_batch=8,
            lr=3e-4,
            warmup_steps=40,
            ema_decay=0.995,
            checkpoint_every=400,
        )
    )
    # The label token on the frozen text model (None: trained jointly with
    # the UNet in the LDM stage, which costs the text response, see
    # training/label_token.py).
    labels: TrainConfig | None = field(
        default_factory=lambda: TrainConfig(
            steps=800,
            micro_batch=8,
            lr=1e-2,
            warmup_steps=20,
            ema_decay=0.99,
            checkpoint_every=200,
        )
    )
    # The ControlNet (None: a bundle without the mask condition).
    control: TrainConfig | None = field(
        default_factory=lambda: TrainConfig(
            steps=800,
            micro_batch=8,
            lr=3e-4,
            warmup_steps=40,
            ema_decay=0.99,
            checkpoint_every=200,
        )
    )
    # The dtype the bundle stores its weights in (None: as trained, fp32);
    # fp16 halves the bundle and keeps ~3 decimal digits of every weight.
    weights_dtype: str | None = "float16"


# The recipe's DeepSpeed stages, by field name.
STAGES = ("vae", "ldm", "labels", "control")


def recipe_for(
    preset_name: str,
    overrides: Mapping[str, Any] | None = None,
    deepspeed: Mapping[str, Any] | None = None,
) -> DemoRecipe:
    """A train job's recipe: the default one on `preset_name`, with
    `overrides` of its fields (a stage's given as a mapping of TrainConfig
    fields, e.g. {"ldm": {"steps": 100}}) and every stage under the DeepSpeed
    config `deepspeed` (see `training.engine.with_deepspeed`)."""
    recipe = dataclasses.replace(DemoRecipe(), preset=preset_name)
    updates = dict(overrides or {})
    for stage in STAGES:
        value = updates.get(stage)
        if isinstance(value, Mapping):
            updates[stage] = dataclasses.replace(getattr(recipe, stage), **value)
    recipe = dataclasses.replace(recipe, **updates)
    if deepspeed is not None:
        recipe = dataclasses.replace(
            recipe,
            **{
                stage: with_deepspeed(getattr(recipe, stage), deepspeed)
                for stage in STAGES
                if getattr(recipe, stage) is not None
            },
        )
    return recipe


def build_demo_bundle(
    out: str | Path,
    work: str | Path,
    recipe: DemoRecipe = DemoRecipe(),
    *,
    resume: bool = True,
    phantoms: str | Path | None = None,
) -> str:
    """Build the bundle into `out`, with scratch under `work`; the recipe's
    phantom set lives in `phantoms` (default: work/phantoms), written there
    when absent."""
    out, work = Path(out), Path(work)
    config = preset(recipe.preset)
    if recipe.encoders is not None:
        kept = tuple(e for e in config.encoders if e.name in recipe.encoders)
        if len(kept) != len(set(recipe.encoders)):
            names = ", ".join(e.name for e in config.encoders)
            raise ValueError(
                f"encoders {recipe.encoders} not all in preset {recipe.preset!r} ({names})"
            )
        config = dataclasses.replace(config, encoders=kept)
    # Wall seconds per stage over every invocation of this build (a resumed
    # stage adds to what its earlier runs spent), kept in the work directory.
    ledger = work / "timings.json"
    bert_spec = next(e for e in config.encoders if e.source.startswith("bundle:"))
    bert_dir = work / bert_spec.source.removeprefix("bundle:")
    if not resume:
        for stale in (ledger, work / "cache.safetensors", work / "recipe.json"):
            stale.unlink(missing_ok=True)
        shutil.rmtree(bert_dir, ignore_errors=True)
    spent = json.loads(ledger.read_text()) if ledger.exists() else {}
    timings = {}
    mark = time.time()

    def lap(name: str) -> None:
        nonlocal mark
        now = time.time()
        timings[name] = spent.get(name, 0.0) + (now - mark)
        log.info("demo bundle: %s stage done in %.0f s", name.removesuffix("_s"), now - mark)
        mark = now
        ledger.parent.mkdir(parents=True, exist_ok=True)
        ledger.write_text(json.dumps({**spent, **timings}, indent=2))

    data = Path(phantoms) if phantoms is not None else work / "phantoms"
    if not (data / "masks" / "legend.json").exists():
        written = 0

        def progress() -> None:
            nonlocal written
            written += 1
            if written % 50 == 0 or written == recipe.phantoms:
                log.info("demo bundle: %d/%d phantoms written", written, recipe.phantoms)

        write_dataset(
            data,
            DatasetSpec(
                n=recipe.phantoms,
                seed=recipe.seed,
                shape=config.default_shape,
                spacing_mm=config.default_spacing_mm,
            ),
            workers=2,
            on_progress=progress,
        )
    volumes, conditions = load_volumes(data, config, masks=recipe.control is not None)
    lap("phantoms_s")

    if not (bert_dir / "model.safetensors").exists():
        texts = [c.findings for c in conditions] + [c.impression for c in conditions]
        train_report_bert(
            texts, bert_dir, hidden_size=bert_spec.dim, steps=recipe.bert_steps, seed=recipe.seed
        )
    lap("bert_s")

    codec, vae_result = train_vae(
        config, volumes, recipe.vae, work / "vae", crop=recipe.vae_crop, resume=resume
    )
    lap("vae_s")

    cached, scale = latent_text_cache(
        work / "cache.safetensors", codec, config, volumes, conditions, encoders_dir=work
    )
    config = dataclasses.replace(config, latent_scale=scale)
    lap("cache_s")

    separate_labels = recipe.labels is not None and config.label_condition
    latents = LatentSet.from_cache(cached, conditions, config)
    denoiser, ldm_result = train_ldm(
        text_only(config) if separate_labels else config,
        latents,
        recipe.ldm,
        work / "ldm",
        resume=resume,
    )
    lap("ldm_s")
    final_loss = {"vae": vae_result.losses[-1], "ldm": ldm_result.losses[-1]}
    runs = {"vae": work / "vae", "ldm": work / "ldm"}

    if separate_labels:
        denoiser, labels_result = train_label_token(
            config, denoiser, latents, recipe.labels, work / "labels", resume=resume
        )
        lap("labels_s")
        final_loss["labels"] = labels_result.losses[-1]
        runs["labels"] = work / "labels"

    if recipe.control is not None:
        config = dataclasses.replace(config, control=ControlConfig(legend=mask_legend(data)))
        denoiser, control_result = train_controlnet(
            config,
            denoiser,
            LatentSet.from_cache(cached, conditions, config),
            recipe.control,
            work / "controlnet",
            resume=resume,
        )
        lap("controlnet_s")
        final_loss["controlnet"] = control_result.losses[-1]
        runs["controlnet"] = work / "controlnet"

    recipe_json = work / "recipe.json"
    recipe_json.write_text(json.dumps(dataclasses.asdict(recipe), indent=2, default=list))
    return export_bundle(
        out,
        config,
        codec,
        denoiser,
        encoders_dir=work,
        runs=runs,
        extra_files={"training/recipe.json": recipe_json},
        weights_dtype=getattr(torch, recipe.weights_dtype) if recipe.weights_dtype else None,
        metadata={
            "training_data": f"{len(volumes)} chest phantoms (ct-factory phantom world, seed {recipe.seed}); "
            "no patient data",
            "final_loss": final_loss,
            "timings_s": timings,
        },
    )


def tiny_recipe() -> DemoRecipe:
    """Seconds, for tests: the same path end to end."""
    return DemoRecipe(
        preset="tiny",
        phantoms=6,
        bert_steps=3,
        vae=TrainConfig(steps=2, micro_batch=2, warmup_steps=1, checkpoint_every=100, log_every=1),
        vae_crop=(16, 16, 16),
        ldm=TrainConfig(steps=2, micro_batch=2, warmup_steps=1, checkpoint_every=100, log_every=1),
        labels=TrainConfig(
            steps=2, micro_batch=2, warmup_steps=1, checkpoint_every=100, log_every=1
        ),
        control=TrainConfig(
            steps=2, micro_batch=2, warmup_steps=1, checkpoint_every=100, log_every=1
        ),
    )
