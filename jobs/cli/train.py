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
        Path("report2ct/bundles/demo"), "--out", help="bundle directory to write"
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
    preset: str = typer.Option("demo", "--preset", help="demo | tiny"),
    encoder: list[str] | None = typer.Option(
        None,
        "--encoder",
        help="keep only these of the preset's text encoders, repeatable (the one-encoder ablation)",
    ),
) -> None:
    """Build the demo bundle end to end: phantoms -> report BERT -> VAE ->
    latent/text caches -> latent diffusion -> export. Resumable: rerun the
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
