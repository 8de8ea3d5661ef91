"""ONNX Runtime INT8 engines with activation ranges measured at run time (--activations
dynamic): what the graph computes, that ONNX Runtime fuses it, and the build option's checks."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from quantkit.backends.onnxruntime import build_options
from quantkit.dynamic_quant import to_dynamic_activations
from quantkit.errors import QuantkitError
from tests.backends.test_onnxruntime import CONFIGS, build, run_engine
from tests.build_helpers import INT8_LOGIT_TOLERANCE, run_onnx

pytest_plugins = ("tests.fixtures_build",)


def _static_matmul(weights_u8: np.ndarray, w_scale: np.ndarray, x_scale: float) -> onnx.ModelProto:
    """x [2, K] -> Q/DQ (int8, x_scale) -> MatMul with DQ(uint8 W, per-column scale, zp 128)."""
    k, n = weights_u8.shape
    inits = [numpy_helper.from_array(np.array(x_scale, np.float32), "xs"),
             numpy_helper.from_array(np.array(0, np.int8), "xz"),
             numpy_helper.from_array(weights_u8, "w"),
             numpy_helper.from_array(w_scale.astype(np.float32), "ws"),
             numpy_helper.from_array(np.full(n, 128, np.uint8), "wz")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="q"),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"], name="dq"),
             helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], name="wdq", axis=1),
             helper.make_node("MatMul", ["xd", "wd"], ["y"], name="/fc/MatMul")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                         [2, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, n])],
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _dynamic_reference(x: np.ndarray, weights_u8: np.ndarray, w_scale: np.ndarray) -> np.ndarray:
    """ONNX's DynamicQuantizeLinear, then integer products, then both scales."""
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = np.float32((hi - lo) / 255)
    zero = np.clip(np.rint(-lo / scale), 0, 255)
    xq = np.clip(np.rint(x / scale) + zero, 0, 255)
    acc = (xq - zero) @ (weights_u8.astype(np.float64) - 128)
    return (acc * (scale * w_scale.astype(np.float32))).astype(np.float32)


@pytest.mark.parametrize("level", [ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                                   ort.GraphOptimizationLevel.ORT_ENABLE_ALL])
def test_dynamic_matmul_computes_run_time_ranges(level):
    rng = np.random.default_rng(0)
    weights = rng.integers(0, 256, (16, 8), dtype=np.uint8)
    w_scale = rng.uniform(0.001, 0.01, 8)
    model = _static_matmul(weights, w_scale, x_scale=0.5)  # a table's scale: ignored after
    assert to_dynamic_activations(model) == 1
    onnx.checker.check_model(model, full_check=True)
    ops = [n.op_type for n in model.graph.node]
    assert "QuantizeLinear" not in ops and "DequantizeLinear" not in ops
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= set(ops)
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    x = rng.normal(0, 3, (2, 16)).astype(np.float32)
    y = session.run(None, {"x": x})[0]
    np.testing.assert_allclose(y, _dynamic_reference(x, weights, w_scale), rtol=1e-5, atol=1e-5)


def test_a_graph_without_static_int8_matmuls_is_unchanged(tiny_llama_export):
    model = onnx.load(str(tiny_llama_export.onnx_path))
    before = model.SerializeToString()
    assert to_dynamic_activations(model) == 0
    assert model.SerializeToString() == before


def test_dynamic_int8_engine(tiny_llama_export, llama_table, eval_feed, tmp_path):
    static = build(tiny_llama_export, "int8", tmp_path / "s", plan=str(CONFIGS / "int8.yaml"),
                   table=llama_table)
    dynamic = build(tiny_llama_export, "int8", tmp_path / "d", plan=str(CONFIGS / "int8.yaml"),
                    table=llama_table, activations="dynamic")
    m = dynamic.manifest
    assert m["activations"] == {"mode": "dynamic", "matmuls": 13}  # 19 nodes, 2x(2+1) merged
    assert "activations" not in static.manifest
    assert m["as_built_counts"] == static.manifest["as_built_counts"]
    fusion = m["onnxruntime_fusion"]
    assert fusion["unfused_dequantized_matmuls"] == []
    assert set(fusion["integer_ops"]) <= {"DynamicQuantizeMatMul", "MatMulIntegerToFloat"}
    assert sum(fusion["integer_ops"].values()) == 13
    ops = {n.op_type for n in onnx.load(str(dynamic.path / "engine.onnx")).graph.node}
    assert "QuantizeLinear" not in ops
    ref = run_onnx(tiny_llama_export.onnx_path, eval_feed)
    out_dynamic, out_static = run_engine(dynamic, eval_feed), run_engine(static, eval_feed)
    assert 0 < np.max(np.abs(out_dynamic - ref)) / np.max(np.abs(ref)) < INT8_LOGIT_TOLERANCE
    assert np.max(np.abs(out_dynamic - out_static)) > 0  # not the static engine under a new name


def test_unknown_activations_mode_is_refused():
    with pytest.raises(QuantkitError, match="unknown activations mode 'per-token'"):
        build_options({"activations": "per-token"})


def test_dynamic_activations_without_int8_nodes_are_refused(tiny_llama_export, tmp_path):
    with pytest.raises(QuantkitError, match="activations=dynamic needs INT8 nodes"):
        build(tiny_llama_export, "fp32", tmp_path / "e", activations="dynamic")
    assert not (tmp_path / "e").exists()
