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
   ``confidence`` bound (below): if the plan misses there, the longest prefix of it (in the
   order above: whole kinds first, the last-added groups last) that meets the bound on the
   held-out windows is found by bisection and kept.
6. ``objective=latency``: the feasible plans seen on the way are built and timed; the fastest
   one that meets the budget on the held-out subset wins.
7. **Verification**: the chosen plan is built as a real engine (ONNX Runtime backend) and its
   perplexity measured on the held-out subset; that number, not the probe's, is the result.

**Confidence**: a plan meets the budget on the held-out subset when the upper ``confidence``
bound of its perplexity does: the increase of each window's mean NLL over FP32's on the same
window gives a mean and a spread, and the bound is the mean plus t standard errors. Windows
differ a lot (measured on SmolLM2-135M: a plan at +1.35 % had a per-window standard deviation of
1.7 %), so a few windows cannot tell +0.5 % from +1.5 %: a point estimate at the edge of the
budget misses it on other text about half the time. The search's own checks are point
estimates by default (``search_confidence``: bounds on its 6 windows stopped SmolLM2's search
at 42 % coverage): it proposes, the held-out bound decides. ``search_share`` /
``holdout_share`` shrink the budget further where wanted. ``time_limit_s`` stops the search
(not the held-out check) when the time is spent.

Every step is recorded (``path`` in ``autotune.json``). ``max_evals`` bounds the measurements of
the search (all steps but the sensitivity pass), cached or not, so that a rerun from the cache
takes the same path; measurements are reproducible from the seed that chose the subsets.
With ``--ray`` (``quantkit.tune.ray_measure``) each step's independent measurements run side by
side as Ray tasks and the steps above decide from them exactly as they do one by one.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from quantkit.errors import QuantkitError
from quantkit.tune.context import DEFAULT_METHODS, TuneContext, TuneSettings, load_context
from quantkit.tune.sensitivity import SensitivityResult, measure_sensitivity

SCHEMA = "quantkit.autotune/1"
AUTOTUNE_NAME = "autotune.json"
PLAN_NAME = "plan.yaml"
TABLE_NAME = "table.json"
ENGINE_DIR = "engine"
SENSITIVITY_NAME = "sensitivity.json"
SUMMARY_NAME = "autotune.md"
OBJECTIVES = ("coverage", "latency")
HOLDOUT_RESERVE = 12  # model runs kept back from the greedy pass for the held-out phase


@dataclass(frozen=True)
class Budget:
    """Allowed perplexity increase over FP32: relative (``1%``) or absolute (``0.3``)."""

    value: float
    relative: bool

    @classmethod
    def parse(cls, text: str | float) -> Budget:
        raw = str(text).strip()
        match = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)\s*(%?)", raw)
        if match is None:
            raise QuantkitError(f"cannot read the perplexity budget '{raw}'",
                                "write a relative increase such as 1% or an absolute one "
                                "such as 0.3")
        return cls(float(match.group(1)), bool(match.group(2)))

    def limit(self, baseline: float, share: float = 1.0) -> float:
        allowed = baseline * self.value / 100.0 if self.relative else self.value
        return baseline + share * allowed

    def __str__(self) -> str:
        return f"{self.value:g}%" if self.relative else f"+{self.value:g} ppl"


