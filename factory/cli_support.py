"""Terminal face of a generate job: live progress bar and final table."""

from __future__ import annotations

import logging

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from factory.job import EXIT_FATAL, GenerateOptions, run_generate


def run_with_progress(options: GenerateOptions) -> int:
    console = Console(stderr=True)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    columns = (
        TextColumn("[bold]generate[/bold]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("generate", total=None, rate="")

        def on_row(_outcome):
            progress.advance(task)
            elapsed = progress.tasks[0].elapsed or 0
            done = progress.tasks[0].completed
            progress.update(task, rate=f"{done / elapsed * 3600:.0f} vol/h" if elapsed else "")

        try:
            result = run_generate(
                options, on_progress=on_row, on_total=lambda n: progress.update(task, total=n)
            )
        except Exception as error:
            console.print(f"[red]generate failed:[/red] {type(error).__name__}: {error}")
            return EXIT_FATAL
    table = Table(title=f"run {result.run_uri}", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    for name, value in result.counts.items():
        table.add_row(name.replace("_", " "), str(value))
    seconds = result.summary["seconds"]
    table.add_row("wall time", f"{seconds['total']:.1f} s")
    table.add_row("volumes per hour", f"{result.summary['volumes_per_hour']:.0f}")
    if seconds["time_split"]:
        table.add_row("seconds per stage, summed over volumes (workers overlap)", "")
    for name, value in seconds["time_split"].items():
        table.add_row(f"  {name}", f"{value:.2f} s")
    table.add_row("index", result.summary["index"]["folder"])
    if result.summary["errors"]["parts"]:
        table.add_row("errors", result.summary["errors"]["folder"])
    Console().print(table)
    return result.exit_code
