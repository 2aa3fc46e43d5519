"""`ctfactory bundle init | verify`: model bundles."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer

from jobs.cli._app import app

bundle_app = typer.Typer(help="Create and check model bundles.", no_args_is_help=True)
app.add_typer(bundle_app, name="bundle")


ENCODER_HELP = (
    "NAME=SOURCE, repeatable: take the preset's encoder NAME from SOURCE, a local "
    "directory or a hub id already in the local Hugging Face cache (never downloaded); "
    "it is copied into the bundle or run as encoders/NAME (pytorch_model.bin converted "
    "to safetensors). The preset's other hub encoders come from the cache the same way."
)
REMOTE_CODE_HELP = (
    "allow encoders whose repositories ship their own code (CXR-BERT): the code files "
    "are copied in, covered by SHA256SUMS, and loading needs this flag again"
)


@contextmanager
def refused_on(*errors: type[Exception]) -> Iterator[None]:
    """Bad input (an encoder or checkpoint that cannot be used) as one line
    on stderr and exit status 2, not a traceback."""
    try:
        yield
    except errors as error:
        typer.echo(f"refused: {error}", err=True)
        raise typer.Exit(2) from None


def encoder_overrides(values: list[str] | None) -> dict[str, str]:
    """The `--encoder NAME=SOURCE` options of every command that builds text
    encoders, parsed one way."""
    from training.encoder import EncoderImportError, parse_encoder_overrides

    try:
        return parse_encoder_overrides(values)
    except EncoderImportError as error:
        raise typer.BadParameter(str(error), param_hint="--encoder") from None


@bundle_app.command("init")
def init(
    out: Path = typer.Option(..., "--out", help="bundle directory to write"),
    preset: str = typer.Option("tiny", "--preset", help="tiny | demo | paper"),
    seed: int = typer.Option(0, "--seed"),
    encoder: list[str] | None = typer.Option(None, "--encoder", help=ENCODER_HELP),
    allow_remote_code: bool = typer.Option(False, "--allow-remote-code", help=REMOTE_CODE_HELP),
) -> None:
    """Write a bundle of a preset with randomly initialised VAE and UNet (for
    tests, benchmarks and building the factory before a model is trained);
    its text encoders are the real ones, copied in (random tiny BERTs for the
    preset's own bundle: encoders that --encoder does not replace)."""
    import tempfile

    from report2ct.bundle import build_random_bundle
    from report2ct.config import preset as model_preset
    from training.encoder import EncoderImportError, import_encoders

    overrides = encoder_overrides(encoder)
    try:
        config = model_preset(preset)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--preset") from None
    with tempfile.TemporaryDirectory(prefix="encoders-") as scratch:
        with refused_on(EncoderImportError):
            config, dirs = import_encoders(
                config, scratch, overrides, allow_remote_code=allow_remote_code
            )
        sha = build_random_bundle(
            out,
            config=config,
            seed=seed,
            encoder_dirs=dirs,
            metadata={"encoders_from": overrides} if overrides else None,
        )
    typer.echo(f"{out}: sha256 {sha}")


@bundle_app.command("verify")
def verify(path: Path = typer.Argument(..., help="bundle directory")) -> None:
    """Check every checksum and the file types; print the bundle's identity and config."""
    import json

    from report2ct.bundle import BundleError, read_config, verify_bundle

    try:
        sha = verify_bundle(path)
        config = read_config(path)
    except BundleError as error:
        typer.echo(f"refused: {error}", err=True)
        raise typer.Exit(1) from None
    typer.echo(
        json.dumps(
            {
                "bundle_sha256": sha,
                "preset": config.name,
                "default_shape": config.default_shape,
                "default_spacing_mm": config.default_spacing_mm,
                "encoders": [e.name for e in config.encoders],
            },
            indent=2,
        )
    )
