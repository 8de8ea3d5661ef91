"""``quantkit sweep``: several recipes, locally or as Ray tasks, gathered into one results file
and one report (quantkit.sweep)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from quantkit.cli.options import force_option, max_retries_option, ray_option, typed_command

EXIT_RECIPE_FAILED = 1


@click.command("sweep")
@click.argument("recipes", nargs=-1, required=True, type=click.Path(path_type=Path),
                metavar="RECIPE...")
@ray_option("each recipe (default: one after another, here)")
@max_retries_option
@click.option("--out", required=True, type=click.Path(path_type=Path), metavar="DIR",
              help="Each recipe runs in DIR/<recipe name>; DIR/results.json, DIR/report/ and "
                   "DIR/sweep.json gather them.")
@force_option
def command(recipes: tuple[Path, ...], ray_address: str | None, max_retries: int, out: Path,
            force: bool) -> None:
    """Run every RECIPE (configs/*.yaml, quantize recipes too) into DIR/<name>, then gather
    their engines as <recipe>/<engine> into DIR/results.json and one report.

    A RECIPE with a sweep: section stands for every combination of its axes (dotted paths
    into the recipe, each with a list of values), each named by its values, which become
    columns of the results and the report. A failed recipe does not stop the others: the
    sweep names it and why, and exits 1. A rerun reuses every finished step. Examples:

    \b
      quantkit sweep configs/a.yaml configs/b.yaml --ray auto --out out/sweep
      quantkit sweep configs/demo-sweep.yaml --out out/demo-sweep
    """
    from quantkit.sweep import run_sweep

    outcome = run_sweep(list(recipes), out, ray_address=ray_address, force=force,
                        say=click.echo, command=typed_command(click.get_current_context()),
                        max_retries=max_retries)
    if outcome.results is not None:
        click.echo(f"Results: {outcome.results}")
    if outcome.report is not None:
        click.echo(f"Report: {outcome.report}")
    for failed in outcome.failed:
        click.echo(f"Failed: {failed.name}: {failed.error}", err=True)
    if outcome.gather_error is not None:
        click.echo(f"Failed: gathering the results: {outcome.gather_error}", err=True)
    if not outcome.ok:
        click.echo(f"{len(outcome.failed)} of {len(outcome.recipes)} recipes failed; the "
                   f"others are kept in {outcome.out}", err=True)
        sys.exit(EXIT_RECIPE_FAILED)
