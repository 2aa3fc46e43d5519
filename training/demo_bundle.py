"""Build the committed demo bundle end to end on one CPU:

    phantoms -> report BERT -> VAE (DeepSpeed) -> latent + text caches
    -> latent diffusion with the label token (DeepSpeed)
    -> ControlNet on the phantoms' label maps (DeepSpeed, UNet frozen)
    -> export EMA weights to a bundle

`ctfactory train demo-bundle` (and `make demo-bundle`) runs it; every stage
writes under --work and is skipped when its output exists, so a killed build
resumes (the DeepSpeed stages resume from their last checkpoint).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from phantom.ctrate_layout import DatasetSpec, write_dataset
from report2ct.bundle import save_bundle
from report2ct.config import ControlConfig, ModelConfig, preset
from report2ct.control import class_occupancy, to_class_index
from report2ct.labels import CTRATE_LABELS, signed_labels
from report2ct.pipeline import weight_modules
from training.caches import latent_text_cache
from training.data.ctrate import CTRateDataset, mask_legend
from training.encoder import train_report_bert
from training.engine import TrainConfig
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
            steps=2400,
            micro_batch=8,
            lr=3e-4,
            warmup_steps=40,
            ema_decay=0.995,
            checkpoint_every=400,
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


def load_volumes(
    root: Path, config: ModelConfig, *, masks: bool = False
) -> tuple[torch.Tensor, list[dict]]:
    """The training split on the model's grid: (N, 1, X, Y, Z) int16 HU and
    per volume its report, spacing and signed labels (and its label map,
    `mask`, (X, Y, Z) uint8, with `masks=True`)."""
    dataset = CTRateDataset(
        root,
        "train",
        target_spacing_mm=config.default_spacing_mm,
        target_shape=config.default_shape,
        load_masks=masks,
    )
    volumes = torch.empty(len(dataset), 1, *config.default_shape, dtype=torch.int16)
    meta = []
    for i in range(len(dataset)):
        item = dataset[i]
        volumes[i] = item["volume"].round().to(torch.int16)
        labels = {n: int(v) for n, v in zip(CTRATE_LABELS, item["labels"].tolist(), strict=True)}
        meta.append(
            {
                "findings": item["findings"],
                "impression": item["impression"],
                "spacing_mm": item["spacing_mm"].tolist(),
                "labels": signed_labels(labels),
            }
        )
        if masks:
            meta[-1]["mask"] = item["mask"][0].to(torch.uint8).numpy()
    return volumes, meta


def latent_set(cached: dict[str, torch.Tensor], meta: list[dict], config: ModelConfig) -> LatentSet:
    """The diffusion stages' data: the cached latents and contexts, the
    labels when the config has the label condition, and each volume's mask
    occupancy (float16: 24 classes at latent size) when it has a ControlNet."""
    labels = torch.tensor([m["labels"] for m in meta]) if config.label_condition else None
    control = None
    if config.control is not None:
        control = torch.stack(
            [
                class_occupancy(
                    to_class_index(m["mask"], config.control),
                    config.control.num_classes,
                    config.vae.downsample,
                ).half()
                for m in meta
            ]
        )
    return LatentSet(cached["latents"], cached["contexts"], cached["spacings"], labels, control)


def build_demo_bundle(out: str | Path, work: str | Path, recipe: DemoRecipe = DemoRecipe()) -> str:
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
    spent = json.loads(ledger.read_text()) if ledger.exists() else {}
    timings = {}
    mark = time.time()

    def lap(name: str) -> None:
        nonlocal mark
        now = time.time()
        timings[name] = spent.get(name, 0.0) + (now - mark)
        mark = now
        ledger.parent.mkdir(parents=True, exist_ok=True)
        ledger.write_text(json.dumps({**spent, **timings}, indent=2))

    data = work / "phantoms"
    if not (data / "masks" / "legend.json").exists():
        write_dataset(
            data,
            DatasetSpec(
                n=recipe.phantoms,
                seed=recipe.seed,
                shape=config.default_shape,
                spacing_mm=config.default_spacing_mm,
            ),
            workers=2,
        )
    volumes, meta = load_volumes(data, config, masks=recipe.control is not None)
    lap("phantoms_s")

    bert_spec = next(e for e in config.encoders if e.source.startswith("bundle:"))
    bert_dir = work / bert_spec.source.removeprefix("bundle:")
    if not (bert_dir / "model.safetensors").exists():
        texts = [m["findings"] for m in meta] + [m["impression"] for m in meta]
        train_report_bert(
            texts, bert_dir, hidden_size=bert_spec.dim, steps=recipe.bert_steps, seed=recipe.seed
        )
    lap("bert_s")

    codec, vae_result = train_vae(config, volumes, recipe.vae, work / "vae", crop=recipe.vae_crop)
    lap("vae_s")

    cached, scale = latent_text_cache(
        work / "cache.safetensors", codec, config, volumes, meta, encoders_dir=work
    )
    config = dataclasses.replace(config, latent_scale=scale)
    lap("cache_s")

    denoiser, ldm_result = train_ldm(
        config, latent_set(cached, meta, config), recipe.ldm, work / "ldm"
    )
    lap("ldm_s")
    final_loss = {"vae": vae_result.losses[-1], "ldm": ldm_result.losses[-1]}
    runs = {"vae": work / "vae", "ldm": work / "ldm"}

    if recipe.control is not None:
        config = dataclasses.replace(config, control=ControlConfig(legend=mask_legend(data)))
        denoiser, control_result = train_controlnet(
            config, denoiser, latent_set(cached, meta, config), recipe.control, work / "controlnet"
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
        metadata={
            "training_data": f"{len(volumes)} chest phantoms (ct-factory phantom world, seed {recipe.seed}); "
            "no patient data",
            "final_loss": final_loss,
            "timings_s": timings,
        },
    )


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
) -> str:
    """Write trained (EMA) weights as a verified bundle the model core loads:
    the `bundle:` text encoders copied from `encoders_dir`, each run's loss
    curve under training/. Returns the bundle's sha256."""
    local = [
        e.source.removeprefix("bundle:") for e in config.encoders if e.source.startswith("bundle:")
    ]
    if local and encoders_dir is None:
        raise ValueError(f"encoders {local} live in the bundle: give the directory that holds them")
    curves = {f"training/loss_{name}.png": Path(run) / "loss.png" for name, run in runs.items()}
    return save_bundle(
        out,
        config=config,
        weights={name: m.state_dict() for name, m in weight_modules(codec, denoiser).items()},
        extra_dirs={name: Path(encoders_dir) / name for name in local},
        extra_files={**{k: v for k, v in curves.items() if v.exists()}, **(extra_files or {})},
        metadata={"trained": True, "latent_scale": config.latent_scale, **(metadata or {})},
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
        control=TrainConfig(
            steps=2, micro_batch=2, warmup_steps=1, checkpoint_every=100, log_every=1
        ),
    )
