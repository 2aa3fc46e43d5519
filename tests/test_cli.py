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
