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
    timeout: float | None = typer.Option(
        None, "--timeout", min=1, help="with --wait: give up after this many seconds (exit 2)"
    ),
    log_format: str = typer.Option(
        "text", "--log-format", help="the job's own log lines: text, or json (one object a line)"
    ),
) -> None:
    """Submit a job spec (generate, train, evaluate, shard) to a Ray cluster.

    The submission id is derived from the spec, so the same spec submitted
    twice is one job: the second call reports the first. Relative local paths
    in the spec are made absolute first. With --wait the exit code is the
    job's own: 0 all done, 3 partial (see its errors), 2 it could not run.
    """
    from rich.console import Console

    from jobs import submit as jobs_submit
    from jobs.specs import SpecError, load_spec

    console = Console()
    if log_format not in ("text", "json"):
        raise typer.BadParameter("must be text or json", param_hint="--log-format")
    try:
        job_spec = jobs_submit.absolutize(load_spec(spec), base=Path.cwd())
    except SpecError as error:
        console.print(f"[red]{error}[/red]")
        raise typer.Exit(2) from None
    url = _address(address)
    result = jobs_submit.submit(job_spec, address=url, retry=retry, log_format=log_format)
    verb = "submitted" if result.created else "already submitted"
    console.print(f"{verb}: [bold]{result.submission_id}[/bold] ({result.status})")
    if wait:
        try:
            info = jobs_submit.wait(result.submission_id, address=url, timeout_s=timeout)
        except TimeoutError as error:
            console.print(f"[yellow]{error}[/yellow]; it goes on: `ctfactory status` follows it")
            raise typer.Exit(2) from None
        code = jobs_submit.exit_code(info)
        console.print(f"{result.submission_id}: {info.status} (exit code {code})")
        raise typer.Exit(code)


@app.command()
def status(
    job_id: str = typer.Argument(..., help="submission id"), address: str | None = ADDRESS
) -> None:
    """Show a submitted job's status, its exit code once it ended, and for a
    generate job its live summary (counts, volumes per hour, ETA)."""
    import json

    from jobs import submit as jobs_submit

    typer.echo(json.dumps(jobs_submit.status(job_id, address=_address(address)), indent=2))


@app.command()
def logs(
    job_id: str = typer.Argument(..., help="submission id"),
    address: str | None = ADDRESS,
    follow: bool = typer.Option(
        False, "--follow", "-f", help="keep printing as the job writes, until it ends"
    ),
) -> None:
    """Print a submitted job's logs (the driver's output, actors' warnings
    and errors included)."""
    from jobs import submit as jobs_submit

    if not follow:
        typer.echo(jobs_submit.logs(job_id, address=_address(address)), nl=False)
        return
    for chunk in jobs_submit.follow_logs(job_id, address=_address(address)):
        typer.echo(chunk, nl=False)
