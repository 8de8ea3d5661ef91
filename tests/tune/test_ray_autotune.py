"""Autotune's measurements side by side (``--ray``): the same plan as the serial search, bit for
bit, whatever the finish order; a killed worker loses only its task; a rerun runs nothing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from quantkit.cli.main import cli
from quantkit.ray_tasks import KILL_ENV
from quantkit.tune.ray_measure import bisection_points, levels

VOLATILE = ("seconds", "parallel")  # wall time, and how the measurements ran
# budgets so tight that the tiny model's search takes most paths: with every method, the kind
# and per-tensor method searches; with MinMax alone (whose MLP down projections cost +2.5 %, far
# over any budget here), a sensitivity pass, the bisection and the held-out bisection. Which
# further steps run rests on differences of about 0.01 % that the CPU's kernels decide: on an
# AVX2 CPU the bisection stopped early and the greedy chunks ran; on AVX-512 VNNI (Xeon, family
# 6 model 106) 12 of 13 groups fit, the 13th failed and no group was left for a greedy chunk,
# and every kind fit whole with every method (no sensitivity pass). The assertions below ask
# only for the steps both kinds of CPU take; the greedy pass has its own tests (test_autotune).
SEARCHES = {"methods": ("0.003%", "entropy,percentile,mse,minmax"),
            "bisection": ("0.01%", "minmax")}


def _cli_args(fragile_export, fragile_calibration, cache: Path, out: Path,
              search: str) -> list[str]:
    budget, methods = SEARCHES[search]
    return ["autotune", "--onnx", str(fragile_export.onnx_path.parent),
            "--table", str(fragile_calibration / "table.json"), "--dataset", "sample",
            "--split", "test", "--max-length", "64", "--search-windows", "3",
            "--holdout-windows", "3", "--batch-size", "3", "--threads", "1",
            "--max-evals", "40", "--max-ppl-increase", budget, "--methods", methods,
            "--no-build", "--cache-dir", str(cache), "--out", str(out)]


def _outputs(out: Path) -> dict[str, Any]:
    """Everything autotune wrote, less what differs between any two runs (time) and what says
    how they ran."""
    tuned = json.loads((out / "autotune.json").read_text())
    sens = json.loads((out / "sensitivity.json").read_text())
    for key in VOLATILE:
        tuned.pop(key, None)
    sens.pop("seconds")
    sens["inputs"]["settings"].pop("cache_dir")
    return {"plan": (out / "plan.yaml").read_bytes(), "table": (out / "table.json").read_bytes(),
            "autotune": tuned, "sensitivity": sens}


def _decisions(out: Path) -> dict[str, Any]:
    """``_outputs`` less what a rerun from the cache changes: which measurements ran."""
    data = _outputs(out)
    for step in data["autotune"]["path"]:
        step.pop("cached")
    data["autotune"].pop("model_runs")
    data["sensitivity"].pop("model_runs")
    return data


@pytest.fixture(scope="module")
def serial(fragile_export, fragile_calibration, tmp_path_factory) -> Any:
    """The serial run's output folder of a search of SEARCHES (each run once)."""
    done: dict[str, Path] = {}

    def run(search: str) -> Path:
        if search not in done:
            root = tmp_path_factory.mktemp(f"serial-{search}")
            result = CliRunner().invoke(cli, _cli_args(fragile_export, fragile_calibration,
                                                       root / "cache", root / "out", search))
            assert result.exit_code == 0, result.output
            assert "Ray" not in result.output
            done[search] = root / "out"
        return done[search]

    return run


def test_bisection_points_are_the_next_steps_of_the_bisection() -> None:
    assert [levels(w) for w in (1, 2, 3, 6, 7, 15)] == [1, 1, 2, 2, 3, 4]
    assert bisection_points(0, 8, 1) == [4]
    assert bisection_points(0, 8, 2) == [4, 2, 6]
    assert bisection_points(3, 5, 3) == [4]  # a short span has fewer steps left
    assert bisection_points(3, 4, 2) == []


class _Reversed:
    """An executor that runs every request of a batch here and hands the results back last
    first: the decisions must not depend on the order in which measurements finish."""

    width = 3

    def __init__(self, measurer: Any) -> None:
        self.measurer = measurer
        self.submitted = 0

    def run(self, requests, stop=None):
        from quantkit.tune.measure import score

        m = self.measurer
        results = [score(m.probe, m.subsets[s], m.max_length, m.batch_size, g, a)
                   for s, g, a in requests]
        self.submitted += len(requests)
        yield from reversed(list(enumerate(results)))


