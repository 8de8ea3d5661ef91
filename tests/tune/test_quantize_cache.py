"""``quantkit quantize --with-cache`` on a tiny trained Llama: the verified plan as a KV-cache
engine of the rotated cache graph (same function as the verified engine), the greedy generation
check against the FP32 cache engine, ``quantkit generate`` on it, resumable, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from quantkit.errors import QuantkitError
from tests.build_helpers import INT8_LOGIT_TOLERANCE
from tests.tune.conftest import step_totals

SETTINGS = dict(max_length=64, num_samples=16, seq_len=64, search_windows=3, holdout_windows=3,
                max_evals=40, eval_tokens=640, threads=1, latency_iterations=2,
                generation_tokens=8, generation_prompts=("The", "A cat sat on the mat and"))


@pytest.fixture(scope="session")
def fragile_cache_export(fragile_llama, tmp_path_factory):
    from quantkit.export import export_model

    return export_model(fragile_llama, tmp_path_factory.mktemp("export") / "fragile-cache",
                        with_cache=True)


@pytest.fixture(scope="module")
def quantized(fragile_export, fragile_cache_export, tmp_path_factory):
    import quantkit

    out = tmp_path_factory.mktemp("quantize") / "q"
    lines: list[str] = []
    result = quantkit.quantize(onnx=fragile_export.directory, dataset="sample", out=out,
                               max_ppl_increase="5%", say=lines.append, with_cache=True,
                               cache_onnx=fragile_cache_export.directory, **SETTINGS)
    return result, out, lines


def exported_attention_twin(out, graph_dir, tmp_path):
    """quantize's quantized cache engine rebuilt with ``attention=graph``."""
    from quantkit.cache_quantize import build_quantized_cache_engine
    from quantkit.export import find_onnx

    cache_graph = next(out / name for name in ("cache-rotated", "cache-smoothed", "cache-export")
                       if (out / name).is_dir())
    return build_quantized_cache_engine(tmp_path / "twin", find_onnx(cache_graph),
                                        out / "autotune", find_onnx(graph_dir),
                                        attention="graph")


def prefill_error(verified, cache) -> float:
    """max |dlogit| / max |logit| of the cache engine's prefill (empty past, a batch of
    2 x 24 random tokens) against the full-sequence engine's last-position logits."""
    from quantkit.export_cache import CacheLayout, hf_positions
    from tests.build_helpers import run_onnx, token_feeds

    feed = token_feeds(1, batch=2, seq=24, seed=9)[0]
    layout = CacheLayout.from_dict(cache.manifest["cache"])
    ref = run_onnx(verified.path / "engine.onnx", feed)[:, -1:]
    got = run_onnx(cache.path / "engine.onnx",
                   {**feed, "position_ids": hf_positions(feed["attention_mask"]),
                    **layout.empty_past(2)})
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def test_cache_steps_and_the_generation_check(quantized) -> None:
    result, out, lines = quantized
    names = [s["name"] for s in result.steps]
    assert names[-4:] == ["rotate cache", "build cache-fp32", "build cache-quantized",
                          "generation check"]
    assert any(line.startswith("[12/12] generation check") for line in lines)
    assert step_totals(lines) == {12}
    generation = result.generation
    assert result.cache_engine == str(out / "engines" / "cache-quantized")
    assert generation["prompts"] == 2 and generation["max_new_tokens"] == 8
    assert generation["positions"] == 16  # no end-of-text token in the tiny model's config
    for kind in ("free_running", "teacher_forced"):
        share = generation[kind]["share"]
        assert 0.0 <= share <= 1.0 and share == generation[kind]["equal"] / 16
    assert [s["prompt"] for s in generation["samples"]] == ["The", "A cat sat on the mat and"]
    saved = json.loads((out / "quantize.json").read_text())
    assert saved["generation"]["teacher_forced"] == generation["teacher_forced"]
    assert saved["cache_engine"] == result.cache_engine
    assert any(line.startswith("generation (cache-quantized against cache-fp32): greedy tokens")
               for line in lines)
    attention = result.generation["attention"]
    assert attention["fused"] and attention["layers"] == 2
    assert any(line.startswith("cache-quantized: attention fused in 2 layers (Attention (ONNX "
                               f"opset 23, float)): {attention['planned_int8_now_float']} ")
               for line in lines)
    assert saved["generation"]["attention"] == attention


def test_cache_engine_is_the_verified_plan_on_the_rotated_cache_graph(quantized,
                                                                      tmp_path) -> None:
    """Built with its attention as exported, the cache engine has the verified engine's INT8
    nodes and its prefill gives the verified (plain) engine's last-position logits: the plan,
    the tuned ranges and the GPTQ weights all carried. quantize's own cache engine fuses
    attention (float): it differs by exactly the attention MatMuls the plan had in INT8."""
    from quantkit.backends.base import Engine

    result, out, _ = quantized
    verified = Engine.load(result.engine)
    cache = Engine.load(out / "engines" / "cache-quantized")
    twin = exported_attention_twin(out, out / "rotated", tmp_path)
    int8 = verified.manifest["as_built_counts"]["int8"]
    assert twin.manifest["precision"] == cache.manifest["precision"] == verified.manifest[
        "precision"]
    assert twin.manifest["as_built_counts"]["int8"] == int8 > 0
    assert prefill_error(verified, twin) < 1e-4
    fused = cache.manifest["attention"]
    assert fused["fused"] and fused["layers"] == 2
    assert cache.manifest["as_built_counts"]["int8"] == int8 - len(
        fused["planned_int8_now_float"])
    assert prefill_error(verified, cache) < INT8_LOGIT_TOLERANCE
    options = dict(cache.manifest["inputs"]["options"])
    assert options.pop("attention") == "auto"
    assert options == verified.manifest["inputs"]["options"]
    source = json.loads((out / "cache-rotated" / "manifest.json").read_text())
    assert source["exporter"] == "quantkit.rotation" and source["check"]["decode_steps"] == 3


