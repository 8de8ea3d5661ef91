"""`quantkit run`: a tiny recipe end to end, then resumed, then partly invalidated."""

from __future__ import annotations

import json

import pytest
import yaml
from click.testing import CliRunner

from quantkit.cli.main import cli
from quantkit.config import Recipe
from quantkit.errors import QuantkitError
from quantkit.pipeline import run_recipe


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory, tiny_llama):
    root = tmp_path_factory.mktemp("pipeline")
    model_dir = root / "tiny-llama"
    tiny_llama.model.save_pretrained(model_dir)
    tiny_llama.tokenizer.save_pretrained(model_dir)
    plan = root / "plan.yaml"
    plan.write_text(yaml.safe_dump({"version": 1, "name": "p", "default": "int8",
                                    "fallback": "fp32", "rules": [
                                        {"node": "/lm_head/MatMul", "precision": "fp32"}]}))
    recipe = {
        "version": 1, "name": "tiny", "model": str(model_dir), "workdir": str(root / "work"),
        "calibration": {"dataset": "sample", "num_samples": 8, "seq_len": 32, "batch_size": 4,
                        "method": "minmax", "tensors": "quantizable"},
        "engines": [{"name": "fp32", "precision": "fp32"},
                    {"name": "fp16", "precision": "fp16", "optional": True},
                    {"name": "int8", "precision": "int8"},
                    {"name": "mixed", "precision": "mixed", "plan": str(plan)}],
        "evaluation": {"dataset": "sample", "split": "test", "max_length": 64, "stride": 64,
                       "limit_tokens": 512, "latency_grid": ["1x32"], "warmup": 1,
                       "iterations": 2, "threads": 1},
    }
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_run_then_resume_then_invalidate_one_engine(recipe_file):
    recipe = Recipe.load(recipe_file)
    lines: list[str] = []
    first = run_recipe(recipe, say=lines.append, heartbeat=0)  # 0: a line per batch
    names = [s.name for s in first.steps]
    assert names == ["export", "calibrate", "build fp32", "build fp16", "build int8",
                     "build mixed", "eval", "report"]
    skipped = [s for s in first.steps if s.skipped]
    assert [s.name for s in skipped] == ["build fp16"]  # no FP16 kernels on this CPU
    assert "float16" in (skipped[0].skipped or "")
    results = json.loads(first.results.read_text())
    assert [e["name"] for e in results["engines"]] == ["fp32", "int8", "mixed"]
    assert first.report_html.is_file()
    # long steps say what they are doing: export phases, calibration batches i/N
    progress = [line.rsplit(" (", 1)[0] for line in lines]
    for expected in ("export: loading", "export: exporting to ONNX (torch.onnx.export, dynamo)",
                     "export: comparing ONNX Runtime with PyTorch on a padded batch",
                     "calibrate: collecting activation statistics 1/2 batches",
                     "calibrate: collecting activation statistics 2/2 batches"):
        assert any(p.startswith(expected) for p in progress), (expected, lines)

    lines.clear()
    again = run_recipe(recipe, say=lines.append)
    assert [s.reused for s in again.steps if not s.skipped] == [True] * 7
    # the optional FP16 engine's verdict is remembered: not checked, nor explained, again
    assert [s.name for s in again.steps if s.skipped] == ["build fp16"]
    assert again.steps[3].reused and "float16" in (again.steps[3].skipped or "")
    fp16_lines = [line for line in lines if line.startswith("build fp16:")]
    assert len(fp16_lines) == 1 and "same settings and libraries" in fp16_lines[0], lines
    assert not any("float16 kernel" in line for line in lines)

    # a changed plan rebuilds that engine, then eval and report; nothing else
    plan_path = recipe.engines[3].plan
    with open(plan_path) as fh:
        plan = yaml.safe_load(fh)
    plan["rules"].append({"op_type": "Softmax", "precision": "fp32"})
    with open(plan_path, "w") as fh:
        yaml.safe_dump(plan, fh)
    third = run_recipe(recipe, say=lines.append)
    rerun = [s.name for s in third.steps if not s.reused and not s.skipped]
    assert rerun == ["build mixed", "eval", "report"]


def test_foreign_artifact_needs_force(recipe_file, tmp_path):
    recipe = Recipe.load(recipe_file)
    (tmp_path / "export").mkdir()
    with pytest.raises(QuantkitError, match="was not made by this recipe's run.*--force"):
        run_recipe(recipe, workdir=tmp_path, say=lambda _: None)


def test_cli_run_bad_recipe_is_one_line(tmp_path):
    bad = tmp_path / "r.yaml"
    bad.write_text("model: x\nengines: [{name: a, precision: int4}]\n")
    result = CliRunner().invoke(cli, ["run", str(bad)])
    assert result.exit_code == 2
    assert "unknown precision 'int4'" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_smoothquant_recipe_builds_every_engine_from_the_smoothed_graph(recipe_file, tmp_path):
    import dataclasses

    recipe = Recipe.load(recipe_file)
    recipe = dataclasses.replace(
        recipe, calibration=dataclasses.replace(recipe.calibration, smoothquant=0.5),
        engines=[e for e in recipe.engines if e.name in ("fp32", "int8")])
    outcome = run_recipe(recipe, workdir=tmp_path, say=lambda _: None)
    assert (tmp_path / "calibration" / "smoothed" / "model.onnx").is_file()
    smoothed = json.loads((tmp_path / "calibration" / "smoothed" / "manifest.json").read_text())
    for name in ("fp32", "int8"):
        engine = json.loads((tmp_path / "engines" / name / "manifest.json").read_text())
        assert engine["source_model_hash"] == smoothed["model_hash"]
    results = json.loads(outcome.results.read_text())
    assert [e["name"] for e in results["engines"]] == ["fp32", "int8"]


def test_rotated_recipe_calibrates_and_builds_from_the_rotated_export(recipe_file, tmp_path):
    import dataclasses

    recipe = Recipe.load(recipe_file)
    recipe = dataclasses.replace(
        recipe, export=dataclasses.replace(recipe.export, rotate=True, down_block=64),
        engines=[e for e in recipe.engines if e.name in ("fp32", "int8")])
    run_recipe(recipe, workdir=tmp_path, say=lambda _: None)
    rotated = json.loads((tmp_path / "rotated" / "manifest.json").read_text())
    assert rotated["exporter"] == "quantkit.rotation"
    assert rotated["rotation"]["down"]["block"] == 64
    table = json.loads((tmp_path / "calibration" / "table.json").read_text())
    assert table["model_hash"] == rotated["model_hash"]
    for name in ("fp32", "int8"):
        engine = json.loads((tmp_path / "engines" / name / "manifest.json").read_text())
        assert engine["source_model_hash"] == rotated["model_hash"]
    # a second run reuses everything, rotation included
    again = run_recipe(recipe, workdir=tmp_path, say=lambda _: None)
    assert all(step.reused for step in again.steps if step.name in ("export", "rotate"))


def test_bad_down_block_is_refused():
    from quantkit.config import ExportConfig

    with pytest.raises(QuantkitError, match="power of 2"):
        ExportConfig(rotate=True, down_block=48)