@pytest.mark.parametrize("search", sorted(SEARCHES))
def test_out_of_order_side_by_side_measurements_give_the_serial_search(search, tune_settings,
                                                                        tmp_path) -> None:
    """Without Ray: three at a time (two bisection steps per batch), finishing in reverse."""
    from dataclasses import replace

    from quantkit.tune.autotune import run_search
    from quantkit.tune.budget import AutotuneSettings, Budget
    from quantkit.tune.context import load_context

    budget, methods = SEARCHES[search]
    settings = AutotuneSettings(budget=Budget.parse(budget), max_evals=40, build=False,
                                methods=tuple(methods.split(",")))
    runs = {}
    for name, executor in (("serial", None), ("parallel", _Reversed)):
        tune = replace(tune_settings, cache_dir=tmp_path / name)
        context = load_context(tune, settings.methods)
        try:
            if executor is not None:
                context.measurer.executor = executor(context.measurer)
            result, sensitivity = run_search(context, settings)
        finally:
            context.close()
        data = result.to_dict()
        data.pop("seconds")
        runs[name] = (data, [g.to_dict() for g in sensitivity.groups], sensitivity.runs,
                      context.measurer)
    serial, parallel = runs["serial"], runs["parallel"]
    assert parallel[:3] == serial[:3]
    assert parallel[0]["model_runs"] == serial[0]["model_runs"] > 0
    speculated = parallel[3].executor.submitted
    # a superset of the serial measurements, each executed once: the extra ones are unread
    assert speculated == serial[3].executed + parallel[3].unread
    assert parallel[3].executed == speculated and parallel[3].unread > 0


def test_a_speculative_measurement_that_fails_only_fails_the_search_that_reads_it() -> None:
    """A plan measured ahead (speculation) whose measurement raises must not stop a search
    that never asks for it; asking for it raises that error."""
    import numpy as np

    from quantkit.errors import QuantkitError
    from quantkit.tune.measure import Measurer

    class Failing:
        width = 2

        def __init__(self) -> None:
            self.calls: list[list[tuple[str, ...]]] = []

        def run(self, requests, stop=None):
            self.calls.append([groups for _, groups, _ in requests])
            for i, (_, groups, _) in enumerate(requests):
                yield i, (QuantkitError("a non-finite perplexity") if groups == ("bad",) else
                          {"perplexity": 2.0, "nll_sum": 0.0, "num_scored_tokens": 3,
                           "window_nll": [0.7], "seconds": 0.0, "windows": 1})

    measurer = Measurer(None, {"s": np.zeros(4, np.int64)}, 4, 1, {"minmax": {}}, None, {})
    measurer.executor = executor = Failing()
    assert measurer.prefetch([("s", ["good"], None), ("s", ["bad"], None)]) == 1
    assert measurer.measure("s", ["good"]).perplexity == 2.0
    with pytest.raises(QuantkitError, match="non-finite"):
        measurer.measure("s", ["bad"])
    assert executor.calls == [[("good",), ("bad",)], [("bad",)]]  # asked for: measured again


