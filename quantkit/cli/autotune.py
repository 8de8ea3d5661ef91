"""``quantkit autotune``: the mixed-precision plan with the most INT8 (or the lowest latency)
within a perplexity budget, as a recipe, a tuned table and a verified engine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from quantkit.cli.options import force_option, max_retries_option, ray_option
from quantkit.cli.tune_options import tune_options, tune_settings


@click.command("autotune")
@tune_options
@click.option("--max-ppl-increase", "budget", default="1%", show_default=True,
              help="Budget over FP32 perplexity: relative (1%) or absolute (0.3).")
@click.option("--objective", type=click.Choice(["coverage", "latency"]), default="coverage",
              show_default=True,
              help="coverage: most linear-layer MACs in INT8; latency: fastest engine (builds "
                   "and times the candidate plans).")
@click.option("--search-windows", default=4, show_default=True, type=int,
              help="Windows the budget is checked on during the search.")
@click.option("--holdout-windows", default=4, show_default=True, type=int,
              help="Windows, disjoint from the search windows, that verify the result.")
@click.option("--max-evals", default=120, show_default=True, type=int,
              help="Plans the search may measure besides the sensitivity pass (cached "
                   "measurements count too, so a rerun takes the same path).")
@click.option("--methods", default="entropy,percentile,mse,minmax", show_default=True,
              help="Calibration methods to choose from per tensor ('' for the table's only).")
@click.option("--method-groups", default=6, show_default=True, type=int,
              help="How many of the most sensitive groups get the per-tensor method search.")
@click.option("--candidate", "candidates", multiple=True, type=click.Path(path_type=Path),
              help="Another table.json of the same model to choose from, e.g. 'quantkit "
                   "calibrate --smoothquant' at another alpha (repeatable); its ONNX is the one "
                   "its calibration names. The candidate whose op kinds cost least in INT8 is "
                   "tuned.")
@click.option("--no-build", is_flag=True, help="Write the plan and table only, no engine.")
@ray_option("the independent measurements of each search step (the same plan)")
@max_retries_option
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output directory.")
@force_option
def command(budget: str, objective: str, search_windows: int, holdout_windows: int,
            max_evals: int, methods: str, method_groups: int, candidates: tuple[Path, ...],
            no_build: bool, ray_address: str | None, max_retries: int, out: Path,
            force: bool,
            **kw: Any) -> None:
    """Search for a plan within --max-ppl-increase of FP32 and write OUT: plan.yaml (for
    'quantkit build --plan'), table.json, engine/, autotune.json, autotune.md.

    \b
    quantkit autotune --onnx out/export --table out/calib/table.json \\
        --dataset wikitext --split validation --max-ppl-increase 1% --out out/autotune
    """
    import dataclasses

    from quantkit.calib.run import calibration_onnx
    from quantkit.progress import progress_bar
    from quantkit.tune.autotune import autotune
    from quantkit.tune.budget import AutotuneSettings, Budget

    settings = AutotuneSettings(
        budget=Budget.parse(budget), objective=objective, max_evals=max_evals,
        methods=tuple(m.strip() for m in methods.split(",") if m.strip()),
        method_groups=method_groups, build=not no_build)
    settings.check()
    tune = tune_settings(search_windows, holdout_windows, **kw)
    alternatives = [dataclasses.replace(tune, onnx=calibration_onnx(t), table=t)
                    for t in candidates]
    with progress_bar("autotune", "{task.fields[stage]}") as bar:
        tasks: dict[str, Any] = {}

        def sensitivity(done: int, total: int) -> None:
            if "s" not in tasks:
                tasks["s"] = bar.add_task("sensitivity", total=total, stage="groups")
            bar.update(tasks["s"], completed=done)

        def step(s: Any) -> None:
            if "search" not in tasks:
                tasks["search"] = bar.add_task("search", total=max_evals, stage="")
            bar.advance(tasks["search"])
            bar.update(tasks["search"], stage=f"{s.stage}: {s.action[:40]}")

        result = autotune(tune, settings, out, force=force,
                          say=lambda m: bar.console.print(m), on_step=step,
                          sensitivity_progress=sensitivity, alternatives=alternatives,
                          ray_address=ray_address, max_retries=max_retries)
    for c in result.candidates:
        click.echo(f"{'* ' if c['chosen'] else '  '}candidate {c['label']}: op kinds in INT8 "
                   f"cost {c['score']:+.3f} ppl in sum ({c['table']})")
    click.echo(f"{len(result.int8_groups)} of {len(result.int8_groups) + len(result.fp32_groups)}"
               f" groups INT8, {100 * result.coverage:.1f}% of linear-layer MACs; search ppl "
               f"{result.search_perplexity:.4f} (FP32 {result.baseline['search']:.4f}); "
               f"{result.model_runs} model runs, {result.seconds:.0f} s")
    if result.parallel is not None:
        p = result.parallel
        click.echo(f"Ray ({p['ray']}): {p['tasks']} measurements on {p['workers']} workers, "
                   f"{p['unread']} of them speculative and not needed")
    if result.holdout_perplexity is not None:
        click.echo(f"Held-out: {result.holdout_perplexity:.4f} vs FP32 "
                   f"{result.baseline['holdout']:.4f} (allowed {result.limits['holdout']:.4f}): "
                   f"{'met' if result.met_on_holdout else 'NOT met'}")
    if result.engine is not None:
        e = result.engine
        click.echo(f"Verified {e['precision']} engine: ppl {e['perplexity']:.4f} "
                   f"({e['delta_pct']:+.2f}% vs FP32) on the {e['subset']} subset: "
                   f"{'within' if e['within_budget'] else 'OVER'} the budget")
    click.echo(f"Wrote {out}: plan.yaml, table.json"
               + (", engine/" if result.engine else "") + ", autotune.json, autotune.md")
    if result.candidates:
        click.echo(f"Build engines of this plan from {result.onnx}")
