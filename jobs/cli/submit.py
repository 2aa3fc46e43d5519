"""`ctfactory submit | status | logs`: jobs on a Ray cluster."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from jobs.cli._app import app

ADDRESS = typer.Option(
    None, "--address", help="Ray dashboard URL (default: $RAY_ADDRESS or http://127.0.0.1:8265)"
)


def _address(address: str | None) -> str:
    from jobs.submit import DEFAULT_ADDRESS

    value = address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS
    return value if "://" in value else f"http://{value}"


@app.command()
def submit(
    spec: Path = typer.Argument(..., exists=True, dir_okay=False, help="job spec (YAML or JSON)"),
    address: str | None = ADDRESS,
    wait: bool = typer.Option(
        False, "--wait", help="follow the job until it ends; exit with its result"
    ),
    retry: bool = typer.Option(
        False, "--retry", help="resubmit if the identical job failed or was stopped"
    ),
) -> None:
    """Submit a job spec (generate, train, evaluate, shard) to a Ray cluster.

    The submission id is derived from the spec, so the same spec submitted
    twice is one job: the second call reports the first. Relative local paths
    in the spec are made absolute first.
    """
    from rich.console import Console

    from jobs import submit as jobs_submit
    from jobs.specs import SpecError, load_spec

    console = Console()
    try:
        job_spec = jobs_submit.absolutize(load_spec(spec), base=Path.cwd())
    except SpecError as error:
        console.print(f"[red]{error}[/red]")
        raise typer.Exit(2) from None
    url = _address(address)
    result = jobs_submit.submit(job_spec, address=url, retry=retry)
    verb = "submitted" if result.created else "already submitted"
    console.print(f"{verb}: [bold]{result.submission_id}[/bold] ({result.status})")
    if wait:
        final = jobs_submit.wait(result.submission_id, address=url)
        console.print(f"{result.submission_id}: {final}")
        raise typer.Exit(0 if final == "SUCCEEDED" else 1)


@app.command()
def status(
    job_id: str = typer.Argument(..., help="submission id"), address: str | None = ADDRESS
) -> None:
    """Show a submitted job's status."""
    import json

    from jobs import submit as jobs_submit

    typer.echo(json.dumps(jobs_submit.status(job_id, address=_address(address)), indent=2))


@app.command()
def logs(
    job_id: str = typer.Argument(..., help="submission id"), address: str | None = ADDRESS
) -> None:
    """Print a submitted job's logs (the driver's output)."""
    from jobs import submit as jobs_submit

    typer.echo(jobs_submit.logs(job_id, address=_address(address)), nl=False)