def test_ray_without_ray_installed_is_one_clear_error(fragile_export, fragile_calibration,
                                                      tmp_path, without_ray) -> None:
    out = tmp_path / "out"
    args = _cli_args(fragile_export, fragile_calibration, tmp_path / "cache", out, "methods")
    for command in (args + ["--ray", "local"],
                    ["quantize", "--onnx", str(fragile_export.onnx_path.parent), "--dataset",
                     "sample", "--ray", "auto", "--out", str(out)]):
        result = CliRunner().invoke(cli, command)
        assert result.exit_code == 2, result.output
        assert "pip install 'quantkit[ray]'" in result.output
        assert len(result.output.strip().splitlines()) == 1
        assert not out.exists() and not (tmp_path / "cache").exists()


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray of two CPUs for the module (started as ``--ray local`` starts it)."""
    ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install "
                                            "'quantkit[ray]'")
    from quantkit.ray_tasks import ray_session

    with ray_session(ray, "local", {"num_cpus": 2, "include_dashboard": False,
                                    "log_to_driver": False}):
        yield ray


def test_ray_gives_the_serial_plan_and_a_rerun_runs_nothing(serial, ray_local, fragile_export,
                                                            fragile_calibration,
                                                            tmp_path) -> None:
    cache, out = tmp_path / "cache", tmp_path / "out"
    result = CliRunner().invoke(cli, _cli_args(fragile_export, fragile_calibration, cache, out,
                                               "methods") + ["--ray", "local"])
    assert result.exit_code == 0, result.output
    assert _outputs(out) == _outputs(serial("methods"))
    path = json.loads((out / "autotune.json").read_text())["path"]
    assert {"method", "kinds", "bisect", "holdout"} <= {s["stage"] for s in path}
    ran = json.loads((out / "autotune.json").read_text())["parallel"]
    assert ran["workers"] == 2 and ran["tasks"] > 0
    assert "Ray (local): " in result.output
    # the cache, written by the driver, has every measurement: a rerun submits no task
    again = CliRunner().invoke(cli, _cli_args(fragile_export, fragile_calibration, cache,
                                              tmp_path / "again", "methods")
                               + ["--ray", "local"])
    assert again.exit_code == 0, again.output
    assert _decisions(tmp_path / "again") == _decisions(serial("methods"))
    rerun = json.loads((tmp_path / "again" / "autotune.json").read_text())
    assert rerun["parallel"]["tasks"] == 0 and rerun["model_runs"] == 0


def test_a_killed_worker_loses_only_its_task(serial, ray_local, fragile_export,
                                             fragile_calibration, tmp_path,
                                             monkeypatch) -> None:
    marker = tmp_path / "killed"
    monkeypatch.setenv(KILL_ENV, str(marker))
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, _cli_args(fragile_export, fragile_calibration,
                                               tmp_path / "cache", out, "bisection")
                                + ["--ray", "local"])
    assert result.exit_code == 0, result.output
    assert marker.is_file()  # a worker process died in the middle of a measurement ...
    # ... and Ray's retry of it gave the same plan
    assert _outputs(out) == _outputs(serial("bisection"))
    path = json.loads((out / "autotune.json").read_text())["path"]
    assert {"kinds", "bisect", "holdout"} <= {s["stage"] for s in path}
    assert json.loads((out / "sensitivity.json").read_text())["groups"]


def test_quantize_with_ray_gives_the_serial_plan(ray_local, fragile_export, tmp_path) -> None:
    """``quantize(ray=...)`` (``--ray``, ``ray:`` in a recipe) runs its autotune step on Ray."""
    import quantkit

    settings = dict(max_length=64, num_samples=16, seq_len=64, search_windows=3,
                    holdout_windows=3, max_evals=40, eval_tokens=1280, threads=1,
                    latency_iterations=2, max_ppl_increase="0.5%")
    results = {name: quantkit.quantize(onnx=fragile_export.onnx_path.parent, dataset="sample",
                                       out=tmp_path / name, say=lambda _: None, ray=ray,
                                       **settings)
               for name, ray in (("serial", None), ("ray", "local"))}
    tuned = {name: json.loads((tmp_path / name / "autotune" / "autotune.json").read_text())
             for name in results}
    assert tuned["serial"]["parallel"] is None and tuned["ray"]["parallel"]["tasks"] > 0
    assert (tmp_path / "ray" / "autotune" / "plan.yaml").read_bytes() == \
        (tmp_path / "serial" / "autotune" / "plan.yaml").read_bytes()
    for key in ("int8_groups", "methods", "path", "model_runs"):
        assert tuned["ray"][key] == tuned["serial"][key], key
    assert results["ray"].perplexity["quantized"] == results["serial"].perplexity["quantized"]


def test_max_retries_0_gives_up_on_a_killed_worker(ray_local, fragile_export,
                                                   fragile_calibration, tmp_path,
                                                   monkeypatch) -> None:
    """``--max-retries`` reaches Ray: with 0 the killed worker's task is not retried and the
    search stops with one error saying a rerun reuses what finished."""
    marker = tmp_path / "killed"
    monkeypatch.setenv(KILL_ENV, str(marker))
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, _cli_args(fragile_export, fragile_calibration,
                                               tmp_path / "cache", out, "bisection")
                                + ["--ray", "local", "--max-retries", "0"])
    assert marker.is_file()
    assert result.exit_code == 2, result.output
    assert "Ray worker died and its retries are spent" in result.output
    assert "every finished measurement is reused" in result.output
    assert not out.exists()


def test_quantize_hands_max_retries_to_autotune(fragile_export, tmp_path,
                                                monkeypatch) -> None:
    """``quantkit quantize --max-retries`` (and ``max_retries:`` in a recipe's quantize section)
    reach autotune's Ray tasks."""
    import quantkit.tune.autotune
    from quantkit.errors import QuantkitError
    from quantkit.quantize_config import QuantizeConfig

    seen: dict[str, Any] = {}

    def autotune(*args: Any, **kwargs: Any) -> None:
        seen.update(kwargs)
        raise QuantkitError("stopped by the test")

    monkeypatch.setattr(quantkit.tune.autotune, "autotune", autotune)
    result = CliRunner().invoke(cli, [
        "quantize", "--onnx", str(fragile_export.onnx_path.parent), "--dataset", "sample",
        "--max-length", "64", "--num-samples", "8", "--seq-len", "64", "--ray", "local",
        "--max-retries", "5", "--out", str(tmp_path / "out")])
    assert "stopped by the test" in result.output, result.output
    assert (seen["ray_address"], seen["max_retries"]) == ("local", 5)
    recipe = QuantizeConfig.from_recipe("m", {"dataset": "sample", "max_retries": 0})
    assert recipe.max_retries == 0
    with pytest.raises(QuantkitError, match="max-retries must not be negative"):
        QuantizeConfig.from_recipe("m", {"dataset": "sample", "max_retries": -1}).check()
    bad = CliRunner().invoke(cli, ["autotune", "--max-retries", "-1"])
    assert bad.exit_code == 2 and "--max-retries" in bad.output
