"""`ctfactory train ...`: DeepSpeed training stages and the demo bundle."""

from __future__ import annotations

from pathlib import Path

import typer

from jobs.cli._app import app

train_app = typer.Typer(
    help="Train with DeepSpeed (ZeRO-2, bf16) on a CT-RATE-layout data set.", no_args_is_help=True
)
app.add_typer(train_app, name="train")


def _setup_logging() -> None:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")


@train_app.command("demo-bundle")
def demo_bundle(
    out: Path = typer.Option(
        Path("report2ct/bundles/demo-control"), "--out", help="bundle directory to write"
    ),
    work: Path = typer.Option(
        Path("runs/demo-build"), "--work", help="scratch: phantoms, checkpoints, caches"
    ),
    phantoms: int | None = typer.Option(
        None, "--phantoms", min=4, help="training phantoms (default: the recipe's, 500)"
    ),
    vae_steps: int | None = typer.Option(
        None, "--vae-steps", min=1, help="(default: the recipe's, 500)"
    ),
    ldm_steps: int | None = typer.Option(
        None, "--ldm-steps", min=1, help="(default: the recipe's, 2400 of 8)"
    ),
    control_steps: int | None = typer.Option(
        None,
        "--controlnet-steps",
        min=0,
        help="ControlNet steps of 8 (default: the recipe's, 800; 0: no mask condition)",
    ),
    preset: str = typer.Option("demo", "--preset", help="demo | tiny"),
    encoder: list[str] | None = typer.Option(
        None,
        "--encoder",
        help="keep only these of the preset's text encoders, repeatable (the one-encoder ablation)",
    ),
) -> None:
    """Build the demo bundle end to end: phantoms -> report BERT -> VAE ->
    latent/text caches -> latent diffusion (with the label token) ->
    ControlNet on the phantoms' label maps -> export. Resumable: rerun the
    same command after an interruption."""
    import dataclasses

    from training.demo_bundle import DemoRecipe, build_demo_bundle

    _setup_logging()
    recipe = DemoRecipe()
    recipe = dataclasses.replace(
        recipe,
        preset=preset,
        encoders=tuple(encoder) if encoder else None,
        phantoms=phantoms or recipe.phantoms,
        vae=dataclasses.replace(recipe.vae, steps=vae_steps or recipe.vae.steps),
        ldm=dataclasses.replace(recipe.ldm, steps=ldm_steps or recipe.ldm.steps),
        control=None
        if control_steps == 0
        else dataclasses.replace(recipe.control, steps=control_steps or recipe.control.steps),
    )
    sha = build_demo_bundle(out, work, recipe)
    typer.echo(f"bundle {out} sha256 {sha}")


@train_app.command("vae")
def vae(
    data: Path = typer.Option(..., "--data", help="CT-RATE-layout data set root"),
    out: Path = typer.Option(..., "--out", help="run directory (checkpoints, log, loss curve)"),
    preset: str = typer.Option("demo", "--preset"),
    steps: int = typer.Option(600, "--steps", min=1),
    micro_batch: int = typer.Option(4, "--micro-batch", min=1),
    lr: float = typer.Option(2e-4, "--lr"),
    zero_stage: int = typer.Option(2, "--zero-stage", min=0, max=3),
    crop: tuple[int, int, int] = typer.Option((32, 32, 32), "--crop"),
) -> None:
    """Train the VAE on random crops (resumes from the last checkpoint in --out)."""
    from report2ct.config import preset as model_preset
    from training.demo_bundle import load_volumes
    from training.engine import TrainConfig
    from training.stages import train_vae

    _setup_logging()
    config = model_preset(preset)
    volumes, _ = load_volumes(data, config)
    train_vae(
        config,
        volumes,
        TrainConfig(steps=steps, micro_batch=micro_batch, lr=lr, zero_stage=zero_stage),
        out,
        crop=crop,
    )
    typer.echo(f"trained; checkpoints in {out / 'checkpoints'}")


@train_app.command("ldm")
def ldm(
    data: Path = typer.Option(..., "--data", help="CT-RATE-layout data set root"),
    vae_run: Path = typer.Option(
        ..., "--vae-run", help="a `train vae` run directory (its EMA weights)"
    ),
    out: Path = typer.Option(
        ..., "--out", help="run directory (cache, checkpoints, log, loss curve)"
    ),
    encoders_dir: Path | None = typer.Option(
        None,
        "--encoders-dir",
        help="directory holding the preset's bundle: text encoders (encoders/<name>)",
    ),
    preset: str = typer.Option("demo", "--preset"),
    steps: int = typer.Option(2400, "--steps", min=1),
    micro_batch: int = typer.Option(8, "--micro-batch", min=1),
    lr: float = typer.Option(3e-4, "--lr"),
    zero_stage: int = typer.Option(2, "--zero-stage", min=0, max=3),
) -> None:
    """Train the latent diffusion model on cached VAE latents and report
    contexts (computed once into OUT/cache.safetensors), with the label
    token when the preset has one; resumes from OUT."""
    import dataclasses

    from report2ct.codec import LatentCodec
    from report2ct.config import preset as model_preset
    from training.caches import latent_text_cache
    from training.demo_bundle import latent_set, load_volumes
    from training.engine import TrainConfig, load_ema
    from training.stages import train_ldm

    _setup_logging()
    config = model_preset(preset)
    codec = LatentCodec(config.vae)
    load_ema(codec.vae, vae_run)
    volumes, meta = load_volumes(data, config)
    cached, scale = latent_text_cache(
        out / "cache.safetensors", codec, config, volumes, meta, encoders_dir=encoders_dir
    )
    config = dataclasses.replace(config, latent_scale=scale)
    train_ldm(
        config,
        latent_set(cached, meta, config),
        TrainConfig(steps=steps, micro_batch=micro_batch, lr=lr, zero_stage=zero_stage),
        out,
    )
    typer.echo(f"trained; checkpoints in {out / 'checkpoints'} (latent scale {scale:.4f})")


