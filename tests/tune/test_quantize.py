"""``quantkit quantize`` end to end on a tiny trained Llama: every step, disjoint text parts, the
verified engine within the budget on the evaluation part, resumable, and its bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from quantkit.errors import QuantkitError
from tests.tune.conftest import step_totals

SETTINGS = dict(max_length=64, num_samples=16, seq_len=64, search_windows=3, holdout_windows=3,
                max_evals=40, eval_tokens=1280, threads=1, latency_iterations=2)


@pytest.fixture(scope="module")
def quantized(fragile_export, tmp_path_factory):
    import quantkit

    out = tmp_path_factory.mktemp("quantize") / "q"
    lines: list[str] = []
    result = quantkit.quantize(onnx=fragile_export.onnx_path.parent, dataset="sample", out=out,
                               max_ppl_increase="5%", say=lines.append, **SETTINGS)
    return result, out, lines


def test_every_step_and_the_verified_engine(quantized) -> None:
    result, out, lines = quantized
    assert result.transform["name"] == "rotate"
    assert [s["name"] for s in result.steps] == [
        "rotate", "calibrate", "autotune", "build fp32", "build fp16", "build int8-naive",
        "evaluate", "report"]
    assert not any(s["reused"] for s in result.steps)
    for name in ("rotated/manifest.json", "calibration/table.json", "calibration/weights.npz",
                 "autotune/plan.yaml", "autotune/engine/manifest.json", "results.json",
                 "report/report.html", "quantize.json"):
        assert (out / name).is_file(), name
    assert set(result.perplexity) == {"fp32", "fp16", "int8-naive", "quantized"}
    fp32 = result.perplexity["fp32"]
    # FP16 on a CPU: float16 emulated, its perplexity within float16's error of FP32's
    assert abs(result.delta_pct["fp16"]) < 0.5 and result.perplexity["fp16"] != fp32
    assert result.met_budget and result.perplexity["quantized"] <= fp32 * 1.05
    assert result.delta_pct["quantized"] == pytest.approx(
        100 * (result.perplexity["quantized"] / fp32 - 1))
    assert result.coverage is not None and result.coverage > 0
    assert set(result.p50_ms) == {"fp32", "int8-naive", "quantized"}
    saved = json.loads((out / "quantize.json").read_text())
    assert saved["schema"] == "quantkit.quantize/1" and saved["met_budget"] is True
    assert any(line.startswith("[1/8] rotate") for line in lines)
    assert step_totals(lines) == {8}  # every step line counts the same steps


def test_step_count_follows_the_transform() -> None:
    from quantkit.oneshot import planned_steps
    from quantkit.quantize_config import QuantizeConfig

    from_model = QuantizeConfig(model="smollm2-135m")
    assert planned_steps(from_model, "rotate") == 9  # export, rotate, calibrate, ... report
    assert planned_steps(from_model, "smoothquant") == 8  # SmoothQuant is inside calibrate
    from_export = QuantizeConfig(onnx=Path("some/export"), with_cache=True)
    assert planned_steps(from_export, "none") == 7 + 4  # cache: export, 2 builds, check


def test_roles_read_disjoint_text(quantized) -> None:
    result, out, _ = quantized
    labels = sorted(result.parts)
    assert labels == ["calibration of int8-naive", "calibration of quantized", "evaluation",
                      "tuning of quantized"]
    assert "(train[:70%])" in result.parts["calibration of quantized"]["label"]
    assert "(train[70%:])" in result.parts["tuning of quantized"]["label"]
    assert "evaluation.txt" in result.parts["evaluation"]["label"]


def test_a_rerun_reuses_every_step(quantized, fragile_export) -> None:
    import quantkit

    _, out, _ = quantized
    lines: list[str] = []
    again = quantkit.quantize(onnx=fragile_export.onnx_path.parent, dataset="sample", out=out,
                              max_ppl_increase="5%", say=lines.append, **SETTINGS)
    assert all(s["reused"] for s in again.steps)
    assert again.perplexity == quantized[0].perplexity


def test_layernorm_models_get_smoothquant(tiny_gpt2_export) -> None:
    from quantkit.oneshot import choose_transform

    chosen = choose_transform(tiny_gpt2_export.onnx_path, "auto")
    assert chosen["name"] == "smoothquant" and "LayerNormalization" in chosen["why"]
    with pytest.raises(QuantkitError, match="LayerNormalization"):
        choose_transform(tiny_gpt2_export.onnx_path, "rotate")


def test_default_parts_are_disjoint(tmp_path) -> None:
    from quantkit.data import resolve_text_source
    from quantkit.quantize_config import default_parts
    from quantkit.text_roles import check_roles_disjoint, role_of_source

    path = tmp_path / "text.txt"
    path.write_text("".join(f"line {i}\n" for i in range(200)))
    parts = default_parts(str(path))
    assert [parts[r].split for r in ("calibration", "tuning", "evaluation")] == [
        "calibration[:40%]", "tuning[40%:50%]", "evaluation[50%:]"]
    roles = {r: role_of_source(r, resolve_text_source(str(path), split=p.split))
             for r, p in parts.items()}
    assert check_roles_disjoint(list(roles.values())) == []
    # together they read each line once
    owners = [[r for r, role in roles.items() if role.records and i in role.records]
              for i in range(200)]
    assert owners == [["calibration"]] * 80 + [["tuning"]] * 20 + [["evaluation"]] * 100
    hub = default_parts("wikitext")
    assert [hub[r].split for r in ("calibration", "tuning", "evaluation")] == [
        "train", "validation", "test"]


def test_evaluation_spreads_its_tokens_or_reads_the_whole_part() -> None:
    """--eval-tokens N: N tokens in windows spread over the evaluation part; 0: all of it (the
    demo's setting, which once asked eval for --spread without a token count)."""
    from quantkit.oneshot import evaluation_config
    from quantkit.quantize_config import QuantizeConfig, parts_for

    parts = parts_for("sample")
    spread = evaluation_config(QuantizeConfig(model="m", parts=parts, eval_tokens=1280))
    assert (spread.limit_tokens, spread.spread, spread.stride) == (1280, True, 512)
    whole = evaluation_config(QuantizeConfig(model="m", parts=parts, eval_tokens=0))
    assert (whole.limit_tokens, whole.spread) == (None, False)
    whole.check()
    spread.check()


def test_bad_input_is_one_error_and_writes_nothing(fragile_export, tmp_path) -> None:
    from quantkit.cli.main import cli

    onnx = str(fragile_export.onnx_path.parent)
    out = tmp_path / "q"
    runner = CliRunner()
    overlap = runner.invoke(cli, ["quantize", "--onnx", onnx, "--dataset", "sample",
                                  "--tuning-split", "train[50%:]", "--out", str(out)])
    assert overlap.exit_code == 2
    assert "calibration: calibration.txt records 0-244" in overlap.output
    assert "--allow-overlap" not in overlap.output  # quantize's parts must be disjoint
    assert not out.exists()
    both = runner.invoke(cli, ["quantize", "--onnx", onnx, "--model", "x", "--dataset",
                               "sample", "--out", str(out)])
    assert both.exit_code == 2 and "either --model or --onnx" in both.output
    budget = runner.invoke(cli, ["quantize", "--onnx", onnx, "--dataset", "sample",
                                 "--max-ppl-increase", "lots", "--out", str(out)])
    assert budget.exit_code == 2 and budget.output.count("Error:") == 1
    assert not out.exists()


def test_time_budget_too_small_or_unreadable_is_refused_before_any_work(fragile_export,
                                                                        tmp_path) -> None:
    from quantkit.cli.main import cli

    onnx = str(fragile_export.onnx_path.parent)
    out = tmp_path / "q"
    runner = CliRunner()
    small = runner.invoke(cli, ["quantize", "--onnx", onnx, "--dataset", "sample",
                                "--time-budget", "30s", "--out", str(out)])
    assert small.exit_code == 2 and "--time-budget 30s is too small" in small.output
    unreadable = runner.invoke(cli, ["quantize", "--onnx", onnx, "--dataset", "sample",
                                     "--time-budget", "soon", "--out", str(out)])
    assert unreadable.exit_code == 2 and "cannot read the time budget 'soon'" in unreadable.output
    assert not out.exists()


def test_parse_duration() -> None:
    from quantkit.quantize_config import parse_duration

    assert [parse_duration(t) for t in ("15m", "900s", "1h", "90", "2.5min")] == [
        900, 900, 3600, 90, 150]


def test_fp16_reference_keeps_normalizations_fp32(tiny_llama_export, tiny_gpt2_export) -> None:
    """float16 x^2 overflows in RMSNorm/LayerNorm on models with large activations: the FP16
    reference keeps the normalization modules FP32 and everything else FP16."""
    from quantkit.oneshot import fp16_recipe
    from quantkit.plan import Precision, resolve_plan

    for export, norm in ((tiny_llama_export, "/input_layernorm/"), (tiny_gpt2_export, "/ln_1/")):
        plan = resolve_plan(fp16_recipe(export.onnx_path), export.onnx_path)
        decisions = plan.decisions.values()
        norms = [d for d in decisions if norm in d.node]
        assert norms and all(d.precision == Precision.FP32 for d in norms)
        matmuls = [d for d in decisions if d.op_type in ("MatMul", "Gemm")]
        assert matmuls and all(d.precision == Precision.FP16 for d in matmuls)
