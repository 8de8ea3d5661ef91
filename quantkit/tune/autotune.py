"""Automatic mixed precision to a perplexity budget.

The search runs on the probe (``quantkit.tune.probe``) and on two subsets of the evaluation
text, ``rank`` and ``search``:

1. **Calibration method per op kind**: for each kind (qkv, attention MatMuls, ...), every group
   of that kind in INT8 at once with its input tensors' ranges from each method (entropy /
   percentile / mse / minmax, recomputed from the histograms in ``stats.npz``, no model run);
   the method with the lowest perplexity on ``rank`` becomes that kind's (the methods of a
   kind differ by far more than the noise of a few windows where it matters). (One method suits
   softmax outputs, another the outlier-heavy MLP products: no single method is best for all.)
2. **Whole kinds first**: kinds by that cost per MAC (on ``rank``), each added (all its
   groups) if the plan so far stays within the budget on ``search``. A kind's cost is
   measured on more text than a group's sensitivity, and the cheap kinds usually fit whole.
3. **Sensitivity** of every other group alone on ``rank`` with those ranges
   (``quantkit.tune.sensitivity``; cached measurements are free), and the **calibration method
   per tensor** of the most sensitive ones (the best is kept where it beats the kind's).
4. **Order** of those groups by sensitivity per linear-layer MAC (cheapest accuracy per unit of
   INT8 work first), after the kinds taken; **bisection** over that order for the longest
   prefix within the search target on ``search``, then a **greedy** pass over the rest in
   chunks: a chunk that keeps the plan within is taken whole, one that does not is halved
   (at most ``greedy_runs`` measurements; a lone group that fails is left in FP32).
5. **Held-out check** (the ``holdout`` subset, never used by the steps above), at the upper
   ``confidence`` bound (``quantkit.tune.search``): if the plan misses there, the longest
   prefix of it (in the order above: whole kinds first, the last-added groups last) that meets
   the bound on the held-out windows is found by bisection and kept, and the groups after the
   one that broke the bound are tried in chunks on those windows (at most ``greedy_runs``).
6. ``objective=latency``: the feasible plans seen on the way are built and timed; the fastest
   one that meets the budget on the held-out subset wins.
7. **Verification**: the chosen plan is built as a real engine (ONNX Runtime backend) and its
   perplexity measured on the held-out subset; that number, not the probe's, is the result.

Here: ``run_search`` (steps 1-5) and ``autotune`` (all of them, and the files it writes). The
settings, the budget and the result are in ``quantkit.tune.budget``; steps 1 and 3's method
searches and the choice among candidate exports in ``quantkit.tune.method_search``; steps 2, 4
and 5 in ``quantkit.tune.search``; engines (steps 6 and 7) in ``quantkit.tune.engines``;
autotune.md in ``quantkit.tune.summary``.

Every step is recorded (``path`` in ``autotune.json``). ``max_evals`` bounds the measurements of
the search (all steps but the sensitivity pass), cached or not, so that a rerun from the cache
takes the same path; measurements are reproducible from the seed that chose the subsets.
With ``--ray`` (``quantkit.tune.ray_measure``) each step's independent measurements run side by
side as Ray tasks and the steps above decide from them exactly as they do one by one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from quantkit.tune.budget import (
    AUTOTUNE_NAME,
    ENGINE_DIR,
    PLAN_NAME,
    SENSITIVITY_NAME,
    SUMMARY_NAME,
    TABLE_NAME,
    AutotuneResult,
    AutotuneSettings,
    Step,
)
from quantkit.tune.context import TuneContext, TuneSettings, load_context
from quantkit.tune.engines import choose_fastest, plan_recipe, tuned_table, verify
from quantkit.tune.method_search import choose_candidate, search_kind_methods, search_methods
from quantkit.tune.search import (
    _Search,
    bisect_and_greedy,
    efficiency_order,
    holdout_phase,
    seed_kinds,
)
from quantkit.tune.sensitivity import SensitivityResult, measure_sensitivity
from quantkit.tune.summary import summary_markdown


def run_search(context: TuneContext, settings: AutotuneSettings,
               on_step: Callable[[Step], None] | None = None,
               sensitivity_progress: Callable[[int, int], None] | None = None,
               search: _Search | None = None,
               ) -> tuple[AutotuneResult, SensitivityResult]:
    """Steps 1-5 on the probe (``search``: step 1 already done by ``choose_candidate``).
    Latency and verification (steps 6-7) need engines: ``autotune``."""
    started = time.perf_counter()
    settings.check()
    if search is None:
        search = _Search(context, settings, on_step)
        search_kind_methods(search)
    baseline = context.measurer.measure(search.subset, ()).perplexity
    limit = settings.budget.limit(baseline, settings.search_share)
    seed = seed_kinds(search, limit)
    taken = set(seed)
    sensitivity = measure_sensitivity(context, "rank", progress=sensitivity_progress,
                                      methods=search.methods,
                                      only=[g.name for g in context.groups if g.name not in taken],
                                      stop=search.time_is_up)
    if taken:
        context.notes.append(f"sensitivity measured for the {len(sensitivity.groups)} groups "
                             f"outside the kinds taken whole ({len(taken)} groups)")
    deltas = {g.name: g.delta for g in sensitivity.groups}
    search_methods(search, sensitivity, sensitivity.baseline, deltas)
    order = [*seed, *efficiency_order(context, deltas)]
    chosen, _ = bisect_and_greedy(search, order, limit, feasible=len(seed))
    has_holdout = "holdout" in context.subsets
    if search.out_of_time:
        context.notes.append(f"the search time limit ({settings.time_limit_s:.0f} s) stopped "
                             f"the search after {search.evals} measurements; the held-out "
                             "check and the engine's verification still ran")
        search.deadline = None  # the held-out check of the plan found so far always runs
    baselines = {"rank": sensitivity.baseline, "search": baseline}
    limits = {"search": limit}
    holdout_ppl: float | None = None
    met: bool | None = None
    if has_holdout:
        base_h = context.measurer.measure("holdout", ()).perplexity
        baselines["holdout"] = base_h
        limits["holdout"] = settings.budget.limit(base_h, settings.holdout_share)
        chosen, holdout_ppl, met = holdout_phase(search, chosen, order, limits["holdout"])
    final = search.measurer.measure(search.subset, tuple(chosen), search.methods_for(chosen))
    in_plan = set(chosen)
    result = AutotuneResult(
        settings=settings.to_dict(), baseline=baselines, limits=limits,
        int8_groups=[g.name for g in context.groups if g.name in in_plan],
        fp32_groups=[g.name for g in context.groups if g.name not in in_plan],
        methods=search.methods_for(chosen), coverage=context.coverage(chosen),
        search_perplexity=final.perplexity, holdout_perplexity=holdout_ppl,
        met_on_holdout=met, path=search.path, notes=list(context.notes),
        onnx=str(context.onnx_path))
    result.model_runs = context.measurer.runs - search.first_run + search.prior_runs
    result.seconds = time.perf_counter() - started
    result.feasible = search.feasible
    return result, sensitivity


def autotune(tune: TuneSettings, settings: AutotuneSettings, out: Path, *, force: bool = False,
             say: Callable[[str], None] | None = None,
             on_step: Callable[[Step], None] | None = None,
             sensitivity_progress: Callable[[int, int], None] | None = None,
             alternatives: Sequence[TuneSettings] = (), ray_address: str | None = None,
             ray_init: dict[str, Any] | None = None,
             max_retries: int | None = None) -> AutotuneResult:
    """``quantkit autotune``: search, then write OUT (atomically): plan.yaml, table.json,
    engine/, autotune.json, sensitivity.json, autotune.md, manifest.json. ``alternatives`` are
    other calibrated exports of the same model to choose from (``choose_candidate``).
    ``ray_address`` ("local", "auto", a cluster): the measurements run as Ray tasks
    (``quantkit.tune.ray_measure``), the plan the same; ``ray_init``: more ``ray.init``
    arguments; ``max_retries``: Ray's retries of a task whose worker died."""
    from contextlib import nullcontext

    from quantkit.artifacts import check_can_write
    from quantkit.ray_tasks import DEFAULT_MAX_RETRIES, import_ray, ray_session

    settings.check()
    ray = import_ray() if ray_address is not None else None  # before anything is written
    check_can_write(Path(out), force)
    retries = DEFAULT_MAX_RETRIES if max_retries is None else max_retries

    def prepare(context: TuneContext) -> None:
        if ray is not None:
            from quantkit.tune.ray_measure import attach

            attach(ray, context, retries)

    with ray_session(ray, str(ray_address), ray_init) if ray is not None else nullcontext():
        return _autotune(tune, settings, Path(out), force, say, on_step, sensitivity_progress,
                         alternatives, prepare, ray_address)


