"""`ctfactory demo`: the README's main job on the embedded default."""

from jobs.cli._app import app


@app.command()
def demo() -> None:
    """Run the main job on the embedded default (grows into the full
    generate-on-local-Ray demo as the factory lands)."""
    from jobs.cli.info import info

    info()
