"""The ``quantkit`` click group. User errors print one line and exit 2; Ctrl-C exits 130;
quantkit's warnings print as one ``Warning: ...`` line on stderr."""

from __future__ import annotations

import sys
import warnings
from typing import Any

import click

from quantkit import __version__
from quantkit.errors import QuantkitError, QuantkitWarning

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


class QuantkitGroup(click.Group):
    """Turns QuantkitError into one line on stderr and exit code 2, with no traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            with warnings.catch_warnings():
                shown = warnings.showwarning

                def show(message: Any, category: type[Warning], *args: Any, **kw: Any) -> None:
                    if issubclass(category, QuantkitWarning):
                        click.echo(f"Warning: {message}", err=True)  # one line, no source
                    else:
                        shown(message, category, *args, **kw)

                warnings.showwarning = show
                return super().invoke(ctx)
        except QuantkitError as exc:
            click.echo(f"Error: {exc}", err=True)
            sys.exit(EXIT_USER_ERROR)
        except KeyboardInterrupt:
            click.echo("Interrupted: no partial output was written.", err=True)
            sys.exit(EXIT_INTERRUPTED)


@click.group(cls=QuantkitGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="quantkit")
def cli() -> None:
    """INT8 quantization and calibration for LLM inference, with measured accuracy and speed.

    Typical flow: export -> calibrate -> build -> eval -> report (or 'run' for a whole recipe);
    sensitivity and autotune find a mixed-precision plan within a perplexity budget.
    """


def _register() -> None:
    from quantkit.cli import (
        autotune,
        build,
        calibrate,
        demo,
        doctor,
        export,
        generate,
        plan,
        quantize,
        report,
        rotate,
        run,
        sensitivity,
        sweep,
    )
    from quantkit.cli import eval as eval_command

    for module in (export, calibrate, build, plan, eval_command, report, run, demo,
                   sensitivity, autotune, rotate, quantize, doctor, generate, sweep):
        cli.add_command(module.command)


_register()


def main() -> None:
    cli(prog_name="quantkit")