def _autotune(tune: TuneSettings, settings: AutotuneSettings, out: Path, force: bool,
              say: Callable[[str], None] | None, on_step: Callable[[Step], None] | None,
              sensitivity_progress: Callable[[int, int], None] | None,
              alternatives: Sequence[TuneSettings], prepare: Callable[[TuneContext], None],
              ray_address: str | None) -> AutotuneResult:
    """``autotune`` once Ray (where asked for) is connected."""
    from quantkit.artifacts import (
        atomic_output_dir,
        atomic_write_json,
        atomic_write_text,
        make_manifest,
        write_manifest,
    )

    started = time.perf_counter()
    search: _Search | None = None
    candidates: list[dict[str, Any]] = []
    if alternatives:
        context, search, candidates = choose_candidate([tune, *alternatives], settings, on_step,
                                                       say, prepare)
    else:
        context = load_context(tune, settings.methods, say=say)
        prepare(context)
    try:
        if "holdout" not in context.subsets:
            context.notes.append("no held-out windows: the result is not verified on unseen text")
        result, sensitivity = run_search(context, settings, on_step, sensitivity_progress,
                                         search)
        result.candidates = candidates
        executor = context.measurer.executor
        if executor is not None:
            result.parallel = {"ray": ray_address, "workers": executor.width,
                               "tasks": executor.submitted,
                               "unread": context.measurer.unread}
        with atomic_output_dir(Path(out), force) as tmp:
            if settings.objective == "latency":
                choose_fastest(context, settings, result, tmp, say)
            context.close()  # the probe's memory is not needed for the final engine
            table = tuned_table(context, result.methods)
            recipe = plan_recipe(context, result.int8_groups, settings.budget)
            recipe.save(tmp / PLAN_NAME)
            table.save(tmp / TABLE_NAME)
            if settings.build:
                if say is not None:
                    say("Building and verifying the engine ...")
                verify(context, settings, result, table, tmp / ENGINE_DIR)
            result.seconds = time.perf_counter() - started
            atomic_write_json(tmp / AUTOTUNE_NAME, result.to_dict())
            atomic_write_json(tmp / SENSITIVITY_NAME, sensitivity.to_dict())
            atomic_write_text(tmp / SUMMARY_NAME, summary_markdown(result, context))
            inputs = {**sensitivity.inputs, "autotune": settings.to_dict()}
            if candidates:
                inputs["candidates"] = [{"onnx": c["onnx"], "table": c["table"]}
                                        for c in candidates]
            write_manifest(tmp, make_manifest(
                "autotune", inputs, files={"plan": PLAN_NAME, "table": TABLE_NAME,
                                           "engine": ENGINE_DIR if settings.build else None,
                                           "autotune": AUTOTUNE_NAME,
                                           "sensitivity": SENSITIVITY_NAME}))
        if result.engine is not None:
            result.engine["path"] = str(Path(out) / ENGINE_DIR)
        return result
    finally:
        context.close()
