"""`ctfactory generate | preview | cleanup`: the generation factory."""

from __future__ import annotations

from pathlib import Path

import typer

from jobs.cli._app import app


@app.command()
def generate(
    manifest: str = typer.Option(
        ..., "--manifest", "-m", help="JSONL manifest: a local path or s3://bucket/key"
    ),
    out: str = typer.Option(
        ..., "--out", "-o", help="output root: a local directory or s3://bucket/prefix"
    ),
    model: str | None = typer.Option(
        None,
        "--model",
        help="model bundle (local dir or s3://); default: the committed demo bundle",
    ),
    run: str | None = typer.Option(
        None, "--run", help="run name under --out (default: the manifest's file name)"
    ),
    workers: int = typer.Option(
        1, "--workers", min=1, help="generation actors (one per GPU on a GPU cluster)"
    ),
    gpus_per_worker: float = typer.Option(
        0.0, "--gpus-per-worker", min=0, help="GPUs per actor (1 on GPU clusters)"
    ),
    cpus_per_worker: float = typer.Option(
        1.0, "--cpus-per-worker", min=0.05, help="CPUs per actor"
    ),
    precision: str = typer.Option("bf16", "--precision", help="bf16 | fp16 | fp32 (autocast)"),
    steps: int | None = typer.Option(
        None, "--steps", min=1, help="sampling steps (default: the bundle's)"
    ),
    guidance: float | None = typer.Option(
        None, "--guidance", min=0, help="guidance scale (default: the bundle's)"
    ),
    batch_size: int = typer.Option(
        1, "--batch-size", min=1, help="volumes sampled together per actor call"
    ),
    nifti: bool = typer.Option(
        False, "--nifti", help="also write NIfTI (.nii.gz) with the true affine"
    ),
    preview: bool = typer.Option(False, "--preview", help="also write a PNG preview per volume"),
) -> None:
    """Generate one CT volume per manifest record, as OME-Zarr with provenance.

    A rerun of the same manifest into the same --out/--run skips every
    committed volume and generates only the rest. Results: <out>/<run>/
    index.jsonl (committed volumes), errors.jsonl (rejected or failed
    records, with line and reason), summary.json. Exit code 0: all
    committed; 3: some records rejected or failed; 2: the job could not run.
    S3 is reached through the standard AWS settings (AWS_ENDPOINT_URL,
    credentials chain, region).
    """
    from factory.cli_support import run_with_progress
    from factory.job import GenerateOptions

    if precision not in {"bf16", "fp16", "fp32"}:
        raise typer.BadParameter("must be bf16, fp16 or fp32", param_hint="--precision")
    options = GenerateOptions(
        manifest=manifest,
        output=out,
        bundle=model,
        run=run,
        workers=workers,
        gpus_per_worker=gpus_per_worker,
        cpus_per_worker=cpus_per_worker,
        precision=precision,
        num_steps=steps,
        guidance_scale=guidance,
        batch_size=batch_size,
        nifti=nifti,
        preview=preview,
    )
    raise typer.Exit(run_with_progress(options))


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
