"""The calibration method search: per op kind (step 1 of ``quantkit.tune.autotune``), per
tensor of the most sensitive groups (step 3), and, given several calibrated exports of the
same model, the candidate whose op kinds cost the least (step 0)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from quantkit.errors import QuantkitError
from quantkit.tune.budget import AutotuneSettings, Step
from quantkit.tune.context import TuneContext, TuneSettings, load_context
from quantkit.tune.search import _Search
from quantkit.tune.sensitivity import SensitivityResult


def search_kind_methods(search: _Search, label: str = "") -> dict[str, dict[str, Any]]:
    """Step 1: per op kind, the calibration method whose ranges hurt least with every group of
    that kind in INT8 (measured on the rank subset). Returns, per kind, that method, its
    perplexity and its increase over FP32 (with a single method: that method's, so candidates
    stay comparable)."""
    context = search.context
    subset = "rank"
    baseline = context.measurer.measure(subset, ()).perplexity
    base = context.table.method
    others = [m for m in context.tables if m != base]
    best: dict[str, dict[str, Any]] = {}
    kinds = list(dict.fromkeys(g.kind for g in context.groups))
    members = {k: [g.name for g in context.groups if g.kind == k] for k in kinds}
    touched = {k: sorted({t for g in members[k] for t in context.probe.group_tensors.get(g, ())})
               for k in kinds}
    context.measurer.prefetch([*((s, (), None) for s in context.subsets), *(
        (subset, members[k], {} if m == base else {t: m for t in touched[k]})
        for k in kinds if touched[k] for m in (base, *others))])
    for kind in kinds:
        groups, tensors = members[kind], touched[kind]
        if not tensors:
            continue
        best_ppl, best_method = math.inf, base
        for method in (base, *others):
            if search.runs_left <= 0:
                break
            overrides = {} if method == base else {t: method for t in tensors}
            step = search.measure(subset, groups, "method",
                                  f"{label}all {kind} ({len(groups)}): {method} ranges",
                                  math.inf, overrides)
            if step.perplexity < best_ppl:
                best_ppl, best_method = step.perplexity, method
        if best_method != base:
            search.methods.update({t: best_method for t in tensors})
        if math.isfinite(best_ppl):
            best[kind] = {"method": best_method, "perplexity": best_ppl,
                          "delta": best_ppl - baseline, "subset": subset}
    search.kinds = best
    return best


def search_methods(search: _Search, sensitivity: SensitivityResult, baseline: float,
                   deltas: dict[str, float]) -> None:
    """Step 2: per tensor of the most sensitive groups, the calibration method that hurts least."""
    context = search.context
    if len(context.tables) < 2:
        return
    candidates = [g for g in sensitivity.groups if g.delta > 0][: search.settings.method_groups]
    tensors_of = {e.name: context.probe.group_tensors.get(e.name, []) for e in candidates}
    context.measurer.prefetch([
        (sensitivity.subset, [e.name], {t: m for t in tensors_of[e.name]})
        for e in candidates for m in context.tables
        if tensors_of[e.name] and {search.methods.get(t, context.table.method)
                                   for t in tensors_of[e.name]} != {m}])
    for entry in candidates:
        tensors = context.probe.group_tensors.get(entry.name, [])
        if not tensors:
            continue
        current = {t: search.methods.get(t, context.table.method) for t in tensors}
        best_delta, best_method = deltas[entry.name], None
        for method in context.tables:
            if set(current.values()) == {method}:
                continue
            if search.runs_left <= 0:
                return
            overrides = {t: method for t in tensors}
            step = search.measure(sensitivity.subset, [entry.name], "method",
                                  f"{entry.name}: {method} ranges", math.inf, overrides)
            if step.perplexity - baseline < best_delta:
                best_delta, best_method = step.perplexity - baseline, method
        if best_method is not None:
            search.methods.update({t: best_method for t in tensors})
            deltas[entry.name] = best_delta


def candidate_label(tune: TuneSettings) -> str:
    """How a candidate is named in the path: its SmoothQuant alpha, else its table's folder."""
    from quantkit.export import export_manifest, find_onnx

    try:
        manifest = export_manifest(find_onnx(Path(tune.onnx))) or {}
    except QuantkitError:
        manifest = {}
    smooth = manifest.get("smoothquant")
    if isinstance(smooth, dict) and "alpha" in smooth:
        return f"SmoothQuant alpha {smooth['alpha']}"
    return Path(tune.table).parent.name or str(tune.table)


def choose_candidate(tunes: Sequence[TuneSettings], settings: AutotuneSettings,
                     on_step: Callable[[Step], None] | None = None,
                     say: Callable[[str], None] | None = None,
                     prepare: Callable[[TuneContext], None] | None = None,
                     ) -> tuple[TuneContext, _Search, list[dict[str, Any]]]:
    """Step 0, with several calibrated exports (SmoothQuant at different alphas, say): step 1 on
    each; the candidate whose op kinds, each wholly INT8 with its best method, cost the least
    perplexity in sum goes on. Its context and search are returned (the others are closed);
    their runs count against ``max_evals``."""
    path: list[Step] = []
    rows: list[dict[str, Any]] = []
    best: tuple[float, TuneContext, _Search, int] | None = None
    spent = evals = 0
    try:
        for tune in tunes:
            label = candidate_label(tune)
            if say is not None:
                say(f"Candidate {label}: {tune.table}")
            context = load_context(tune, settings.methods, say=say)
            if prepare is not None:
                prepare(context)
            search = _Search(context, settings, on_step)
            search.path, search.prior_runs, search.prior_evals = path, spent, evals
            try:
                kinds = search_kind_methods(search, f"{label}: ")
                baseline = context.measurer.measure("rank", ()).perplexity
            except BaseException:
                context.close()
                raise
            score = sum(k["delta"] for k in kinds.values())
            spent += context.measurer.runs - search.first_run
            evals += search.evals
            rows.append({"label": label, "onnx": str(context.onnx_path),
                         "table": str(tune.table), "baseline": baseline, "kinds": kinds,
                         "score": score, "chosen": False})
            if best is None or score < best[0]:
                if best is not None:
                    best[1].close()
                best = (score, context, search, len(rows) - 1)
            else:
                context.close()
    except BaseException:
        if best is not None:
            best[1].close()
        raise
    assert best is not None
    _, context, search, index = best
    rows[index]["chosen"] = True
    search.prior_runs = spent - (context.measurer.runs - search.first_run)
    search.prior_evals = evals - search.evals
    return context, search, rows
