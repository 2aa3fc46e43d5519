"""The one typer application every command module adds to."""

import typer

app = typer.Typer(
    name="ctfactory",
    help=(
        "Report2CT synthetic chest CT factory: radiology reports in, labelled "
        "3D CT volumes (OME-Zarr) out, on one CPU or a Ray cluster of GPUs."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
