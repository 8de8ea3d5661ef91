"""`quantkit sweep`: tiny recipes run locally (and on a one-CPU local Ray where it is installed),
gathered into one results file and one report; a recipe's `sweep:` section gives the results of
the recipes it stands for; duplicates, failures and a missing Ray."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from quantkit.cli.main import cli
from quantkit.errors import QuantkitError
from quantkit.sweep import gpus_needed, load_recipes, run_sweep


def _recipe(root: Path, name: str, model: str, method: str) -> Path:
    recipe = {
        "version": 1, "name": name, "model": model, "workdir": str(root / "unused"),
        "calibration": {"dataset": "sample", "num_samples": 4, "seq_len": 32, "batch_size": 4,
                        "method": method, "tensors": "quantizable"},
        "engines": [{"name": "fp32", "precision": "fp32"},
                    {"name": "int8", "precision": "int8"}],
        "evaluation": {"dataset": "sample", "split": "test", "max_length": 64, "stride": 64,
                       "limit_tokens": 256, "latency_grid": ["1x32"], "warmup": 1,
                       "iterations": 2, "threads": 1},
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="module")
def recipes(tmp_path_factory, tiny_llama) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sweep")
    model_dir = root / "tiny-llama"
    tiny_llama.model.save_pretrained(model_dir)
    tiny_llama.tokenizer.save_pretrained(model_dir)
    return {"minmax": _recipe(root, "minmax", str(model_dir), "minmax"),
            "percentile": _recipe(root, "percentile", str(model_dir), "percentile"),
            "broken": _recipe(root, "broken", str(root / "no-such-model"), "minmax"),
            "root": root}


@pytest.fixture(scope="module")
def local_sweep(recipes, tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "out"
    result = CliRunner().invoke(cli, ["sweep", str(recipes["minmax"]),
                                      str(recipes["percentile"]), "--out", str(out)])
    return out, result


@pytest.fixture(scope="module")
def swept(recipes, tmp_path_factory):
    """The two hand-written recipes (minmax, percentile) as one file's `sweep:` section."""
    base = yaml.safe_load(recipes["minmax"].read_text())
    del base["calibration"]["method"]
    path = recipes["root"] / "tiny-sweep.yaml"
    path.write_text(yaml.safe_dump({**base, "name": "tiny",
                                    "sweep": {"calibration.method": ["minmax", "percentile"]}}))
    out = tmp_path_factory.mktemp("swept") / "out"
    result = CliRunner().invoke(cli, ["sweep", str(path), "--out", str(out)])
    return path, out, result


def _summary(out: Path) -> list[tuple[str, str, float]]:
    data = json.loads((out / "results.json").read_text())
    return [(e["name"], e["recipe"], e["perplexity"]) for e in data["engines"]]


def test_local_sweep_gathers_one_results_file_and_one_report(local_sweep):
    out, result = local_sweep
    assert result.exit_code == 0, result.output
    from quantkit.eval.results import load_results

    combined = load_results(out / "results.json")  # the schema's own reader accepts it
    assert combined.names == ["minmax/fp32", "minmax/int8", "percentile/fp32",
                              "percentile/int8"]
    assert combined.reference == {"fp32": "minmax/fp32", "fp16": None}
    for name in ("minmax", "percentile"):
        own = json.loads((out / name / "results.json").read_text())
        assert [e["perplexity"] for e in own["engines"]] == \
            [e.perplexity for e in combined.engines if e.name.startswith(f"{name}/")]
    # same model, same export: the two recipes' FP32 engines agree
    assert combined.engines[0].perplexity == combined.engines[2].perplexity
    report = json.loads((out / "report" / "report.json").read_text())
    assert len(report["engines"]) == 4 and len(report["sources"]) == 2
    assert (out / "report" / "report.html").is_file()
    state = json.loads((out / "sweep.json").read_text())
    assert [(r["name"], r["status"]) for r in state["recipes"]] == \
        [("minmax", "ok"), ("percentile", "ok")]
    assert f"Report: {out / 'report' / 'report.html'}" in result.output


