"""The command line: instant --help, and subcommands listed."""

import shutil
import subprocess
import sys


def test_help_lists_commands_and_imports_nothing_heavy():
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from jobs.cli import app\n"
        "result = CliRunner().invoke(app, ['--help'])\n"
        "assert result.exit_code == 0, result.output\n"
        "print(result.output)\n"
        "heavy = [m for m in ('torch', 'ray', 'deepspeed', 'transformers', 'monai') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "info" in out.stdout
    assert "demo" in out.stdout


def test_console_script_is_installed():
    exe = shutil.which("ctfactory") or str(
        __import__("pathlib").Path(sys.executable).parent / "ctfactory"
    )
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True)
    assert "Usage" in out.stdout


def test_every_help_text_survives_rich_markup():
    """typer renders help through rich markup, which silently drops anything
    that looks like a tag ('[default: x]', '[--flag]'): every option's help
    and every command's docstring must reach the user whole."""
    import re

    import click
    import typer
    from typer.testing import CliRunner

    from jobs.cli import app

    def commands(group, path=()):
        for name, command in group.commands.items():
            if isinstance(command, click.Group):
                yield from commands(command, (*path, name))
            else:
                yield (*path, name), command

    tag = re.compile(r"(?<!\\)\[[a-z/$-]")
    root = typer.main.get_command(app)
    checked = 0
    for path, command in commands(root):
        texts = [command.help or ""] + [getattr(p, "help", None) or "" for p in command.params]
        for text in texts:
            assert not tag.search(text), (path, text)
        result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0, (path, result.output)
        checked += 1
    assert checked >= 12  # every command, nested groups included
