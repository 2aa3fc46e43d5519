"""The `ctfactory` command line.

Each subcommand lives in its own module here and imports the package it drives
only inside the command body, so `ctfactory --help` stays instant (no torch,
ray or deepspeed import at start-up). To add a command: write a module that
decorates functions with `@app.command()` and name it in `COMMAND_MODULES`.
"""

import importlib

from jobs.cli._app import app

COMMAND_MODULES = (
    "jobs.cli.info",
    "jobs.cli.demo",
    "jobs.cli.submit",
    "jobs.cli.generate",
    "jobs.cli.evaluate",
    "jobs.cli.phantoms",
    "jobs.cli.train",
    "jobs.cli.bundle",
)

for _name in COMMAND_MODULES:
    importlib.import_module(_name)


def main() -> None:
    app()


__all__ = ["app", "main"]
