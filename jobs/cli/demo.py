"""`ctfactory demo`: the README's main job on the embedded default.

Starts a local Ray, generates the example reports (realistic CT-RATE-style
and phantom-style, examples/reports.jsonl) with the committed demo bundle,
two workers, to ./out/demo, with live progress, the summary table and PNG
previews, as a user would first meet the factory.
"""

from pathlib import Path

import typer

from jobs.cli._app import app

ROOT = Path(__file__).resolve().parents[2]


@app.command()
def demo(
    out: Path = typer.Option(Path("out"), "--out", help="output root"),
    workers: int = typer.Option(2, "--workers", min=1),
    steps: int | None = typer.Option(
        None, "--steps", min=1, help="sampling steps (default: the bundle's)"
    ),
) -> None:
    """Generate the example reports with the demo bundle (local Ray, 2 workers)."""
    from rich.console import Console

    from factory.cli_support import run_with_progress
    from factory.job import DEFAULT_BUNDLE, GenerateOptions

    console = Console()
    if not (DEFAULT_BUNDLE / "SHA256SUMS").exists():
        console.print(
            f"[red]no demo bundle at {DEFAULT_BUNDLE}[/red]: build it with `make demo-bundle`"
        )
        raise typer.Exit(2)
    manifest = ROOT / "examples" / "reports.jsonl"
    console.print(
        f"[bold]ct-factory demo[/bold]: {manifest.relative_to(ROOT)} -> {out}/demo "
        f"(bundle {DEFAULT_BUNDLE.relative_to(ROOT)}, {workers} workers on a local Ray)"
    )
    options = GenerateOptions(
        manifest=str(manifest),
        output=str(out),
        run="demo",
        workers=workers,
        num_steps=steps,
        preview=True,
        nifti=True,
    )
    code = run_with_progress(options)
    previews = sorted((out / "demo" / "previews").glob("*.png"))
    if previews:
        console.print(
            f"previews: {previews[0].parent}/ ({len(previews)} PNGs: axial, coronal, sagittal; "
            "lung and mediastinal windows)"
        )
    raise typer.Exit(code)
