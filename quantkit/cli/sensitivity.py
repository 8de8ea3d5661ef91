"""``quantkit sensitivity``: perplexity cost of each group alone in INT8, ranked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from quantkit.cli.options import force_option
from quantkit.cli.tune_options import tune_options, tune_settings


@click.command("sensitivity")
@tune_options
@click.option("--top", default=15, show_default=True, type=int,
              help="Rows of the ranking to print.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output directory.")
@force_option
def command(top: int, out: Path, force: bool, **kw: Any) -> None:
    """Measure, for every group (transformer block x op kind, or every op), the perplexity when
    only it runs in INT8, and write the ranking to OUT/sensitivity.json.

    \b
    quantkit sensitivity --onnx out/export --table out/calib/table.json \\
        --dataset wikitext --split validation --out out/sensitivity
    """
    from quantkit.progress import progress_bar
    from quantkit.tune.sensitivity import run_sensitivity

    settings = tune_settings(0, 0, **kw)
    with progress_bar("sensitivity", "groups") as bar:
        task: list[Any] = []

        def advance(done: int, total: int) -> None:
            if not task:
                task.append(bar.add_task("groups", total=total))
            bar.update(task[0], completed=done)

        result = run_sensitivity(settings, out, force=force, progress=advance,
                                 say=lambda m: click.echo(m, err=True))
    click.echo(f"FP32 perplexity {result.baseline:.4f} on {result.data['windows']['rank']} "
               f"window(s) of {result.data['max_length']} tokens; {len(result.groups)} groups, "
               f"{result.runs} model runs, {result.seconds:.0f} s")
    click.echo(f"{'group':34s} {'kind':12s} {'ppl':>10s} {'delta':>9s} {'MACs %':>7s}")
    total = sum(g.macs for g in result.groups) or 1
    for g in result.groups[:top]:
        click.echo(f"{g.name[:34]:34s} {g.kind:12s} {g.perplexity:10.4f} {g.delta_pct:+8.2f}% "
                   f"{100 * g.macs / total:6.2f}%")
    click.echo(f"Wrote {Path(out) / 'sensitivity.json'}")
