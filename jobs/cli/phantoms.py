"""`ctfactory phantoms`: write a chest phantom data set in CT-RATE's layout."""

from __future__ import annotations

from pathlib import Path

import typer

from jobs.cli._app import app


@app.command()
def phantoms(
    n: int = typer.Option(..., "--n", min=1, help="number of phantoms"),
    out: Path = typer.Option(..., "--out", help="data set root (CT-RATE layout is written inside)"),
    shape: tuple[int, int, int] = typer.Option((96, 96, 64), "--shape", help="voxels X Y Z"),
    spacing_mm: tuple[float, float, float] = typer.Option(
        (4.0, 4.0, 5.0), "--spacing-mm", help="mm X Y Z"
    ),
    seed: int = typer.Option(
        0, "--seed", help="data set seed (phantom i uses a seed derived from it)"
    ),
    workers: int = typer.Option(1, "--workers", min=1, help="processes"),
    prevalence: float = typer.Option(
        0.25, "--prevalence", min=0.0, max=1.0, help="probability of each rendered finding"
    ),
    valid_fraction: float = typer.Option(
        0.1, "--valid-fraction", min=0.0, max=1.0, help="share written as the validation split"
    ),
) -> None:
    """Chest CT phantoms with known findings, masks and CT-RATE-style reports.

    Writes NIfTI volumes, the reports / metadata / labels CSVs exactly as
    CT-RATE lays them out, label-map masks under masks/ with masks/legend.json.
    The same seed gives the same data set whatever --workers is.
    """
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    from phantom.ctrate_layout import DatasetSpec, write_dataset

    spec = DatasetSpec(
        n=n,
        seed=seed,
        shape=shape,
        spacing_mm=spacing_mm,
        prevalence=prevalence,
        valid_fraction=valid_fraction,
    )
    columns = (TextColumn("phantoms"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns) as progress:
        task = progress.add_task("phantoms", total=n)
        counts = write_dataset(
            out, spec, workers=workers, on_progress=lambda: progress.advance(task)
        )
    typer.echo(f"wrote {counts['train']} train + {counts['valid']} valid phantoms to {out}")
