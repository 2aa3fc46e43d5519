"""`ctfactory bundle init | verify`: model bundles."""

from __future__ import annotations

from pathlib import Path

import typer

from jobs.cli._app import app

bundle_app = typer.Typer(help="Create and check model bundles.", no_args_is_help=True)
app.add_typer(bundle_app, name="bundle")


@bundle_app.command("init")
def init(
    out: Path = typer.Option(..., "--out", help="bundle directory to write"),
    preset: str = typer.Option("tiny", "--preset", help="tiny | demo | paper"),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Write a randomly initialised bundle of a preset (for tests, benchmarks
    and building the factory before a model is trained)."""
    from report2ct.bundle import build_random_bundle

    typer.echo(f"{out}: sha256 {build_random_bundle(out, preset_name=preset, seed=seed)}")


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
