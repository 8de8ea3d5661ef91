"""Helpers shared by the CLI tests."""

from __future__ import annotations

from click.testing import CliRunner

from quantkit.cli.main import cli


def invoke(*args: object):
    return CliRunner().invoke(cli, [str(a) for a in args])


def one_line_error(result) -> str:
    """The single ``Error: ...`` line of a failed command (exit code 2, no traceback)."""
    assert result.exit_code == 2, result.output
    lines = result.output.rstrip("\n").splitlines()  # a blank line before the error fails too
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert "Traceback" not in result.output
    return lines[0]
