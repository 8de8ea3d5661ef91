"""Sensitivity ranking and autotune on the tiny Llama with a fragile block."""

from __future__ import annotations

import json

import pytest

from quantkit.errors import QuantkitError
from quantkit.plan import PlanRecipe, Precision
from quantkit.tune.autotune import autotune
from quantkit.tune.budget import AutotuneSettings, Budget
from quantkit.tune.sensitivity import SensitivityResult, run_sensitivity
from tests.tune.conftest import FRAGILE_GROUP


def test_budget_parse() -> None:
    assert Budget.parse("1%") == Budget(1.0, True)
    assert Budget.parse("0.3") == Budget(0.3, False)
    assert Budget.parse("1%").limit(20.0) == pytest.approx(20.2)
    assert Budget.parse("0.5").limit(20.0, share=0.5) == pytest.approx(20.25)
    with pytest.raises(QuantkitError, match="perplexity budget"):
        Budget.parse("one percent")


def test_sensitivity_ranks_the_fragile_block_first(tune_settings, tmp_path) -> None:
    result = run_sensitivity(tune_settings, tmp_path / "sens")
    assert result.groups[0].name == FRAGILE_GROUP
    assert result.groups[0].delta > 3 * max(g.delta for g in result.groups[1:])
    assert result.groups[0].delta > 0
    assert len(result.groups) == 13 and result.runs == 14  # baseline + one per group
    again = SensitivityResult.load(tmp_path / "sens")
    assert again.ranking() == result.ranking() and again.baseline == result.baseline
    # measurements are cached by their inputs: a second run costs no model run
    rerun = run_sensitivity(tune_settings, tmp_path / "sens2")
    assert rerun.runs == 0 and rerun.ranking() == result.ranking()
    with pytest.raises(QuantkitError, match="already exists"):
        run_sensitivity(tune_settings, tmp_path / "sens")


def test_autotune_meets_the_budget_and_its_plan_round_trips(tune_settings, tmp_path) -> None:
    from quantkit.build import build_engine
    from quantkit.calib.table import CalibrationTable

    out = tmp_path / "tuned"
    settings = AutotuneSettings(budget=Budget.parse("1%"), max_evals=60)
    result = autotune(tune_settings, settings, out)
    assert result.met_on_holdout is True
    assert result.holdout_perplexity <= result.limits["holdout"]
    assert result.search_perplexity <= result.limits["search"]
    # the fragile group's MinMax range is broken by its outlier channel: the method search
    # gives its input another method's range, or the plan keeps it out of INT8
    fragile_input = "/model/layers.1/mlp/Mul_output_0"
    assert FRAGILE_GROUP not in result.int8_groups or result.methods.get(fragile_input) not in (
        None, "minmax")
    assert result.int8_groups and 0.5 < result.coverage <= 1.0
    engine = result.engine
    assert engine is not None and engine["within_budget"]
    assert engine["perplexity"] == pytest.approx(result.holdout_perplexity, rel=1e-3)
    assert {s.stage for s in result.path} >= {"method", "kinds", "bisect", "holdout", "verify"}
    for name in ("plan.yaml", "table.json", "autotune.json", "autotune.md", "sensitivity.json",
                 "manifest.json", "engine/manifest.json"):
        assert (out / name).is_file(), name
    table = CalibrationTable.load(out / "table.json")
    assert table.params.get("per_tensor_method", {}) == result.methods
    # the recipe builds the same engine again with 'quantkit build --plan'
    recipe = PlanRecipe.load(out / "plan.yaml")
    assert all(r.precision == Precision.FP32 for r in recipe.rules)
    precision = engine["precision"]
    rebuilt = build_engine(tmp_path / "rebuilt", precision=precision, onnx=tune_settings.onnx,
                           table=table, plan=recipe if precision == "mixed" else None)
    built = json.loads((out / "engine" / "manifest.json").read_text())
    assert rebuilt.manifest["int8_coverage"] == pytest.approx(built["int8_coverage"])
    assert rebuilt.manifest["as_built_counts"] == built["as_built_counts"]
    # reproducible: the same inputs give the same plan (from the measurement cache, no runs)
    again = autotune(tune_settings, settings, tmp_path / "again")
    assert again.int8_groups == result.int8_groups and again.model_runs == 0