@dataclass(frozen=True)
class AutotuneSettings:
    budget: Budget = Budget(1.0, True)
    objective: str = "coverage"
    max_evals: int = 120  # measurements of the search, cached or not (sensitivity not counted)
    methods: tuple[str, ...] = DEFAULT_METHODS
    method_groups: int = 6  # most sensitive groups whose tensors get the per-tensor search
    latency_candidates: int = 3
    latency_iterations: int = 5
    build: bool = True  # build and verify the engine
    confidence: float = 0.9  # one-sided confidence of the held-out checks (0: point estimates)
    search_confidence: float = 0.0  # ... of the search's checks (fast, noisy: point estimates)
    search_share: float = 1.0  # share of the budget the search aims at on the search windows
    holdout_share: float = 1.0  # share of the budget the plan must meet on held-out windows
    greedy_runs: int = 12  # measurements of the chunked greedy pass after the bisection
    time_limit_s: float | None = None  # the search stops when this is spent (None: no limit)
    reserve_windows: int = 0  # windows of work after the search, kept out of time_limit_s

    def check(self) -> None:
        if self.objective not in OBJECTIVES:
            raise QuantkitError(f"unknown objective '{self.objective}'",
                                f"use one of: {', '.join(OBJECTIVES)}")
        if self.max_evals < 1:
            raise QuantkitError("max-evals must be at least 1")
        for name in ("search_share", "holdout_share"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise QuantkitError(f"{name.replace('_', '-')} must be in (0, 1], not {value}",
                                    "it is the share of the budget a stage may use")
        for name in ("confidence", "search_confidence"):
            value = getattr(self, name)
            if not (value == 0.0 or 0.5 <= value < 1.0):
                raise QuantkitError(
                    f"{name.replace('_', '-')} must be in [0.5, 1) or 0, not {value}",
                    "0.9: a plan passes when its increase is within the budget with 90 % "
                    "confidence; 0 compares point estimates")
        if self.greedy_runs < 0:
            raise QuantkitError("greedy-runs must not be negative")
        if self.time_limit_s is not None and self.time_limit_s <= 0:
            raise QuantkitError(f"the search time limit must be positive, not "
                                f"{self.time_limit_s:g} s")
        if self.reserve_windows < 0:
            raise QuantkitError("reserve-windows must not be negative")
        from quantkit.calib.algorithms import available_algorithms

        unknown = [m for m in self.methods if m not in available_algorithms()]
        if unknown:
            raise QuantkitError(f"unknown calibration method(s): {', '.join(unknown)}",
                                f"use some of: {', '.join(available_algorithms())}")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["budget"] = str(self.budget)
        return out


@dataclass
class Step:
    stage: str  # method | bisect | greedy | holdout | tighten | latency | verify
    action: str
    int8_groups: int
    coverage: float
    perplexity: float
    subset: str
    within: bool
    cached: bool = False
    bound: float | None = None  # the upper confidence bound of the perplexity checked

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class AutotuneResult:
    settings: dict[str, Any]
    baseline: dict[str, float]  # subset -> FP32 perplexity
    limits: dict[str, float]  # subset -> perplexity allowed
    int8_groups: list[str]
    fp32_groups: list[str]
    methods: dict[str, str]  # tensor -> method where not the table's
    coverage: float  # MAC share at 1 x max_length, from the probe's groups
    search_perplexity: float
    holdout_perplexity: float | None
    met_on_holdout: bool | None
    path: list[Step] = field(default_factory=list)
    engine: dict[str, Any] | None = None  # verified engine: path, perplexity, coverage, met
    latency: list[dict[str, Any]] = field(default_factory=list)
    model_runs: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    onnx: str = ""  # the export the plan belongs to (build engines from it)
    candidates: list[dict[str, Any]] = field(default_factory=list)  # see choose_candidate
    # Ray (--ray): address, workers, tasks run, speculative measurements the search never read
    parallel: dict[str, Any] | None = None
    # (coverage, groups) of every plan the search found within the budget (not serialised)
    feasible: list[tuple[float, tuple[str, ...]]] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        del out["feasible"]
        out["schema"] = SCHEMA
        out["path"] = [s.to_dict() for s in self.path]
        return out


class _Search:
    """The search state: measured plans, their steps, the run budget."""

    def __init__(self, context: TuneContext, settings: AutotuneSettings,
                 on_step: Callable[[Step], None] | None) -> None:
        self.context = context
        self.settings = settings
        self.measurer = context.measurer
        self.on_step = on_step
        self.path: list[Step] = []
        self.methods: dict[str, str] = {}
        self.first_run = self.measurer.runs
        self.evals = 0  # measurements of the search, cached or not: what max_evals bounds
        self.prior_evals = 0  # the other candidates' (choose_candidate), charged here too
        self.prior_runs = 0  # their fresh model runs, for the record
        self.feasible: list[tuple[float, tuple[str, ...]]] = []  # (coverage, groups)
        self.subset = "search" if "search" in context.subsets else "rank"
        self.kinds: dict[str, dict[str, Any]] = {}  # step 1: kind -> best method, perplexity
        limit = settings.time_limit_s
        self.deadline = None if limit is None else time.perf_counter() + limit
        self.out_of_time = False  # the time limit stopped the search

    def time_is_up(self) -> bool:
        """Past the deadline, less the time the work after the search will take (its windows
        at the speed measured so far, plus one more search measurement)."""
        if self.deadline is None:
            return False
        per_window = self.measurer.window_seconds() or 0.0
        windows = self.settings.reserve_windows + len(
            self.context.subsets.get(self.subset, ())) // self.measurer.max_length
        if time.perf_counter() + per_window * windows > self.deadline:
            self.out_of_time = True
        return self.out_of_time

    @property
    def runs_left(self) -> int:
        if self.time_is_up():
            return 0
        return self.settings.max_evals - self.evals - self.prior_evals

    def upper_bound(self, result: Any) -> float:
        """The plan's perplexity at the upper ``confidence`` bound of its increase over FP32 on
        the same windows (mean of the per-window NLL increases plus t standard errors; windows
        are of equal length, so the mean alone gives back the measured perplexity)."""
        confidence = (self.settings.confidence if result.subset == "holdout"
                      else self.settings.search_confidence)
        base = self.measurer.measure(result.subset, ())
        deltas = [q - b for q, b in zip(result.window_nll, base.window_nll, strict=False)]
        if not confidence or len(deltas) < 2 or len(deltas) != len(base.window_nll):
            return float(result.perplexity)
        from statistics import NormalDist, stdev

        z = NormalDist().inv_cdf(confidence)
        dof = len(deltas) - 1
        t = z * (1.0 + (z * z + 1.0) / (4.0 * dof))  # Student's t, first-order correction
        return float(result.perplexity) * math.exp(t * stdev(deltas) / math.sqrt(len(deltas)))

    @property
    def width(self) -> int:
        """Measurements that run at once (Ray workers; 1 without)."""
        executor = self.measurer.executor
        return 1 if executor is None else int(executor.width)

    def prefetch(self, subset: str, plans: Sequence[Sequence[str]]) -> None:
        """Measure these plans side by side where there are workers (``quantkit.tune.
        ray_measure``); the search reads them from the cache when (and if) it gets to them."""
        if self.measurer.executor is not None:
            self.measurer.prefetch([(subset, p, self.methods_for(p)) for p in plans])

    def methods_for(self, groups: Sequence[str]) -> dict[str, str]:
        tensors = {t for g in groups for t in self.context.probe.group_tensors.get(g, ())}
        return {t: m for t, m in self.methods.items() if t in tensors}

    def measure(self, subset: str, groups: Sequence[str], stage: str, action: str,
                limit: float, methods: Mapping[str, str] | None = None) -> Step:
        chosen = tuple(groups)
        self.evals += 1
        result = self.measurer.measure(subset, chosen,
                                       self.methods_for(chosen) if methods is None else methods)
        bound = self.upper_bound(result)
        step = Step(stage, action, len(chosen), self.context.coverage(chosen), result.perplexity,
                    subset, bound <= limit, result.cached,
                    bound if bound != result.perplexity else None)
        self.path.append(step)
        if self.on_step is not None:
            self.on_step(step)
        if subset == self.subset and step.within and methods is None:
            self.feasible.append((step.coverage, chosen))
        return step


def efficiency_order(context: TuneContext, deltas: Mapping[str, float]) -> list[str]:
    """The groups of ``deltas`` by perplexity cost per MAC, cheapest first (ties: larger group
    first)."""
    def key(name: str) -> tuple[float, int]:
        macs = max(1, context.macs[name])
        return (deltas[name] / macs, -macs)

    return sorted((g.name for g in context.groups if g.name in deltas), key=key)


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


def seed_kinds(search: _Search, limit: float) -> list[str]:
    """Step 2: whole op kinds first. Kinds by measured cost per MAC (step 1: every group of the
    kind in INT8 at once), each added if the plan with all kinds taken so far stays within the
    budget on the search subset. Per-group sensitivities on a few windows are noisy at the 1 %
    scale; a kind's cost is measured directly, on more text, in one run."""
    context = search.context
    macs = {kind: 0 for kind in search.kinds}
    for g in context.groups:
        if g.kind in macs:
            macs[g.kind] += context.macs[g.name]
    order = sorted(search.kinds, key=lambda k: search.kinds[k]["delta"] / max(1, macs[k]))
    chosen: list[str] = []
    members = {k: [g.name for g in context.groups if g.kind == k] for k in order}
    for i, kind in enumerate(order):
        if search.runs_left <= 0:
            break
        # speculation: the next trials as if each kind fit whole (the cheap ones usually do)
        search.prefetch(search.subset, [[*chosen, *(g for k in order[i:j] for g in members[k])]
                                        for j in range(i + 1, i + 1 + search.width)])
        trial = [*chosen, *members[kind]]
        if search.measure(search.subset, trial, "kinds", f"+ all {kind}", limit).within:
            chosen = trial
    return chosen


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


def longest_prefix(search: _Search, order: Sequence[str], feasible: int, stage: str,
                   limit: float) -> list[str]:
    """Bisection for the longest prefix of ``order`` within ``limit`` on the search subset,
    given that the first ``feasible`` groups are within it and the whole ``order`` is not."""
    from quantkit.tune.ray_measure import speculate_bisection

    lo, hi = feasible, len(order)  # prefix lo is within the budget, prefix hi is not
    while hi - lo > 1 and search.runs_left > 0:
        speculate_bisection(search, search.subset, order, lo, hi)
        mid = (lo + hi) // 2
        if search.measure(search.subset, order[:mid], stage, f"first {mid} groups",
                          limit).within:
            lo = mid
        else:
            hi = mid
    return list(order[:lo])


def bisect_and_greedy(search: _Search, order: list[str], limit: float,
                      feasible: int = 0) -> tuple[list[str], list[str]]:
    """Steps 4: the longest feasible prefix of ``order`` (the first ``feasible`` groups are
    known to be within the budget), then the rest in chunks (``chunked_greedy``). Returns the
    plan and the prefix the greedy pass started from."""
    from quantkit.tune.ray_measure import speculate_bisection

    n = len(order)
    speculate_bisection(search, search.subset, order, feasible, n, whole=True)
    if search.measure(search.subset, order, "bisect", f"all {n} groups", limit).within:
        return list(order), list(order)
    prefix = longest_prefix(search, order, feasible, "bisect", limit)
    # the group right after the prefix is the one the bisection found over the target
    rest = list(order[len(prefix) + 1:])
    return chunked_greedy(search, prefix, rest, limit), prefix


def chunked_greedy(search: _Search, chosen: list[str], rest: list[str],
                   limit: float) -> list[str]:
    """Add ``rest`` (in order) to ``chosen`` chunk by chunk: a chunk that keeps the plan within
    ``limit`` on the search subset is taken whole; one that does not is halved, first half
    first (when the first half is taken, the second is known to fail: it is halved without a
    measurement); a lone group that does not fit stays FP32. A few groups that do not fit among
    many that do cost about 2 log2(n) measurements each, not one per group; at most
    ``greedy_runs`` measurements (and runs are kept back for the held-out phase)."""
    reserve = HOLDOUT_RESERVE if "holdout" in search.context.subsets else 0
    # (chunk, state): "test" to measure; "sibling" the second half of a failed chunk, which
    # fails for sure once its first half is taken (chosen + both halves was measured); "fails"
    pending: list[tuple[list[str], str]] = [(rest, "test")] if rest else []
    runs = 0
    while pending and runs < search.settings.greedy_runs and search.runs_left > reserve:
        chunk, state = pending.pop(0)
        if state != "fails":
            label = (f"+ {chunk[0]}" if len(chunk) == 1
                     else f"+ {len(chunk)} groups ({chunk[0]} ...)")
            runs += 1
            if search.width > 1 and len(chunk) > 1:  # its first half is next if it fails
                search.prefetch(search.subset, [[*chosen, *chunk],
                                                [*chosen, *chunk[:(len(chunk) + 1) // 2]]])
            taken = search.measure(search.subset, [*chosen, *chunk], "greedy", label,
                                   limit).within
            if pending and pending[0][1] == "sibling":
                pending[0] = (pending[0][0], "fails" if taken else "test")
            if taken:
                chosen = [*chosen, *chunk]
                continue
        if len(chunk) > 1:
            half = (len(chunk) + 1) // 2
            pending[:0] = [(chunk[:half], "test"), (chunk[half:], "sibling")]
    return chosen


def holdout_phase(search: _Search, chosen: list[str], order: list[str], limit: float,
                  ) -> tuple[list[str], float, bool]:
    """Step 5: the plan on the held-out subset, at the upper confidence bound; on a miss, the
    longest prefix of the plan (groups in ``order``: whole kinds first, the last-added groups
    last) that meets it there, by bisection on the held-out windows themselves (the search
    windows already said yes to all of them). Returns the plan, its held-out perplexity, and
    whether it is met (the empty plan, FP32, always is)."""
    rank = {name: i for i, name in enumerate(order)}
    current = sorted(chosen, key=lambda g: rank.get(g, len(rank)))

    def check(plan: list[str], why: str = "") -> Step:
        return search.measure("holdout", plan, "holdout",
                              f"{len(plan)} groups on the held-out subset{why}", limit)

    from quantkit.tune.ray_measure import speculate_bisection

    speculate_bisection(search, "holdout", current, 0, len(current), whole=True)
    step = check(current)
    if step.within:
        return current, step.perplexity, True
    lo, hi = 0, len(current)  # the first lo groups meet the bound (none: FP32), hi do not
    while hi - lo > 1 and search.runs_left > 0:
        speculate_bisection(search, "holdout", current, lo, hi)
        mid = (lo + hi) // 2
        if check(current[:mid], " (a shorter plan)").within:
            lo = mid
        else:
            hi = mid
    plan = current[:lo]
    ppl = search.measurer.measure("holdout", tuple(plan), search.methods_for(plan)).perplexity
    return plan, ppl, True


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


def summary_markdown(result: AutotuneResult, context: TuneContext) -> str:
    """autotune.md: the outcome and the path the search took."""
    base_s = result.baseline["search"]
    lines = ["# quantkit autotune", "",
             f"Budget: {result.settings['budget']} over FP32 perplexity; objective "
             f"{result.settings['objective']}.", "",
             "| subset | FP32 ppl | allowed | plan ppl |", "| --- | --- | --- | --- |",
             f"| search | {base_s:.4f} | {result.limits['search']:.4f} | "
             f"{result.search_perplexity:.4f} |"]
    if result.holdout_perplexity is not None:
        lines.append(f"| holdout | {result.baseline['holdout']:.4f} | "
                     f"{result.limits['holdout']:.4f} | {result.holdout_perplexity:.4f} |")
    lines += ["", f"INT8 groups: {len(result.int8_groups)} of {len(context.groups)}; INT8 "
                  f"coverage {100 * result.coverage:.1f}% of linear-layer MACs."]
    if result.engine is not None:
        e = result.engine
        lines.append(f"Verified engine ({e['precision']}, {e['subset']} subset): perplexity "
                     f"{e['perplexity']:.4f} vs FP32 {e['baseline']:.4f} "
                     f"({e['delta_pct']:+.2f}%), {'within' if e['within_budget'] else 'OVER'} "
                     "the budget.")
    if result.candidates:
        kinds = list(dict.fromkeys(k for c in result.candidates for k in c["kinds"]))
        lines += ["", "## Candidates", "",
                  "Each op kind wholly INT8 with its best calibration method, on the rank "
                  "subset; the lowest sum of perplexity increases was tuned.", "",
                  "| candidate | FP32 ppl | " + " | ".join(kinds) + " | sum of increases |",
                  "| --- | --- | " + " | ".join("---" for _ in kinds) + " | --- |"]
        for c in result.candidates:
            cells = [f"{c['kinds'][k]['perplexity']:.3f} ({c['kinds'][k]['method']})"
                     if k in c["kinds"] else "—" for k in kinds]
            name = f"**{c['label']}** (tuned)" if c["chosen"] else c["label"]
            lines.append(f"| {name} | {c['baseline']:.3f} | " + " | ".join(cells)
                         + f" | {c['score']:+.3f} |")
        lines += ["", f"Build engines of this plan from `{result.onnx}`.", ""]
    if result.methods:
        counts: dict[str, int] = {}
        for method in result.methods.values():
            counts[method] = counts.get(method, 0) + 1
        lines.append("Calibration method changed for " + ", ".join(
            f"{n} tensor(s) to {m}" for m, n in sorted(counts.items())) + ".")
    if result.fp32_groups:
        lines += ["", "Kept in FP32: " + ", ".join(result.fp32_groups)]
    confidence = result.settings.get("confidence")
    lines += ["", "## Search path", "",
              f"'bound': the upper {100 * confidence:.0f} % confidence bound of the plan's "
              "perplexity from the spread between windows, what the budget is checked "
              "against." if confidence else "", "",
              "| # | stage | action | INT8 groups | coverage | subset | ppl | bound | within |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for i, s in enumerate(result.path, 1):
        bound = f"{s.bound:.4f}" if s.bound is not None else "—"
        lines.append(f"| {i} | {s.stage} | {s.action} | {s.int8_groups} | "
                     f"{100 * s.coverage:.1f}% | {s.subset} | {s.perplexity:.4f} | {bound} | "
                     f"{'—' if s.stage == 'method' else 'yes' if s.within else 'no'} |")
    for note in result.notes:
        lines += ["", f"Note: {note}"]
    return "\n".join(lines) + "\n"
