"""`ctfactory generate | preview | cleanup`: the generation factory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from pydantic_core import PydanticUndefined

from factory.options import GenerateOptions
from jobs.cli._app import app


def _flag(name: str, *flags: str, **kwargs: Any) -> Any:
    """A typer option for one GenerateOptions field: the field's description
    and default are its help, the model validates the value. Left unset
    (None), the field keeps the model's default."""
    info = GenerateOptions.model_fields[name]
    default, description = info.default, info.description or ""
    if default not in (None, False, PydanticUndefined) and "default" not in description:
        description += f" (default: {default})"
    long_name = "--" + name.replace("_", "-")
    names = (long_name, *(f for f in flags if f != long_name))
    unset = ... if info.is_required() else None
    return typer.Option(unset, *names, help=description, show_default=False, **kwargs)


def _switch(name: str) -> Any:
    """A typer flag for one boolean GenerateOptions field (off by default)."""
    flag = "--" + name.replace("_", "-")
    return typer.Option(False, flag, help=GenerateOptions.model_fields[name].description)


@app.command()
def generate(
    manifest: str = _flag("manifest", "-m"),
    output: str = _flag("output", "--out", "-o"),
    bundle: str | None = _flag("bundle", "--model"),
    run: str | None = _flag("run"),
    workers: int | None = _flag("workers"),
    gpus_per_worker: float | None = _flag("gpus_per_worker"),
    cpus_per_worker: float | None = _flag("cpus_per_worker"),
    precision: str | None = _flag("precision"),
    num_steps: int | None = _flag("num_steps", "--steps"),
    guidance_scale: float | None = _flag("guidance_scale", "--guidance"),
    method: str | None = _flag("method"),
    batch_size: int | None = _flag("batch_size"),
    nifti: bool = _switch("nifti"),
    preview: bool = _switch("preview"),
    max_task_retries: int | None = _flag("max_task_retries"),
    labels: str | None = _flag("labels"),
    allow_remote_code: bool = _switch("allow_remote_code"),
    torch_compile: bool = _switch("torch_compile"),
    channels_last: bool = _switch("channels_last"),
    cudnn_benchmark: bool = _switch("cudnn_benchmark"),
    verify: str | None = _flag("verify"),
    resample: int | None = _flag("resample"),
    drop_unverified: bool = _switch("drop_unverified"),
    dry_run: bool = typer.Option(
        False,
        "--dry-run",
        help="validate the manifest against the bundle and print the plan (volumes per output "
        "grid, rejections with line and reason); writes nothing; exit 0 all valid, 3 otherwise",
    ),
) -> None:
    """Generate one CT volume per manifest record, as OME-Zarr with provenance.

    The flags are the fields of a `kind: generate` job spec (--output,
    --bundle, --num-steps, --guidance-scale, ...; --out, --model, --steps and
    --guidance are kept as aliases). A rerun of the same manifest into the
    same --output/--run skips every committed volume and generates only the
    rest. Results: <output>/<run>/ index/ (committed volumes), errors/
    (rejected or failed records, with line and reason), written in parts as
    they arrive, and summary.json (counts, rate and ETA while running).
    --dry-run validates the manifest and prints the plan without writing. Exit code 0: all committed; 3: some records rejected or
    failed; 2: the job could not run. S3 is reached through the standard AWS
    settings (AWS_ENDPOINT_URL, credentials chain, region).
    """
    from pydantic import ValidationError

    from factory.cli_support import run_with_progress

    given = {name: value for name, value in locals().items() if name in OPTION_FIELDS}
    try:
        options = GenerateOptions(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as error:
        problems = "; ".join(
            f"--{str(e['loc'][0]).replace('_', '-')}: {e['msg']}" for e in error.errors()
        )
        raise typer.BadParameter(problems) from None
    raise typer.Exit(print_plan(options) if dry_run else run_with_progress(options))


def print_plan(options: GenerateOptions) -> int:
    """`--dry-run`: what the job would do, and every rejection; exit code."""
    from rich.console import Console
    from rich.table import Table

    from factory.job import EXIT_OK, EXIT_PARTIAL, plan_generate

    console = Console()
    plan = plan_generate(
        options,
        on_rejection=lambda r: console.print(
            f"line {r.line}: {r.id or '(no id)'}: {r.reason}", markup=False, highlight=False
        ),
    )
    table = Table(title=f"plan for {options.manifest}")
    for column in ("output grid (voxels)", "spacing (mm)", "volumes"):
        table.add_column(column, justify="right")
    for (shape, spacing), count in sorted(plan.grids.items()):
        table.add_row("x".join(map(str, shape)), " x ".join(f"{v:g}" for v in spacing), str(count))
    console.print(table)
    console.print(
        f"{plan.volumes} volumes requested ({plan.already_committed} already committed in this "
        f"run), {plan.rejected} records rejected; nothing written"
    )
    return EXIT_OK if plan.rejected == 0 else EXIT_PARTIAL


OPTION_FIELDS = frozenset(GenerateOptions.model_fields)


@app.command()
def preview(
    volume: str = typer.Argument(..., help="an output volume (<...>.ome.zarr, local or s3://)"),
    png: Path = typer.Option(..., "--png", help="PNG file to write"),
) -> None:
    """Write axial, coronal and sagittal slices (lung and mediastinal windows) as one PNG."""
    from factory.preview import render_preview
    from factory.reader import open_volume

    data, spacing, attrs = open_volume(volume)
    title = attrs.get("provenance", {}).get("record", {}).get("id", Path(volume).name)
    png.write_bytes(render_preview(data, spacing, title=title))
    typer.echo(f"wrote {png}")


@app.command()
def cleanup(
    run: str = typer.Argument(..., help="a run directory or s3:// prefix (<out>/<run>)"),
) -> None:
    """Remove uncommitted leftovers of killed attempts and the run's scratch space."""
    from factory.job import cleanup_run

    removed = cleanup_run(run)
    typer.echo(", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in removed.items()))
