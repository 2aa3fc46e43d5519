"""`ctfactory train ...`: DeepSpeed training stages and the demo bundle."""

from __future__ import annotations

from pathlib import Path

import typer

from jobs.cli._app import app
from jobs.cli.bundle import ENCODER_HELP, REMOTE_CODE_HELP, encoder_overrides, refused_on

HU_RULES = ("auto", "metadata", "stored")  # training.data.ctrate.HU_RULES (a test keeps them equal)


def _hu_rule(value: str) -> str:
    if value not in HU_RULES:
        raise typer.BadParameter(f"must be one of {', '.join(HU_RULES)}")
    return value


HU_RULE = typer.Option(
    "auto",
    "--hu-rule",
    callback=_hu_rule,
    help="how stored values become HU: auto decides per volume from where air sits; "
    "metadata applies RescaleSlope/Intercept to the raw values; stored trusts the file",
)

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
        None, "--ldm-steps", min=1, help="(default: the recipe's, 3600 of 8)"
    ),
    label_steps: int | None = typer.Option(
        None,
        "--label-steps",
        min=0,
        help="label-token steps of 8 on the frozen text model (default: the recipe's, 800; "
        "0: the label token trained jointly with the UNet)",
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
    latent/text caches -> latent diffusion on the text -> the label token on
    the frozen text model -> ControlNet on the phantoms' label maps -> export
    (weights in fp16). Resumable: rerun the same command after an
    interruption."""
    from training.demo_bundle import build_demo_bundle, recipe_for

    _setup_logging()
    overrides: dict = {"encoders": tuple(encoder)} if encoder else {}
    if phantoms:
        overrides["phantoms"] = phantoms
    stages = {"vae": vae_steps, "ldm": ldm_steps, "labels": label_steps, "control": control_steps}
    for stage, steps in stages.items():
        if steps:
            overrides[stage] = {"steps": steps}
        elif steps == 0:
            overrides[stage] = None
    sha = build_demo_bundle(out, work, recipe_for(preset, overrides))
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
    hu_rule: str = HU_RULE,
) -> None:
    """Train the VAE on random crops (resumes from the last checkpoint in --out)."""
    from report2ct.config import preset as model_preset
    from training.engine import TrainConfig
    from training.runs import train_vae_run

    _setup_logging()
    train_config = TrainConfig(steps=steps, micro_batch=micro_batch, lr=lr, zero_stage=zero_stage)
    train_vae_run(data, out, model_preset(preset), train_config, crop=crop, hu_rule=hu_rule)
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
    encoder: list[str] | None = typer.Option(None, "--encoder", help=ENCODER_HELP),
    allow_remote_code: bool = typer.Option(False, "--allow-remote-code", help=REMOTE_CODE_HELP),
    hu_rule: str = HU_RULE,
) -> None:
    """Train the latent diffusion model on cached VAE latents and report
    contexts (computed once, volume by volume, into OUT/latents/), with the label
    token when the preset has one; resumes from OUT. The text encoders are
    copied into OUT/encoders/ first, and `train export` ships those."""
    from report2ct.config import preset as model_preset
    from training.encoder import EncoderImportError
    from training.engine import TrainConfig
    from training.runs import train_ldm_run

    overrides = encoder_overrides(encoder)
    _setup_logging()
    train_config = TrainConfig(steps=steps, micro_batch=micro_batch, lr=lr, zero_stage=zero_stage)
    with refused_on(EncoderImportError):
        scale, _ = train_ldm_run(
            data,
            vae_run,
            out,
            model_preset(preset),
            train_config,
            encoders_dir=encoders_dir,
            encoders=overrides,
            allow_remote_code=allow_remote_code,
            hu_rule=hu_rule,
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
    hu_rule: str = HU_RULE,
) -> None:
    """Train the mask condition: a ControlNet on the data set's label maps
    (legend from masks/legend.json), the LDM run's UNet frozen; resumes from OUT."""
    from report2ct.config import preset as model_preset
    from training.engine import TrainConfig
    from training.runs import train_controlnet_run

    _setup_logging()
    train_config = TrainConfig(steps=steps, micro_batch=micro_batch, lr=lr, zero_stage=zero_stage)
    train_controlnet_run(data, ldm_run, out, model_preset(preset), train_config, hu_rule=hu_rule)
    typer.echo(f"trained; checkpoints in {out / 'checkpoints'}")


@train_app.command("export")
def export(
    vae_run: str = typer.Option(..., "--vae-run", help="a `train vae` run (directory or s3://)"),
    ldm_run: str = typer.Option(..., "--ldm-run", help="a `train ldm` run (directory or s3://)"),
    out: str = typer.Option(..., "--out", help="bundle to write (directory or s3://)"),
    encoders_dir: Path | None = typer.Option(
        None, "--encoders-dir", help="directory holding the preset's bundle: text encoders"
    ),
    controlnet_run: str | None = typer.Option(
        None, "--controlnet-run", help="a `train controlnet` run (the mask condition)"
    ),
    data: str | None = typer.Option(
        None, "--data", help="the ControlNet's data set (its masks/legend.json is the legend)"
    ),
    preset: str = typer.Option(
        "demo",
        "--preset",
        help="the runs' preset, unless the LDM run recorded its model (model.json, written "
        "by a train job), which is then used as recorded",
    ),
    encoder: list[str] | None = typer.Option(
        None,
        "--encoder",
        help=ENCODER_HELP + " Only for an LDM run that did not record its own (encoders/).",
    ),
    allow_remote_code: bool = typer.Option(False, "--allow-remote-code", help=REMOTE_CODE_HELP),
) -> None:
    """Export the runs' EMA weights (latest checkpoints) as a verified bundle
    that `ctfactory generate --model` loads, with the text encoders the LDM
    run was trained with. Runs on s3:// are fetched first (their latest EMA
    weights, the LDM's cache and encoders); a bundle for s3:// is written
    locally, verified, then uploaded."""
    import tempfile

    from factory.storage import local_copy, open_storage
    from jobs.train import LDM_RUN_FILES, fetch_run, run_model
    from report2ct.config import preset as model_preset
    from training.encoder import EncoderImportError
    from training.export import export_runs

    overrides = encoder_overrides(encoder)
    if (controlnet_run is None) != (data is None):
        raise typer.BadParameter("--controlnet-run and --data go together")
    with tempfile.TemporaryDirectory(prefix="ct-factory-export-") as scratch:
        scratch = Path(scratch)
        ldm = fetch_run(ldm_run, scratch / "ldm", LDM_RUN_FILES)
        vae = fetch_run(vae_run, scratch / "vae")
        control = fetch_run(controlnet_run, scratch / "controlnet") if controlnet_run else None
        target = open_storage(out)
        local_out = target.local_path() or scratch / "bundle"
        with refused_on(EncoderImportError):
            sha = export_runs(
                local_out,
                run_model(ldm) or model_preset(preset),
                vae,
                ldm,
                encoders_dir=encoders_dir,
                controlnet_run=control,
                data=local_copy(data) if data else None,
                encoders=overrides,
                allow_remote_code=allow_remote_code,
            )
        if target.local_path() is None:
            target.upload_dir(local_out, "")
    typer.echo(f"bundle {out} sha256 {sha}")


@train_app.command("import-vae")
def import_vae(
    checkpoint: Path = typer.Argument(
        ..., help="a pretrained MAISI VAE: NVIDIA's .pt (a state dict) or .safetensors"
    ),
    out: Path = typer.Option(..., "--out", help="VAE run directory to write"),
    preset: str = typer.Option(
        "paper", "--preset", help="the preset whose VAE shape the weights have"
    ),
) -> None:
    """Make a pretrained MAISI VAE a VAE run (checkpoints/step-0/ema.safetensors)
    that `train ldm --vae-run` and `train export --vae-run` read like one
    trained here. The .pt is read with torch.load(weights_only=True): tensors
    only, never code."""
    from report2ct.config import preset as model_preset
    from training.maisi import MaisiImportError, import_maisi_vae

    with refused_on(MaisiImportError):
        import_maisi_vae(checkpoint, out, model_preset(preset))
    typer.echo(f"VAE run {out} from {checkpoint} ({preset} shape)")
