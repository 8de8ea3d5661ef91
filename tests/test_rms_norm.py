"""RMSNorm in the form ONNX Runtime fuses: Mul(x, Reciprocal(Sqrt(a))) becomes Div(x, Sqrt(a)),
the same function, and ONNX Runtime then runs each norm as one SimplifiedLayerNormalization."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from quantkit.rms_norm import divide_by_root


def _rms_norm_model(extra_reader: bool = False) -> onnx.ModelProto:
    """x [2, 5, 8] -> RMSNorm as torch's exporter writes it -> y; optionally a second reader of
    the Reciprocal (then the pair must stay)."""
    nodes = [
        helper.make_node("Pow", ["x", "two"], ["sq"], name="n/Pow"),
        helper.make_node("ReduceMean", ["sq", "axes"], ["mean"], name="n/ReduceMean", keepdims=1),
        helper.make_node("Add", ["mean", "eps"], ["var"], name="n/Add"),
        helper.make_node("Sqrt", ["var"], ["root"], name="n/Sqrt"),
        helper.make_node("Reciprocal", ["root"], ["inv"], name="n/Reciprocal"),
        helper.make_node("Mul", ["x", "inv"], ["normed"], name="n/Mul"),
        helper.make_node("Mul", ["w", "normed"], ["y"], name="n/Mul_1"),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5, 8])]
    if extra_reader:
        nodes.append(helper.make_node("Identity", ["inv"], ["inv_copy"], name="n/Identity"))
        outputs.append(helper.make_tensor_value_info("inv_copy", TensorProto.FLOAT, None))
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.array(2.0, np.float32), "two"),
             numpy_helper.from_array(np.array([-1], np.int64), "axes"),
             numpy_helper.from_array(np.array(1e-5, np.float32), "eps"),
             numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "w")]
    graph = helper.make_graph(nodes, "rms", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [2, 5, 8])], outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _run(model: onnx.ModelProto, tmp_path: Path, name: str) -> tuple[np.ndarray, list[str]]:
    """y on a fixed x, and the op types of ONNX Runtime's optimized graph."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / f"{name}-optimized.onnx")
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((2, 5, 8)).astype(np.float32) * 3
    y = session.run(["y"], {"x": x})[0]
    optimized = onnx.load(options.optimized_model_filepath)
    return y, [n.op_type for n in optimized.graph.node]


def test_the_division_is_the_same_norm_and_onnx_runtime_fuses_it(tmp_path) -> None:
    model = _rms_norm_model()
    before, ops_before = _run(model, tmp_path, "before")
    assert "SimplifiedLayerNormalization" not in ops_before  # the exporter's form is not fused
    assert divide_by_root(model.graph) == 1
    onnx.checker.check_model(model)
    ops = [n.op_type for n in model.graph.node]
    assert "Reciprocal" not in ops and ops.count("Div") == 1
    div = next(n for n in model.graph.node if n.op_type == "Div")
    assert (div.name, list(div.input), list(div.output)) == ("n/Mul", ["x", "root"], ["normed"])
    after, ops_after = _run(model, tmp_path, "after")
    np.testing.assert_allclose(after, before, rtol=1e-6, atol=1e-6)
    assert ops_after.count("SimplifiedLayerNormalization") == 1
    assert not {"Pow", "ReduceMean", "Sqrt", "Div"} & set(ops_after)
    assert divide_by_root(model.graph) == 0  # nothing left to rewrite


def test_a_reciprocal_read_elsewhere_stays() -> None:
    model = _rms_norm_model(extra_reader=True)
    assert divide_by_root(model.graph) == 0
    assert [n.op_type for n in model.graph.node].count("Reciprocal") == 1


@pytest.mark.parametrize("fixture", ["tiny_llama_export", "tiny_llama_cache_export"])
def test_llama_exports_carry_the_division(request, fixture) -> None:
    """Every RMSNorm of a Llama export (2 per layer and the final one) is written as a Div,
    recorded in the manifest; rotation still finds each norm (it reads the Div like the Mul)."""
    from quantkit.export import find_onnx
    from quantkit.rotation import trace_residual

    export = request.getfixturevalue(fixture)
    onnx_path = find_onnx(export.directory)
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    ops = [n.op_type for n in graph.node]
    assert "Reciprocal" not in ops
    manifest = export.manifest
    assert manifest["rms_norm_divisions"] == 2 * 2 + 1 == ops.count("Div")
    assert len(trace_residual(graph).norms) == 5