def test_rerun_reuses_every_finished_step(local_sweep, recipes):
    out, _ = local_sweep
    before = _summary(out)
    outcome = run_sweep([recipes["minmax"], recipes["percentile"]], out, say=lambda _: None)
    assert outcome.ok
    assert [(r.steps, r.reused) for r in outcome.recipes] == [(6, 6), (6, 6)]
    assert _summary(out) == before


def test_a_sweep_section_gives_the_results_of_the_recipes_written_by_hand(swept, local_sweep):
    path, out, result = swept
    assert result.exit_code == 0, result.output
    data = json.loads((out / "results.json").read_text())
    assert [e["name"] for e in data["engines"]] == [
        "tiny-minmax/fp32", "tiny-minmax/int8", "tiny-percentile/fp32", "tiny-percentile/int8"]
    by_hand = _summary(local_sweep[0])
    assert [e["perplexity"] for e in data["engines"]] == [ppl for _, _, ppl in by_hand]
    # the axis values are columns of the gathered results, the state and the report
    assert [e["axes"] for e in data["engines"]] == \
        [{"calibration.method": "minmax"}] * 2 + [{"calibration.method": "percentile"}] * 2
    assert data["sweep"]["axes"] == ["calibration.method"]
    state = json.loads((out / "sweep.json").read_text())
    assert state["axes"] == ["calibration.method"]
    assert [(r["name"], r["recipe"], r["axes"]) for r in state["recipes"]] == [
        ("tiny-minmax", str(path), {"calibration.method": "minmax"}),
        ("tiny-percentile", str(path), {"calibration.method": "percentile"})]
    report = json.loads((out / "report" / "report.json").read_text())
    assert report["sweep"] == {"axes": ["calibration.method"], "sources": [
        {"recipe": "tiny-minmax", "axes": {"calibration.method": "minmax"}},
        {"recipe": "tiny-percentile", "axes": {"calibration.method": "percentile"}}]}
    markdown = (out / "report" / "report.md").read_text()
    assert "## Sweep" in markdown
    assert "| recipe | calibration.method | engine | precision |" in markdown
    assert "| tiny-percentile | percentile | int8 | int8 |" in markdown
    # the hand-written sweep has no axes: no such columns, no sweep table
    plain = json.loads((local_sweep[0] / "results.json").read_text())
    assert "axes" not in plain["engines"][0] and plain["sweep"]["axes"] == []
    assert "## Sweep" not in (local_sweep[0] / "report" / "report.md").read_text()


def test_a_rerun_of_a_sweep_section_reuses_every_step(swept):
    path, out, _ = swept
    outcome = run_sweep([path], out, say=lambda _: None)
    assert outcome.ok
    assert [(r.name, r.steps, r.reused) for r in outcome.recipes] == \
        [("tiny-minmax", 6, 6), ("tiny-percentile", 6, 6)]


