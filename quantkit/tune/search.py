"""The search over precision plans on the probe: its state (``_Search``: measured plans, their
steps, the run and time budget, the confidence bound), whole op kinds first, the order of the
other groups, bisection and the chunked greedy pass, and the held-out phase (steps 2, 4 and 5
of ``quantkit.tune.autotune``).

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
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from quantkit.tune.budget import AutotuneSettings, Step
from quantkit.tune.context import TuneContext

HOLDOUT_RESERVE = 12  # model runs kept back from the greedy pass for the held-out phase


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
                   limit: float, subset: str | None = None, stage: str = "greedy") -> list[str]:
    """Add ``rest`` (in order) to ``chosen`` chunk by chunk: a chunk that keeps the plan within
    ``limit`` on ``subset`` (default: the search subset) is taken whole; one that does not is
    halved, first half first (when the first half is taken, the second is known to fail: it is
    halved without a measurement); a lone group that does not fit stays FP32. A few groups that
    do not fit among many that do cost about 2 log2(n) measurements each, not one per group; at
    most ``greedy_runs`` measurements (and on the search subset, runs are kept back for the
    held-out phase)."""
    subset = subset or search.subset
    reserve = (HOLDOUT_RESERVE if subset == search.subset and "holdout" in search.context.subsets
               else 0)
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
            if search.width > 1:  # the chunk, and its first half: next if it fails
                search.prefetch(subset, [[*chosen, *chunk]] + (
                    [[*chosen, *chunk[:(len(chunk) + 1) // 2]]] if len(chunk) > 1 else []))
            taken = search.measure(subset, [*chosen, *chunk], stage, label, limit).within
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
    windows already said yes to all of them), then the groups after the one that broke the
    bound, in chunks (``chunked_greedy`` on the held-out windows: every plan it keeps meets the
    bound there). Returns the plan, its held-out perplexity, and whether it is met (the empty
    plan, FP32, always is)."""
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
    if lo < len(current) - 1:
        # current[lo] broke the bound; the groups after it were never tried without it: one
        # group that costs much on these windows must not take all later groups out
        plan = chunked_greedy(search, plan, current[lo + 1:], limit, "holdout", "holdout")
    ppl = search.measurer.measure("holdout", tuple(plan), search.methods_for(plan)).perplexity
    return plan, ppl, True
