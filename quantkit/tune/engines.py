"""Engines of autotune's plans: the plan as a recipe and its tuned calibration table, building
an engine of a plan, its perplexity and latency, the fastest of the feasible plans (step 6 of
``quantkit.tune.autotune``) and the verification of the final plan (step 7)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from quantkit.tune.budget import AutotuneResult, AutotuneSettings, Budget, Step
from quantkit.tune.context import TuneContext


def plan_recipe(context: TuneContext, int8_groups: Sequence[str], budget: Budget) -> Any:
    """The plan as a recipe for ``quantkit build --plan``: INT8 by default, the groups left out
    named node by node as FP32."""
    from quantkit.plan import PlanRecipe, PlanRule, Precision

    keep = set(int8_groups)
    rules = tuple(PlanRule(precision=Precision.FP32, node=node)
                  for g in context.groups if g.name not in keep for node in g.nodes)
    return PlanRecipe(default=Precision.INT8, rules=rules, fallback=Precision.FP32,
                      name="autotune",
                      description=f"quantkit autotune: {len(keep)} of {len(context.groups)} "
                                  f"groups INT8 within {budget} perplexity of FP32")


def tuned_table(context: TuneContext, methods: Mapping[str, str]) -> Any:
    """The calibration table with the chosen per-tensor methods' ranges."""
    from quantkit.calib.table import CalibrationTable

    base = context.table
    amax = dict(base.amax)
    amax.update(context.measurer.amax_for(methods))
    params = dict(base.params)
    if methods:
        params["per_tensor_method"] = dict(sorted(methods.items()))
    return CalibrationTable(method=base.method, params=params, amax=amax,
                            model_hash=base.model_hash, data=dict(base.data),
                            skipped=dict(base.skipped), num_samples=base.num_samples,
                            num_tokens=base.num_tokens, weights=base.weights,
                            tuning_data=dict(context.data))


def build_plan_engine(context: TuneContext, int8_groups: Sequence[str], table: Any,
                      budget: Budget, out: Path) -> Any:
    from quantkit.build import build_engine

    precision = "fp32" if not int8_groups else (
        "int8" if len(int8_groups) == len(context.groups) else "mixed")
    recipe = plan_recipe(context, int8_groups, budget) if precision == "mixed" else None
    return build_engine(out, precision=precision, onnx=context.onnx_path,
                        table=table if int8_groups else None, plan=recipe, force=True,
                        options={"weight_layout": context.weight_layout})


def engine_perplexity(context: TuneContext, engine: Any, subset: str) -> float:
    from quantkit.eval.perplexity import evaluate_perplexity

    options = {"threads": context.settings.threads} if context.settings.threads else {}
    with engine.runner(**options) as runner:
        result = evaluate_perplexity(runner, context.subsets[subset],
                                     context.settings.max_length, context.settings.max_length,
                                     context.settings.batch_size)
    return result.perplexity


def engine_latency(context: TuneContext, engine: Any, iterations: int) -> float:
    """p50 milliseconds of one 1 x max_length forward pass."""

    from quantkit.eval.latency import GridPoint, measure_latency

    vocab = context.vocab_size
    options = {"threads": context.settings.threads} if context.settings.threads else {}
    with engine.runner(**options) as runner:
        rows = measure_latency(runner, (GridPoint(1, context.settings.max_length),), vocab,
                               2, iterations)
    return float(rows[0].p50_ms)


def latency_candidates(result: AutotuneResult, count: int) -> list[tuple[str, ...]]:
    """Up to ``count`` distinct feasible plans of the search, spread over their coverage."""
    seen: dict[tuple[str, ...], float] = {}
    for coverage, groups in result.feasible:
        seen.setdefault(tuple(sorted(groups)), coverage)
    final = tuple(sorted(result.int8_groups))
    seen.setdefault(final, result.coverage)
    ranked = sorted(seen.items(), key=lambda kv: -kv[1])
    if len(ranked) <= count:
        return [k for k, _ in ranked]
    picks = [ranked[round(i * (len(ranked) - 1) / max(1, count - 1))][0] for i in range(count)]
    return list(dict.fromkeys([final, *picks]))[:count]


def choose_fastest(context: TuneContext, settings: AutotuneSettings, result: AutotuneResult,
                   workdir: Path, say: Callable[[str], None] | None) -> None:
    """Step 6: build the candidate plans that meet the held-out budget; keep the fastest."""
    import shutil

    limit_h = result.limits.get("holdout")
    table = tuned_table(context, result.methods)
    best: tuple[float, tuple[str, ...]] | None = None
    for groups in latency_candidates(result, settings.latency_candidates):
        if limit_h is not None:
            ppl = context.measurer.measure("holdout", groups,
                                           {t: m for t, m in result.methods.items()}).perplexity
            if ppl > limit_h:
                result.latency.append({"int8_groups": len(groups), "holdout_perplexity": ppl,
                                       "p50_ms": None, "skipped": "over the held-out budget"})
                continue
        if say is not None:
            say(f"Timing a plan with {len(groups)} INT8 groups ...")
        engine_dir = workdir / "latency-candidate"
        engine = build_plan_engine(context, groups, table, settings.budget, engine_dir)
        p50 = engine_latency(context, engine, settings.latency_iterations)
        shutil.rmtree(engine_dir, ignore_errors=True)
        result.latency.append({"int8_groups": len(groups), "coverage": context.coverage(groups),
                               "p50_ms": p50})
        if best is None or p50 < best[0]:
            best = (p50, groups)
    if best is None:
        return
    chosen = set(best[1])
    result.int8_groups = [g.name for g in context.groups if g.name in chosen]
    result.fp32_groups = [g.name for g in context.groups if g.name not in chosen]
    result.coverage = context.coverage(chosen)
    result.methods = {t: m for t, m in result.methods.items()
                      if t in {x for g in chosen for x in context.probe.group_tensors[g]}}
    subset = "search" if "search" in context.subsets else "rank"
    result.search_perplexity = context.measurer.measure(subset, best[1],
                                                        result.methods).perplexity
    if limit_h is not None:
        result.holdout_perplexity = context.measurer.measure("holdout", best[1],
                                                             result.methods).perplexity
        result.met_on_holdout = result.holdout_perplexity <= limit_h


def verify(context: TuneContext, settings: AutotuneSettings, result: AutotuneResult,
           table: Any, engine_dir: Path) -> None:
    """Step 7: build the engine of the final plan; its own perplexity on the held-out subset."""
    engine = build_plan_engine(context, result.int8_groups, table, settings.budget, engine_dir)
    subset = "holdout" if "holdout" in context.subsets else (
        "search" if "search" in context.subsets else "rank")
    ppl = engine_perplexity(context, engine, subset)
    limit = result.limits[subset]
    coverage = engine.manifest.get("int8_coverage")
    result.engine = {"precision": engine.precision, "subset": subset, "perplexity": ppl,
                     "baseline": result.baseline[subset], "limit": limit,
                     "delta_pct": 100.0 * (ppl / result.baseline[subset] - 1.0),
                     "within_budget": ppl <= limit,
                     "int8_coverage": float(coverage) if coverage is not None else None}
    result.path.append(Step("verify", f"{engine.precision} engine built and evaluated",
                            len(result.int8_groups), result.coverage, ppl, subset, ppl <= limit))