def test_duplicate_names_are_refused_before_any_work(recipes, tmp_path):
    with pytest.raises(QuantkitError, match="same name 'minmax'"):
        load_recipes([recipes["minmax"], recipes["minmax"]])
    result = CliRunner().invoke(cli, ["sweep", str(recipes["minmax"]), str(recipes["minmax"]),
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "same name 'minmax'" in result.output
    assert not (tmp_path / "out").exists()


def test_a_failed_recipe_is_reported_and_the_others_kept(local_sweep, recipes, tmp_path):
    out = tmp_path / "out"
    # the finished recipe is reused from the local sweep's folder: copy it in
    import shutil

    shutil.copytree(local_sweep[0] / "minmax", out / "minmax")
    (out / "sweep.json").write_text("{}")
    result = CliRunner().invoke(cli, ["sweep", str(recipes["broken"]), str(recipes["minmax"]),
                                      "--out", str(out)])
    assert result.exit_code == 1, result.output
    assert "Failed: broken:" in result.output
    assert "1 of 2 recipes failed" in result.output
    assert [name for name, _, _ in _summary(out)] == ["minmax/fp32", "minmax/int8"]
    state = json.loads((out / "sweep.json").read_text())
    assert [(r["name"], r["status"]) for r in state["recipes"]] == \
        [("broken", "failed"), ("minmax", "ok")]
    assert state["recipes"][0]["error"]
    assert (out / "report" / "report.html").is_file()


def test_ray_without_ray_installed_is_one_clear_error(recipes, tmp_path, without_ray):
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["sweep", str(recipes["minmax"]), "--ray", "auto",
                                      "--out", str(out)])
    assert result.exit_code == 2
    assert "pip install 'quantkit[ray]'" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not out.exists()


def test_ray_sweep_gives_the_same_results_as_the_local_one(swept, local_sweep, tmp_path):
    """The sweep section's recipes as Ray tasks: the serial sweep's results (and so the
    hand-written recipes'); plain recipes on Ray are the killed-worker test's."""
    pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'quantkit[ray]'")
    path, serial, _ = swept
    out = tmp_path / "out"
    outcome = run_sweep([path], out, ray_address="local", say=lambda _: None,
                        ray_init={"num_cpus": 1, "include_dashboard": False})
    assert outcome.ok, [r.error for r in outcome.recipes]
    assert [(r.steps, r.reused) for r in outcome.recipes] == [(6, 0), (6, 0)]
    assert _summary(out) == _summary(serial)
    assert [ppl for _, _, ppl in _summary(out)] == [ppl for _, _, ppl in
                                                    _summary(local_sweep[0])]
    report = json.loads((out / "report" / "report.json").read_text())
    assert len(report["engines"]) == 4
    assert report["sweep"]["axes"] == ["calibration.method"]


def test_a_killed_worker_loses_only_its_recipe_and_ray_retries_it(local_sweep, recipes,
                                                                  tmp_path, monkeypatch):
    """The first recipe task kills its own worker process (the test hook); Ray retries it and
    the sweep ends with the serial results."""
    pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'quantkit[ray]'")
    from quantkit.ray_tasks import KILL_ENV

    marker = tmp_path / "killed"
    monkeypatch.setenv(KILL_ENV, str(marker))
    out = tmp_path / "out"
    outcome = run_sweep([recipes["minmax"], recipes["percentile"]], out,
                        ray_address="local", say=lambda _: None,
                        ray_init={"num_cpus": 1, "include_dashboard": False})
    assert marker.exists()  # a worker did die
    assert outcome.ok, [r.error for r in outcome.recipes]
    assert _summary(out) == _summary(local_sweep[0])


def test_unreachable_ray_cluster_is_one_error_and_nothing_written(recipes, tmp_path,
                                                                  monkeypatch):
    pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'quantkit[ray]'")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    # "auto" finds a running cluster through RAY_TMPDIR/ray_current_cluster: an empty folder
    # here, so that a cluster someone else runs on this machine is not found
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "ray-tmp"))
    out = tmp_path / "out"
    # "auto" is Ray's: a running cluster (none here), never a new one
    result = CliRunner().invoke(cli, ["sweep", str(recipes["minmax"]), "--ray", "auto",
                                      "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert "could not connect to Ray at 'auto'" in result.output
    assert "ray start --head" in result.output
    assert not out.exists()


def test_recipes_with_gpu_engines_ask_ray_for_a_gpu(recipes) -> None:
    from dataclasses import replace

    from quantkit.config import EngineConfig

    cpu = load_recipes([recipes["minmax"]])[0]
    assert gpus_needed(cpu) == 0  # ONNX Runtime engines on the CPU provider
    trt = replace(cpu, engines=[*cpu.engines, EngineConfig("trt", "int8", backend="tensorrt")])
    cuda = replace(cpu, engines=[EngineConfig("cuda", "fp32",
                                              options={"provider": "CUDAExecutionProvider"})])
    assert gpus_needed(trt) == 1 and gpus_needed(cuda) == 1
