"""`ctfactory info`: what this installation is and what it can run on."""

from jobs.cli._app import app


@app.command()
def info() -> None:
    """Show the installed stack (versions) and the devices torch can use."""
    from importlib.metadata import PackageNotFoundError, version

    from rich.console import Console
    from rich.table import Table

    table = Table(title="ct-factory", show_header=True)
    table.add_column("component")
    table.add_column("version")
    for dist in (
        "ct-factory",
        "torch",
        "monai",
        "transformers",
        "deepspeed",
        "ray",
        "zarr",
        "ome-zarr",
        "boto3",
        "pydantic",
        "nibabel",
    ):
        try:
            table.add_row(dist, version(dist))
        except PackageNotFoundError:
            table.add_row(dist, "[red]missing[/red]")

    import torch

    device = f"cuda x{torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu"
    table.add_row("device", f"{device}, {torch.get_num_threads()} threads")
    Console().print(table)
