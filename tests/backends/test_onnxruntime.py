"""ONNX Runtime engines: FP32 / INT8 / FP16 / mixed builds, their manifests, and bad input."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest

from quantkit.backends import get_backend
from quantkit.backends.base import BuildRequest, Engine
from quantkit.backends.onnxruntime import build_options, resolve_weight_layout, saturation_warning
from quantkit.build import plan_for
from quantkit.environment import CpuIsa, cpu_isa
from quantkit.errors import QuantkitError, QuantkitWarning
from quantkit.export import onnx_model_hash
from quantkit.graph_stats import linear_layer_macs
from quantkit.plan import PlanRecipe, PlanRule, Precision, resolve_plan
from tests.build_helpers import (
    INT8_LOGIT_TOLERANCE,
    MACHINE_WEIGHT_LAYOUT,
    QDQ_REFERENCE_TOLERANCE,
    run_onnx,
)

pytest_plugins = ("tests.fixtures_build",)
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def build(export, precision, out, plan=None, table=None, **options) -> Engine:
    onnx_path = export.onnx_path
    resolved = plan if plan is not None and not isinstance(plan, (str, PlanRecipe)) else (
        plan_for(onnx_path, precision, plan) if plan is not None else None)
    return get_backend("onnxruntime").build(
        BuildRequest(onnx_path, precision, resolved, table, options), out)


def run_engine(engine: Engine, feed, output="logits"):
    with engine.runner(threads=1) as runner:
        return runner.run(feed, [output])[output]


def test_fp32_engine_is_the_export_bit_for_bit(tiny_llama_export, eval_feed, tmp_path):
    engine = build(tiny_llama_export, "fp32", tmp_path / "e")
    assert (engine.path / "engine.onnx").read_bytes() == tiny_llama_export.onnx_path.read_bytes()
    np.testing.assert_array_equal(run_engine(engine, eval_feed),
                                  run_onnx(tiny_llama_export.onnx_path, eval_feed))
    assert engine.manifest["int8_coverage"] == 0.0
    counts = engine.manifest["as_built_counts"]
    nodes = len(onnx.load(str(tiny_llama_export.onnx_path)).graph.node)
    assert set(counts) == {"fp32", "none"} and sum(counts.values()) == nodes


def test_int8_engine_manifest_and_outputs(tiny_llama_export, llama_table, eval_feed, tmp_path):
    engine = build(tiny_llama_export, "int8", tmp_path / "e", plan=str(CONFIGS / "int8.yaml"),
                   table=llama_table)
    m = engine.manifest
    assert m["precision"] == "int8" and m["backend"] == "onnxruntime"
    assert m["int8_coverage"] == 1.0
    assert m["coverage"]["seq"] == 256  # 512 capped at the model's positions
    assert m["coverage"]["total_macs"] == m["coverage"]["int8_macs"] > 0
    assert m["source_model_hash"] == llama_table.model_hash
    assert m["table"]["method"] == "minmax"
    assert len(m["inputs"]["table_hash"]) == 64
    assert m["inputs"]["plan"]["source"]["recipe"]["name"] == "int8"
    assert m["onnxruntime_fusion"]["unfused_dequantized_matmuls"] == []
    assert sum(m["onnxruntime_fusion"]["integer_ops"].values()) == 13  # 19 minus 2x(2+1) merged
    assert m["as_built_counts"]["int8"] == 19
    assert m["rewrite"]["options"] == {"per_channel": True, "shared_inputs": "fuse",
                                       "weight_layout": MACHINE_WEIGHT_LAYOUT}
    assert m["weight_layout"]["layout"] == MACHINE_WEIGHT_LAYOUT
    assert m["weight_layout"]["requested"] == "auto"
    assert m["weight_layout"]["built_on"] == m["environment"]["isa"]
    assert m["environment"]["libraries"]["onnxruntime"]
    fp32_size = tiny_llama_export.onnx_path.stat().st_size
    assert m["size_bytes"] == (engine.path / "engine.onnx").stat().st_size < fp32_size
    ref = run_onnx(tiny_llama_export.onnx_path, eval_feed)
    out = run_engine(engine, eval_feed)
    assert 0 < np.max(np.abs(out - ref)) / np.max(np.abs(ref)) < INT8_LOGIT_TOLERANCE
    assert (engine.path / "tokenizer").is_dir()
    with engine.runner(threads=2) as runner:
        described = runner.describe()
    assert described["intra_op_threads"] == 2
    assert described["graph_optimization"] == "ORT_ENABLE_ALL"
    assert described["providers"] == ["CPUExecutionProvider"]


def test_mixed_safe_coverage_is_the_share_of_linear_macs(tiny_gpt2_bias_export, gpt2_table,
                                                         tmp_path):
    engine = build(tiny_gpt2_bias_export, "mixed", tmp_path / "e",
                   plan=str(CONFIGS / "mixed-safe.yaml"), table=gpt2_table)
    macs = linear_layer_macs(tiny_gpt2_bias_export.onnx_path, seq_len=256)
    expected = 1 - macs["/lm_head/MatMul"] / sum(macs.values())
    assert engine.manifest["int8_coverage"] == pytest.approx(expected)
    assert 0.5 < expected < 1
    assert engine.manifest["as_built_counts"]["int8"] == 12
    decisions = {d["node"]: d for d in engine.manifest["inputs"]["plan"]["decisions"]}
    assert decisions["/lm_head/MatMul"]["rule"] == "exact:/lm_head/MatMul"


def test_fp16_on_cpu_fails_clearly_and_writes_nothing(tiny_llama_export, tmp_path):
    out = tmp_path / "fp16"
    with pytest.raises(QuantkitError) as err:
        build(tiny_llama_export, "fp16", out)
    message = str(err.value)
    assert "CPUExecutionProvider has no float16 kernel for" in message
    assert "MatMul (19)" in message and "--fp16-fallback" in message
    assert not out.exists() and not list(tmp_path.iterdir())


def test_fp16_fallback_records_what_really_runs(tiny_llama_export, eval_feed, tmp_path):
    engine = build(tiny_llama_export, "fp16", tmp_path / "e", fp16_fallback=True)
    m = engine.manifest
    fallback = m["fp16"]["fallback_to_fp32"]
    assert fallback["op_types"]["MatMul"] == 19 and fallback["nodes"] > 19
    plan = {d["node"]: d for d in m["plan_as_built"]["decisions"]}
    assert plan["/lm_head/MatMul"]["precision"] == "fp32"
    assert plan["/lm_head/MatMul"]["rule"].endswith(
        "(fp16 -> fp32: no float16 kernel in CPUExecutionProvider)")
    assert m["fp16"]["nodes"] == m["as_built_counts"]["fp16"] > 0
    out = run_engine(engine, eval_feed)
    ref = run_onnx(tiny_llama_export.onnx_path, eval_feed)
    assert np.max(np.abs(out - ref)) / np.max(np.abs(ref)) < 0.01
    # the fp16 nodes were checked for the CPU provider; another one could cast them silently
    manifest_path = engine.path / "manifest.json"
    edited = json.loads(manifest_path.read_text())
    edited["fp16"]["provider"] = "CUDAExecutionProvider"
    manifest_path.write_text(json.dumps(edited))
    with pytest.raises(QuantkitError, match="checked for CUDAExecutionProvider, but would run "
                                            "on CPUExecutionProvider"):
        Engine.load(engine.path).runner(providers=["CPUExecutionProvider"]).activate()


def test_precision_labels_must_match_the_plan(tiny_llama_export, llama_table, tmp_path):
    with pytest.raises(QuantkitError, match="mixed-precision build needs a plan"):
        build(tiny_llama_export, "mixed", tmp_path / "a", table=llama_table)
    int8_plan = plan_for(tiny_llama_export.onnx_path, "int8", None)
    with pytest.raises(QuantkitError, match="--precision fp32 does not describe the plan: it "
                                            "puts 19 nodes in int8"):
        build(tiny_llama_export, "fp32", tmp_path / "b", plan=int8_plan, table=llama_table)
    with pytest.raises(QuantkitError, match="unknown precision 'int4'"):
        build(tiny_llama_export, "int4", tmp_path / "c")
    with pytest.raises(QuantkitError, match="unknown onnxruntime build option"):
        build(tiny_llama_export, "fp32", tmp_path / "d", fast=True)
    assert not list(tmp_path.iterdir())


def test_bad_tables_are_refused_before_anything_is_written(tiny_llama_export, llama_table,
                                                          tiny_gpt2_bias_export, gpt2_table,
                                                          tmp_path):
    out = tmp_path / "e"
    with pytest.raises(QuantkitError, match="needs a calibration table"):
        build(tiny_llama_export, "int8", out)
    other = replace(llama_table, model_hash=onnx_model_hash(tiny_gpt2_bias_export.onnx_path))
    with pytest.raises(QuantkitError, match="table was made for another model"):
        build(tiny_llama_export, "int8", out, table=other)
    # a table of another export whose hash is unknown: none of its tensors are in this graph
    foreign = replace(gpt2_table, model_hash=None)
    with pytest.raises(QuantkitError, match="ONNX model has none of the"):
        build(tiny_llama_export, "int8", out, table=foreign)
    # a table that lacks tensors the plan quantizes: they are listed
    partial = replace(llama_table, amax={k: v for k, v in llama_table.amax.items()
                                         if "/mlp/" not in k})
    with pytest.raises(QuantkitError, match="no range for 2 tensor.*layers.0/mlp/Mul_output_0"):
        build(tiny_llama_export, "int8", out, table=partial)
    # ... unless the plan keeps those nodes out of INT8
    plan = resolve_plan(PlanRecipe(rules=(PlanRule(Precision.FP32, node="re:/mlp/"),)),
                        tiny_llama_export.onnx_path)
    engine = build(tiny_llama_export, "int8", out, plan=plan, table=partial)
    assert engine.manifest["as_built_counts"]["int8"] == 13
    assert list(tmp_path.iterdir()) == [out]


def test_dedicated_mode_and_per_tensor_weights(tiny_llama_export, llama_table, eval_feed,
                                               tmp_path):
    dedicated = build(tiny_llama_export, "int8", tmp_path / "d", table=llama_table,
                      shared_inputs="dedicated")
    fusion = dedicated.manifest["onnxruntime_fusion"]
    assert sum(fusion["integer_ops"].values()) == 19 and not fusion["unfused_dequantized_matmuls"]
    per_tensor = build(tiny_llama_export, "int8", tmp_path / "t", table=llama_table,
                       per_channel=False)
    ref = run_onnx(tiny_llama_export.onnx_path, eval_feed)
    err_channel = np.abs(run_engine(dedicated, eval_feed) - ref).mean()
    err_tensor = np.abs(run_engine(per_tensor, eval_feed) - ref).mean()
    assert err_channel < err_tensor


# -- INT8 weight layout per instruction set ---------------------------------------------------
VNNI = CpuIsa("x86_64", "avx512_vnni", ("avx512_vnni",))
AVX2 = CpuIsa("x86_64", "avx2", ("avx2",))


def weight_types(engine: Engine) -> set[int]:
    import onnx

    model = onnx.load(str(engine.path / "engine.onnx"))
    inits = {t.name: t for t in model.graph.initializer}
    return {inits[n.input[0]].data_type for n in model.graph.node
            if n.op_type == "DequantizeLinear" and n.input[0] in inits}


@pytest.mark.parametrize(("isa", "option", "layout"), [
    (VNNI, None, "s8"), (AVX2, None, "u8"), (VNNI, "u8", "u8"), (AVX2, "s7", "s7"),
])
def test_weight_layout_follows_the_cpu_or_the_option(isa, option, layout, tiny_llama_export,
                                                     llama_table, eval_feed, tmp_path,
                                                     monkeypatch):
    import onnx

    monkeypatch.setattr("quantkit.backends.onnxruntime.cpu_isa", lambda: isa)
    options = {"weight_layout": option} if option else {}
    engine = build(tiny_llama_export, "int8", tmp_path / "e", table=llama_table, **options)
    record = engine.manifest["weight_layout"]
    assert record["layout"] == layout and record["requested"] == (option or "auto")
    assert record["built_on"]["name"] == isa.name
    assert (isa.name in record["reason"]) if option is None else (
        record["reason"] == "weight_layout option")
    dtype = onnx.TensorProto.UINT8 if layout == "u8" else onnx.TensorProto.INT8
    assert weight_types(engine) == {dtype}
    # whatever the layout, the engine fuses fully and (on this CPU's kernels) is within the
    # INT8 tolerance of FP32
    assert engine.manifest["onnxruntime_fusion"]["unfused_dequantized_matmuls"] == []
    if layout != "s8" or not cpu_isa().u8s8_saturates:
        ref = run_onnx(tiny_llama_export.onnx_path, eval_feed)
        out = run_engine(engine, eval_feed)
        assert np.max(np.abs(out - ref)) / np.max(np.abs(ref)) < INT8_LOGIT_TOLERANCE


def test_fused_engine_matches_its_qdq_reference(tiny_llama_export, llama_table, eval_feed,
                                                tmp_path):
    """The engine as built here, run fused and with its Q/DQ literally (ORT_DISABLE_ALL)."""
    engine = build(tiny_llama_export, "int8", tmp_path / "e", table=llama_table)
    with engine.runner(threads=1, optimization="disable") as runner:
        reference = runner.run(eval_feed, ["logits"])["logits"]
    out = run_engine(engine, eval_feed)
    assert np.max(np.abs(out - reference)) / np.max(np.abs(reference)) < QDQ_REFERENCE_TOLERANCE


def test_layout_option_is_checked_and_other_providers_get_s8():
    with pytest.raises(QuantkitError, match="unknown weight_layout 's4'"):
        build_options({"weight_layout": "s4"})
    options = build_options({})
    assert resolve_weight_layout(options, "CPUExecutionProvider", AVX2)[0] == "u8"
    assert resolve_weight_layout(options, "CPUExecutionProvider", VNNI)[0] == "s8"
    assert resolve_weight_layout(options, "CUDAExecutionProvider", AVX2)[0] == "s8"
    assert resolve_weight_layout({"weight_layout": "s7"}, "CPUExecutionProvider", VNNI) == (
        "s7", "weight_layout option")


def test_runner_warns_when_s8_weights_meet_saturating_kernels(tiny_llama_export, llama_table,
                                                              eval_feed, tmp_path, monkeypatch):
    import warnings

    s8 = build(tiny_llama_export, "int8", tmp_path / "s8", table=llama_table, weight_layout="s8")
    u8 = build(tiny_llama_export, "int8", tmp_path / "u8", table=llama_table, weight_layout="u8")
    fp32 = build(tiny_llama_export, "fp32", tmp_path / "fp32")
    monkeypatch.setattr("quantkit.backends.onnxruntime.cpu_isa", lambda: AVX2)
    with pytest.warns(QuantkitWarning) as caught, s8.runner(threads=1):
        pass
    message = str(caught[0].message)
    assert "\n" not in message and "saturating u8 x s8" in message
    assert "--weight-layout auto" in message and "perplexity" in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for engine in (u8, fp32):  # exact here, or no INT8
            with engine.runner(threads=1):
                pass
        with s8.runner(threads=1, optimization="disable"):  # Q/DQ run literally: exact
            pass
        monkeypatch.setattr("quantkit.backends.onnxruntime.cpu_isa", lambda: VNNI)
        with s8.runner(threads=1):
            pass
    # an engine built before layouts were recorded has s8 weights
    manifest = dict(s8.manifest)
    del manifest["weight_layout"]
    assert saturation_warning(s8.path, manifest, AVX2) is not None
    assert saturation_warning(s8.path, manifest, VNNI) is None
    assert saturation_warning(fp32.path, fp32.manifest, AVX2) is None