@train_app.command("controlnet")
def controlnet(
    data: Path = typer.Option(
        ..., "--data", help="CT-RATE-layout data set root with masks/ and masks/legend.json"
    ),
    ldm_run: Path = typer.Option(
        ..., "--ldm-run", help="a `train ldm` run directory (its cache and EMA weights)"
    ),
    out: Path = typer.Option(..., "--out", help="run directory (checkpoints, log, loss curve)"),
    preset: str = typer.Option("demo", "--preset"),
    steps: int = typer.Option(800, "--steps", min=1),
    micro_batch: int = typer.Option(8, "--micro-batch", min=1),
    lr: float = typer.Option(3e-4, "--lr"),
    zero_stage: int = typer.Option(2, "--zero-stage", min=0, max=3),
) -> None:
    """Train the mask condition: a ControlNet on the data set's label maps
    (legend from masks/legend.json), the LDM run's UNet frozen; resumes from OUT."""
    from training.demo_bundle import latent_set, load_volumes
    from training.engine import TrainConfig
    from training.stages import train_controlnet

    _setup_logging()
    config, denoiser, cached, _ = _ldm_state(preset, ldm_run, data)
    _, meta = load_volumes(data, config, masks=True)
    train_controlnet(
        config,
        denoiser,
        latent_set(cached, meta, config),
        TrainConfig(steps=steps, micro_batch=micro_batch, lr=lr, zero_stage=zero_stage),
        out,
    )
    typer.echo(f"trained; checkpoints in {out / 'checkpoints'}")


def _ldm_state(preset: str, ldm_run: Path, data: Path | None):
    """(config with the run's latent scale and, given a data set, its mask
    legend; the run's trained denoiser; the run's cache; its step)."""
    import dataclasses

    from report2ct.config import ControlConfig
    from report2ct.config import preset as model_preset
    from report2ct.denoiser import Denoiser
    from training.caches import latent_scale_factor, load_cache
    from training.data.ctrate import mask_legend
    from training.engine import load_ema

    config = model_preset(preset)
    cache = load_cache(ldm_run / "cache.safetensors")
    scale = latent_scale_factor(cache["latents"])
    cache["latents"] = cache["latents"] * scale
    config = dataclasses.replace(config, latent_scale=scale)
    denoiser = Denoiser.for_model(config)
    step = load_ema(denoiser, ldm_run)
    if data is not None:
        config = dataclasses.replace(config, control=ControlConfig(legend=mask_legend(data)))
    return config, denoiser, cache, step


@train_app.command("export")
def export(
    vae_run: Path = typer.Option(..., "--vae-run", help="a `train vae` run directory"),
    ldm_run: Path = typer.Option(..., "--ldm-run", help="a `train ldm` run directory"),
    out: Path = typer.Option(..., "--out", help="bundle directory to write"),
    encoders_dir: Path | None = typer.Option(
        None, "--encoders-dir", help="directory holding the preset's bundle: text encoders"
    ),
    controlnet_run: Path | None = typer.Option(
        None, "--controlnet-run", help="a `train controlnet` run directory (the mask condition)"
    ),
    data: Path | None = typer.Option(
        None, "--data", help="the ControlNet's data set (its masks/legend.json is the legend)"
    ),
    preset: str = typer.Option("demo", "--preset"),
) -> None:
    """Export the runs' EMA weights (latest checkpoints) as a verified bundle
    that `ctfactory generate --model` loads."""
    from report2ct.codec import LatentCodec
    from report2ct.denoiser import Denoiser
    from training.demo_bundle import export_bundle
    from training.engine import load_ema

    if (controlnet_run is None) != (data is None):
        raise typer.BadParameter("--controlnet-run and --data go together")
    config, denoiser, _, ldm_step = _ldm_state(preset, ldm_run, data)
    codec = LatentCodec(config.vae)
    steps = {"vae": load_ema(codec.vae, vae_run), "ldm": ldm_step}
    runs = {"vae": vae_run, "ldm": ldm_run}
    if controlnet_run is not None:
        controlled = Denoiser.for_model(config)
        controlled.load_state_dict(denoiser.state_dict(), strict=False)
        steps["controlnet"] = load_ema(controlled, controlnet_run)
        denoiser, runs["controlnet"] = controlled, controlnet_run
    sha = export_bundle(
        out,
        config,
        codec,
        denoiser,
        encoders_dir=encoders_dir,
        runs=runs,
        metadata={"steps": steps},
    )
    typer.echo(f"bundle {out} sha256 {sha}")