def test_without_the_method_search_the_fragile_group_stays_fp32(tune_settings, tmp_path) -> None:
    settings = AutotuneSettings(budget=Budget.parse("1%"), methods=("minmax",), max_evals=40,
                                build=False)
    result = autotune(tune_settings, settings, tmp_path / "tuned")
    assert FRAGILE_GROUP in result.fp32_groups and not result.methods
    assert result.met_on_holdout is True and result.engine is None
    assert not (tmp_path / "tuned" / "engine").exists()
    recipe = PlanRecipe.load(tmp_path / "tuned" / "plan.yaml")
    assert "/model/layers.1/mlp/down_proj/MatMul" in {r.node for r in recipe.rules}


def test_autotune_bad_input(tune_settings, tmp_path) -> None:
    from dataclasses import replace

    with pytest.raises(QuantkitError, match="unknown objective"):
        autotune(tune_settings, AutotuneSettings(objective="speed"), tmp_path / "x")
    with pytest.raises(QuantkitError, match="unknown calibration method"):
        autotune(tune_settings, AutotuneSettings(methods=("entropy", "kl")), tmp_path / "x")
    with pytest.raises(QuantkitError, match="window"):
        autotune(replace(tune_settings, search_windows=5000), AutotuneSettings(),
                 tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_latency_objective_times_feasible_plans(tune_settings, tmp_path) -> None:
    settings = AutotuneSettings(budget=Budget.parse("1%"), objective="latency", max_evals=30,
                                methods=("minmax",), latency_candidates=2, latency_iterations=2)
    result = autotune(tune_settings, settings, tmp_path / "tuned")
    timed = [c for c in result.latency if c.get("p50_ms") is not None]
    assert 1 <= len(timed) <= 2 and all(c["p50_ms"] > 0 for c in timed)
    fastest = min(timed, key=lambda c: c["p50_ms"])
    assert len(result.int8_groups) == fastest["int8_groups"]
    assert result.engine is not None and result.engine["within_budget"]
    assert not (tmp_path / "tuned" / "latency-candidate").exists()


def test_max_evals_bounds_the_search_not_the_sensitivity_pass(tune_settings, tmp_path) -> None:
    """Sensitivity needs one run per group (12 here); max_evals=10 still leaves the search its
    own 10 runs."""
    settings = AutotuneSettings(budget=Budget.parse("1%"), max_evals=10, methods=("minmax",),
                                build=False)
    result = autotune(tune_settings, settings, tmp_path / "tuned")
    searched = [s for s in result.path if s.stage in ("method", "kinds", "bisect", "greedy")
                and not s.cached]
    assert len(searched) >= 3
    assert result.model_runs <= 12 + 10 + 2  # sensitivity + search + held-out baseline/check
    # the bound counts measurements, not fresh runs: from the cache the search stops where it
    # stopped before and gives the same plan
    again = autotune(tune_settings, settings, tmp_path / "again")
    assert again.model_runs == 0
    assert again.int8_groups == result.int8_groups
    assert [s.action for s in again.path] == [s.action for s in result.path]


def test_autotune_chooses_between_smoothquant_candidates(tune_settings, fragile_sq_calibration,
                                                         tmp_path) -> None:
    """Two calibrations of the same model: plain, and SmoothQuant with per-group alphas. The
    smoothed one holds block 1's outlier channel in its weights, so its op kinds cost less in
    INT8: it is chosen, tuned, and its engine is built from the smoothed export."""
    import dataclasses

    from quantkit.calib.run import calibration_onnx

    sq = dataclasses.replace(tune_settings, onnx=calibration_onnx(
        fragile_sq_calibration / "table.json"), table=fragile_sq_calibration / "table.json")
    assert sq.onnx == fragile_sq_calibration / "smoothed/model.onnx"
    settings = AutotuneSettings(budget=Budget.parse("1%"), methods=("minmax",), max_evals=40)
    out = tmp_path / "tuned"
    result = autotune(tune_settings, settings, out, alternatives=[sq])
    plain, smooth = result.candidates
    assert plain["label"] == "calib" and smooth["label"] == "SmoothQuant alpha auto"
    assert smooth["chosen"] and not plain["chosen"]
    assert smooth["score"] < plain["score"]
    # the same function in FP32: the baselines agree
    assert smooth["baseline"] == pytest.approx(plain["baseline"], rel=1e-4)
    assert set(plain["kinds"]) == {"qkv", "attn_scores", "attn_values", "attn_out", "mlp_in",
                                   "mlp_down", "lm_head"}
    assert result.onnx == str(sq.onnx)
    assert result.met_on_holdout is True and result.engine["within_budget"]
    engine = json.loads((out / "engine" / "manifest.json").read_text())
    assert engine["inputs"]["onnx"] == str(sq.onnx)
    labels = [s.action for s in result.path if s.stage == "method"]
    assert any(a.startswith("calib: ") for a in labels)
    assert any(a.startswith("SmoothQuant alpha auto: ") for a in labels)
    # the candidates' runs are charged to max_evals
    assert result.model_runs <= settings.max_evals + len(result.fp32_groups) + \
        len(result.int8_groups) + 2
    summary = (out / "autotune.md").read_text()
    assert "## Candidates" in summary and "**SmoothQuant alpha auto** (tuned)" in summary
    manifest = json.loads((out / "manifest.json").read_text())
    assert [c["table"] for c in manifest["inputs"]["candidates"]] == [
        str(tune_settings.table), str(sq.table)]
    from quantkit.report import build_report
    from tests.tune.test_report_tuning import RESULTS

    md = build_report([RESULTS], tmp_path / "report", tuning=out).markdown.read_text()
    assert "SmoothQuant alpha auto (tuned)" in md and str(sq.onnx) in md


class _ScriptedSearch:
    """The part of autotune's search that the held-out phase uses, over a perplexity that is
    a known function of the plan: each group adds its cost, separately per subset."""

    subset = "search"

    def __init__(self, costs: dict[str, dict[str, float]], runs: int = 50,
                 width: int = 1, greedy_runs: int = 16) -> None:
        from types import SimpleNamespace

        self.costs, self.runs_left, self.path = costs, runs, []
        self.settings = SimpleNamespace(greedy_runs=greedy_runs)
        self.context = SimpleNamespace(subsets={"search": None, "holdout": None})
        self.width = width  # measurements at once (Ray workers)
        self.prefetched: list[tuple[str, tuple[str, ...]]] = []  # what it was told to speculate
        self.measured: list[tuple[str, tuple[str, ...]]] = []

    def methods_for(self, groups):
        return {}

    def prefetch(self, subset, plans):
        self.prefetched += [(subset, tuple(p)) for p in plans]

    def measure(self, subset, groups, stage, action, limit):
        from quantkit.tune.budget import Step

        self.runs_left -= 1
        self.measured.append((subset, tuple(groups)))
        ppl = 10.0 + sum(self.costs[subset].get(g, 0.0) for g in groups)
        step = Step(stage, action, len(groups), 0.0, ppl, subset, ppl <= limit)
        self.path.append(step)
        return step


def test_holdout_miss_keeps_the_longest_prefix_that_meets_it_held_out() -> None:
    from quantkit.tune.search import holdout_phase

    order = ["kind1", "kind2", "g1", "g2", "g3"]
    # on the search subset everything fits; held out, g2 and g3 do not
    search = _ScriptedSearch({"search": {}, "holdout": {"g2": 0.15, "g3": 0.2}})
    search.measurer = _CachedMeasurer(search)
    plan, ppl, met = holdout_phase(search, ["g3", "kind1", "g1", "kind2", "g2"], order, 10.1)
    assert met and plan == ["kind1", "kind2", "g1"] and ppl == pytest.approx(10.0)
    assert all(s.stage == "holdout" for s in search.path)
    assert search.path[0].action == "5 groups on the held-out subset"
    # the plan, a bisection over 5 prefixes, then g3 (after g2, which broke the bound) alone
    assert len(search.path) <= 1 + 3 + 1
    assert search.path[-1].action == "+ g3" and not search.path[-1].within


def test_holdout_miss_keeps_the_groups_after_the_one_that_broke_the_bound() -> None:
    """One group that costs much held out (g1) ends the prefix; the groups after it that fit
    there are still taken, in chunks, and the plan kept meets the bound."""
    from quantkit.tune.search import holdout_phase

    order = ["kind1", "g0", "g1", *[f"h{i}" for i in range(8)]]
    costs = {"search": {}, "holdout": {"g1": 0.5, "h5": 0.2, "h1": 0.01, "h2": 0.01}}
    search = _ScriptedSearch(costs)
    search.measurer = _CachedMeasurer(search)
    plan, ppl, met = holdout_phase(search, list(reversed(order)), order, 10.1)
    assert met and plan[:2] == ["kind1", "g0"]
    assert set(plan) == set(order) - {"g1", "h5"} and ppl == pytest.approx(10.02)
    assert ppl <= 10.1 and all(s.stage == "holdout" for s in search.path)
    assert len(search.path) < 1 + 4 + 8  # chunks, not one measurement per group


@pytest.mark.parametrize("width", [2, 3, 7])
def test_workers_are_given_every_bisection_step_before_it_is_measured(width: int) -> None:
    """With ``width`` workers (Ray) the held-out bisection prefetches the plan and the prefixes
    its next log2(width + 1) steps may measure: each measurement it then makes was among them,
    and it decides as with one worker."""
    from quantkit.tune.search import holdout_phase

    costs = {"search": {}, "holdout": {"g2": 0.15, "g3": 0.2}}
    runs = {}
    for w in (1, width):
        search = _ScriptedSearch(costs, width=w)
        search.measurer = _CachedMeasurer(search)
        runs[w] = (holdout_phase(search, ["g3", "kind1", "g1", "kind2", "g2"],
                                 ["kind1", "kind2", "g1", "g2", "g3"], 10.1), search)
    assert runs[width][0] == runs[1][0] and runs[width][1].path == runs[1][1].path
    parallel = runs[width][1]
    assert set(parallel.measured) <= set(parallel.prefetched) and not runs[1][1].prefetched
    speculated = len(set(parallel.prefetched)) - len(parallel.measured)
    assert speculated >= (1 if width > 2 else 0)


def test_holdout_pass_keeps_the_plan() -> None:
    from quantkit.tune.search import holdout_phase

    search = _ScriptedSearch({"search": {}, "holdout": {"g1": 0.05}})
    plan, ppl, met = holdout_phase(search, ["g1", "k"], ["k", "g1"], 10.1)
    assert met and plan == ["k", "g1"] and ppl == pytest.approx(10.05)
    assert len(search.path) == 1


class _CachedMeasurer:
    """``measurer.measure`` over the scripted costs (what holdout_phase reads at the end)."""

    def __init__(self, search: _ScriptedSearch) -> None:
        self.search = search

    def measure(self, subset, groups, methods=None):
        from types import SimpleNamespace

        cost = sum(self.search.costs[subset].get(g, 0.0) for g in groups)
        return SimpleNamespace(perplexity=10.0 + cost)


class _ScriptedGreedy(_ScriptedSearch):
    """What the chunked greedy pass reads besides ``measure``."""

    def __init__(self, costs: dict[str, dict[str, float]], greedy_runs: int = 16) -> None:
        from types import SimpleNamespace

        super().__init__(costs)
        self.settings = SimpleNamespace(greedy_runs=greedy_runs)
        self.context = SimpleNamespace(subsets={"search": None})


def test_chunked_greedy_takes_fitting_chunks_whole_and_halves_the_others() -> None:
    """16 groups of which two do not fit: whole chunks go in, the two bad ones are isolated by
    halving, at far fewer measurements than one per group."""
    from quantkit.tune.search import chunked_greedy

    rest = [f"g{i}" for i in range(16)]
    search = _ScriptedGreedy({"search": {"g3": 0.5, "g12": 0.5}})
    plan = chunked_greedy(search, ["kind"], rest, 10.1)
    assert plan[0] == "kind" and set(plan[1:]) == set(rest) - {"g3", "g12"}
    assert len(search.path) < 16
    assert all(s.stage == "greedy" for s in search.path)
    # every accepted plan was within the limit
    assert 10.0 + sum(search.costs["search"].get(g, 0.0) for g in plan) <= 10.1


def test_chunked_greedy_stops_at_its_run_bound() -> None:
    from quantkit.tune.search import chunked_greedy

    rest = [f"g{i}" for i in range(16)]
    search = _ScriptedGreedy({"search": {g: 0.5 for g in rest}}, greedy_runs=3)
    assert chunked_greedy(search, [], rest, 10.1) == []
    assert len(search.path) == 3


def test_time_limit_stops_the_search_but_not_the_held_out_check(tune_settings, tmp_path) -> None:
    """A time limit already spent: no search measurement beyond the ones that start it, the
    held-out check and the verification still run, and the result says why."""
    settings = AutotuneSettings(budget=Budget.parse("1%"), methods=("minmax",), max_evals=40,
                                time_limit_s=1e-6)
    result = autotune(tune_settings, settings, tmp_path / "tuned")
    assert not [s for s in result.path if s.stage in ("method", "kinds", "greedy")]
    assert any("time limit" in n for n in result.notes)
    assert result.met_on_holdout is not None and result.engine is not None
    assert result.engine["within_budget"] == (result.engine["perplexity"]
                                              <= result.limits["holdout"])


def test_search_aims_below_the_budget(tune_settings, tmp_path) -> None:
    """The search target and the held-out target are the configured shares of the budget."""
    settings = AutotuneSettings(budget=Budget.parse("1%"), methods=("minmax",), max_evals=40,
                                build=False, search_share=0.5, holdout_share=0.75)
    result = autotune(tune_settings, settings, tmp_path / "tuned")
    assert result.limits["search"] == pytest.approx(result.baseline["search"] * 1.005)
    assert result.limits["holdout"] == pytest.approx(result.baseline["holdout"] * 1.0075)
    assert result.search_perplexity <= result.limits["search"]


def test_shares_outside_zero_to_one_are_refused() -> None:
    from quantkit.errors import QuantkitError

    with pytest.raises(QuantkitError, match="search-share"):
        AutotuneSettings(search_share=1.5).check()


def test_upper_bound_grows_with_the_spread_between_windows() -> None:
    """Two plans with the same perplexity: the one whose increase varies between windows gets
    the higher bound; with confidence 0 the bound is the measured perplexity."""
    import math
    from types import SimpleNamespace

    from quantkit.tune.measure import Measurement
    from quantkit.tune.search import _Search

    base = Measurement("holdout", (), (), math.exp(3.0), 0.0, 1, True, (3.0, 3.0, 3.0, 3.0))

    def plan(windows: tuple[float, ...]) -> Measurement:
        return Measurement("holdout", ("g",), (), math.exp(sum(windows) / 4), 0.0, 1, True,
                           windows)

    steady, spread = plan((3.01, 3.01, 3.01, 3.01)), plan((2.98, 3.04, 2.98, 3.04))
    fake = SimpleNamespace(settings=SimpleNamespace(confidence=0.9, search_confidence=0.0),
                           measurer=SimpleNamespace(measure=lambda subset, groups: base))
    assert _Search.upper_bound(fake, steady) == pytest.approx(steady.perplexity)
    bound = _Search.upper_bound(fake, spread)
    assert bound > spread.perplexity * 1.01  # sd 0.035 over 4 windows: more than +1 %
    fake.settings.confidence = 0.0
    assert _Search.upper_bound(fake, spread) == spread.perplexity
