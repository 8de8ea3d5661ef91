"""``quantkit run``: a whole recipe (configs/*.yaml) end to end, resuming what still matches."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click

from quantkit.cli.options import force_option


def run_and_print(recipe_path: Path, workdir: Path | None, force: bool, command: str) -> None:
    from quantkit.config import Recipe
    from quantkit.pipeline import run_recipe

    recipe = Recipe.load(recipe_path)
    outcome = run_recipe(recipe, workdir=workdir, force=force, say=click.echo,
                         progress=sys.stderr.isatty(), command=command)
    reused = sum(s.reused for s in outcome.steps)
    if outcome.quantized is not None:
        from quantkit.cli.quantize import print_result

        click.echo(f"{len(outcome.steps)} steps ({reused} reused).")
        print_result(outcome.quantized, outcome.workdir)
        return
    click.echo(f"{len(outcome.steps)} steps ({reused} reused). Results: {outcome.results}")
    if outcome.report_html.is_file():
        click.echo(f"Report: {outcome.report_html.resolve()}")


@click.command("run")
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("--workdir", type=click.Path(path_type=Path),
              help="Where artifacts go (default: the recipe's workdir).")
@force_option
def command(recipe: Path, workdir: Path | None, force: bool) -> None:
    """Run RECIPE (export, calibrate, build every engine, eval, report), reusing artifacts
    that already exist and still match their inputs."""
    run_and_print(recipe, workdir, force, "quantkit " + shlex.join(sys.argv[1:]))
