"""`ctfactory demo`: the README's main job on the embedded default.

Starts a local Ray, generates the example reports (realistic CT-RATE-style
and phantom-style, examples/reports.jsonl) with the committed demo bundle,
two workers, to ./out/demo, with live progress, the summary table and PNG
previews, as a user would first meet the factory; then the control examples
(labels alone, label maps drawn by the phantom world: examples/control.jsonl)
with the same bundle to ./out/demo-control, whose volumes carry their masks.
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
    """Generate the example manifests with the demo bundle (local Ray, 2 workers)."""
    from rich.console import Console

    from factory.cli_support import run_with_progress
    from factory.index import read_index
    from factory.job import DEFAULT_BUNDLE, GenerateOptions
    from factory.storage import open_storage

    console = Console()
    bundle = DEFAULT_BUNDLE
    if not (bundle / "SHA256SUMS").exists():
        console.print(f"[red]no bundle at {bundle}[/red]: build it with `make demo-bundle`")
        raise typer.Exit(2)
    codes = []
    for run, name in [("demo", "reports.jsonl"), ("demo-control", "control.jsonl")]:
        manifest = ROOT / "examples" / name
        console.print(
            f"[bold]ct-factory demo[/bold]: {manifest.relative_to(ROOT)} -> {out}/{run} "
            f"(bundle {bundle.relative_to(ROOT)}, {workers} workers on a local Ray)"
        )
        options = GenerateOptions(
            manifest=str(manifest),
            output=str(out),
            run=run,
            bundle=str(bundle),
            workers=workers,
            num_steps=steps,
            preview=True,
            nifti=True,
        )
        codes.append(run_with_progress(options))
        index = read_index(open_storage(str(out / run)))
        previews = [entry.preview_uri for entry in index if entry.preview_uri]
        if previews:
            console.print(
                f"previews: {len(previews)} PNGs (axial, coronal, sagittal; lung and "
                f"mediastinal windows) beside each volume, e.g. {previews[0]}"
            )
    code = max(codes)
    raise typer.Exit(code)