def test_generate_runs_on_the_cache_engine(quantized) -> None:
    from quantkit.cli.main import cli

    _, out, _ = quantized
    run = CliRunner().invoke(cli, ["generate", "--engine", str(out / "engines" /
                                                               "cache-quantized"),
                                   "--prompt", "The", "--max-new-tokens", "4", "--threads", "1"])
    assert run.exit_code == 0, run.output
    from quantkit.generate import generate

    expected = generate(out / "engines" / "cache-quantized", "The", max_new_tokens=4,
                        threads=1).texts[0]
    assert run.output.startswith("The" + expected)


def test_a_rerun_reuses_the_cache_steps(quantized, fragile_export, fragile_cache_export) -> None:
    import quantkit

    result, out, _ = quantized
    again = quantkit.quantize(onnx=fragile_export.directory, dataset="sample", out=out,
                              max_ppl_increase="5%", say=lambda _: None, with_cache=True,
                              cache_onnx=fragile_cache_export.directory, **SETTINGS)
    assert all(s["reused"] for s in again.steps)
    assert again.generation["teacher_forced"] == result.generation["teacher_forced"]


def test_agreement_of_an_engine_with_itself_is_complete(quantized) -> None:
    from quantkit.generation_check import greedy_agreement

    _, out, _ = quantized
    fp32 = out / "engines" / "cache-fp32"
    same = greedy_agreement(fp32, fp32, ["The cat"], 6, threads=1)
    assert same["free_running"] == {"equal": 6, "share": 1.0, "identical": 1}
    assert same["teacher_forced"]["share"] == 1.0
    assert same["samples"][0]["first_difference"] is None


def test_bad_cache_input_is_refused_before_any_work(fragile_export, tiny_llama_export,
                                                    tmp_path) -> None:
    from quantkit.cli.main import cli

    onnx = str(fragile_export.directory)
    out = tmp_path / "q"
    runner = CliRunner()
    base = ["quantize", "--onnx", onnx, "--dataset", "sample", "--out", str(out)]
    missing = runner.invoke(cli, [*base, "--with-cache"])
    assert missing.exit_code == 2 and "needs the KV-cache export" in missing.output
    plain = runner.invoke(cli, [*base, "--with-cache", "--cache-onnx",
                                str(tiny_llama_export.directory)])
    assert plain.exit_code == 2 and "is not a KV-cache export" in plain.output
    alone = runner.invoke(cli, [*base, "--cache-onnx", str(tiny_llama_export.directory)])
    assert alone.exit_code == 2 and "--cache-onnx is for --with-cache" in alone.output
    assert not out.exists()
    from quantkit.quantize_config import QuantizeConfig, parts_for

    with pytest.raises(QuantkitError, match="generation-tokens must be at least 1"):
        QuantizeConfig(model="m", parts=parts_for("sample"), with_cache=True,
                       generation_tokens=0).check()


def test_recipe_section_takes_the_cache_settings(tmp_path) -> None:
    from quantkit.quantize_config import QuantizeConfig

    config = QuantizeConfig.from_recipe("m", {"dataset": "sample", "with_cache": True,
                                              "generation_prompts": ["Hi", "Yo"],
                                              "generation_tokens": 4})
    assert config.with_cache and config.generation_prompts == ("Hi", "Yo")
    assert config.to_dict()["cache_onnx"] is None


def test_layernorm_model_gets_its_smoothing_carried_to_the_cache_graph(
        tiny_gpt2_export, tiny_gpt2_cache_export, tmp_path) -> None:
    """GPT-2 family: SmoothQuant (applied in calibration) is carried to the cache graph, whose
    quantized engine (attention as exported) gives the verified engine's last-position
    logits."""
    import quantkit
    from quantkit.backends.base import Engine

    out = tmp_path / "q"
    settings = {**SETTINGS, "max_evals": 10, "search_windows": 2, "holdout_windows": 2,
                "generation_prompts": ("The",), "generation_tokens": 4}
    result = quantkit.quantize(onnx=tiny_gpt2_export.directory, dataset="sample", out=out,
                               max_ppl_increase="50%", say=lambda _: None, with_cache=True,
                               cache_onnx=tiny_gpt2_cache_export.directory, **settings)
    assert result.transform["name"] == "smoothquant"
    assert [s["name"] for s in result.steps][-4:] == [
        "smooth cache", "build cache-fp32", "build cache-quantized", "generation check"]
    smoothed = json.loads((out / "cache-smoothed" / "manifest.json").read_text())
    assert smoothed["smoothquant"]["carried"]["constants"] > 0
    assert smoothed["check"]["relative_error"] < 1e-4
    verified = Engine.load(result.engine)
    cache = Engine.load(result.cache_engine)
    assert prefill_error(verified, exported_attention_twin(out, out / "calibration" / "smoothed",
                                                           tmp_path)) < 1e-4
    assert cache.manifest["attention"]["fused"]
    assert prefill_error(verified, cache) < INT8_LOGIT_TOLERANCE
    assert result.generation["positions"] == 4
