"""The CLI surface: help, light imports, one-line errors with exit code 2."""

from __future__ import annotations

import subprocess
import sys

from click.testing import CliRunner

from quantkit.cli.main import cli


def test_help_lists_commands():
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    assert "export" in result.output and "demo" in result.output


def test_import_and_help_stay_light():
    """`import quantkit` and `quantkit --help` import neither torch, onnxruntime nor tensorrt."""
    code = (
        "import sys\n"
        "import quantkit, quantkit.cli.main\n"
        "from click.testing import CliRunner\n"
        "assert CliRunner().invoke(quantkit.cli.main.cli, ['--help']).exit_code == 0\n"
        "heavy = [m for m in ('torch', 'onnxruntime', 'tensorrt', 'transformers') "
        "if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_version():
    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0 and "quantkit" in result.output
