"""PrecisionPlan -> per-layer precisions over parser layer names, and the engine inspector's
per-layer precisions (no TensorRT needed: layers are plain records)."""

from __future__ import annotations

import json

import pytest

from quantkit.backends.tensorrt.layers import (
    NetworkLayer,
    check_explicit_network,
    compare_with_plan,
    dtype_of_format,
    map_plan_to_layers,
    onnx_node_of,
    onnx_nodes_from_metadata,
    parse_engine_information,
    summarize_engine_layers,
)
from quantkit.errors import QuantkitError
from quantkit.plan import NodeDecision, Precision, PrecisionPlan

Q = "/model/layers.0/self_attn/q_proj/MatMul"
QK = "/model/layers.0/self_attn/MatMul"
AV = "/model/layers.0/self_attn/MatMul_1"  # an ONNX node whose own name ends in _1
SOFTMAX = "/model/layers.0/self_attn/Softmax"
DOWN = "/model/layers.0/mlp/down_proj/MatMul"
GEMM = "/model/layers.0/mlp/up_proj/Gemm"
EMBED = "/model/embed_tokens/Gather"
SHAPE = "/model/Shape"
CONST = "/model/rotary_emb/Constant"
HEAD = "/lm_head/MatMul"

NODES = [
    (EMBED, "Gather"), (SHAPE, "Shape"), (CONST, "Constant"), (Q, "MatMul"), (QK, "MatMul"),
    (SOFTMAX, "Softmax"), (AV, "MatMul"), (GEMM, "Gemm"), (DOWN, "MatMul"), (HEAD, "MatMul"),
]


def plan(**overrides: Precision) -> PrecisionPlan:
    """MatMul/Gemm int8, everything else fp16, unless overridden by node name."""
    decisions = {}
    for node, op in NODES:
        precision = Precision.INT8 if op in ("MatMul", "Gemm") else Precision.FP16
        precision = overrides.get(node, precision)
        decisions[node] = NodeDecision(node, op, precision, f"op_type:{op}")
    return PrecisionPlan(default=Precision.FP16, decisions=decisions)


def meta(node: str) -> str:
    return f"[ONNX Layer: {node}]"


def parser_layers(with_metadata: bool = True) -> list[NetworkLayer]:
    """Layers as TensorRT 10's ONNX parser makes them for NODES: one node may become several
    layers (suffix from a parser-wide counter), Constant nodes become weights (no layer), and the
    parser adds helpers of its own (no metadata)."""
    rows = [
        # (name, LayerType, node the metadata names, output dtypes, shape tensor?)
        (EMBED, "GATHER", EMBED, ("FLOAT",), False),  # inputs: table FLOAT, ids INT64
        (SHAPE, "SHAPE", SHAPE, ("INT64",), True),
        ("ONNXTRT_ShapeTensorFromDims_3", "SHUFFLE", None, ("INT64",), True),
        (Q, "MATRIX_MULTIPLY", Q, ("FLOAT",), False),
        (QK, "MATRIX_MULTIPLY", QK, ("FLOAT",), False),
        (SOFTMAX, "SOFTMAX", SOFTMAX, ("FLOAT",), False),
        (AV, "MATRIX_MULTIPLY", AV, ("FLOAT",), False),
        (GEMM, "MATRIX_MULTIPLY", GEMM, ("FLOAT",), False),
        (f"{GEMM}_7", "CONSTANT", None, ("FLOAT",), False),  # the bias: weights, no metadata
        (f"{GEMM}_8", "ELEMENTWISE", GEMM, ("FLOAT",), False),  # bias add: same node
        (DOWN, "MATRIX_MULTIPLY", DOWN, ("FLOAT",), False),
        (HEAD, "MATRIX_MULTIPLY", HEAD, ("FLOAT",), False),
    ]
    inputs = {EMBED: ("FLOAT", "INT64"), SHAPE: ("INT64",)}
    return [
        NetworkLayer(i, name, kind, meta(node) if (node and with_metadata) else "", outs, shape,
                     inputs.get(name, ("FLOAT",) if kind != "CONSTANT" else ()))
        for i, (name, kind, node, outs, shape) in enumerate(rows)
    ]


# -- metadata and names ---------------------------------------------------------------------------

def test_metadata_single_fused_and_local_function():
    assert onnx_nodes_from_metadata(meta(Q)) == [Q]
    fused = f"{meta(DOWN)}\x1f{meta('/model/layers.0/mlp/act_fn/Mul')}"
    assert onnx_nodes_from_metadata(fused) == [DOWN, "/model/layers.0/mlp/act_fn/Mul"]
    assert onnx_nodes_from_metadata("[ONNX Layer: /a/Add | Local Function: f]\x1e[ONNX Layer: "
                                    "/a/Add]") == ["/a/Add"]
    assert onnx_nodes_from_metadata("") == []
    assert onnx_nodes_from_metadata("[ONNX Layer: x][ONNX Layer: y]") == ["x", "y"]


def test_node_of_layer_prefers_metadata_then_names():
    known = {Q, AV, QK}
    assert onnx_node_of(NetworkLayer(0, "whatever", "SHUFFLE", meta(Q)), known) == Q
    assert onnx_node_of(NetworkLayer(0, Q, "MATRIX_MULTIPLY"), known) == Q
    # a second layer of node QK, named by the parser's uniqueness suffix
    assert onnx_node_of(NetworkLayer(0, f"{QK}_42", "SHUFFLE"), known) == QK
    # the exact name wins: AV is a node in its own right, not "QK's first extra layer"
    assert onnx_node_of(NetworkLayer(0, AV, "MATRIX_MULTIPLY"), known) == AV
    assert onnx_node_of(NetworkLayer(0, f"{AV}_3_5", "SHUFFLE"), known) == AV
    assert onnx_node_of(NetworkLayer(0, "ONNXTRT_Broadcast_12", "SHUFFLE"), known) is None


# -- plan -> layer precisions ---------------------------------------------------------------------

def test_plan_maps_to_parser_layers():
    mapping = map_plan_to_layers(parser_layers(), plan())
    by_layer = {a.layer: a for a in mapping.assignments}
    # INT8 compute layers: precision only, TensorRT picks the output type
    for node in (Q, QK, AV, GEMM, DOWN, HEAD):
        assert by_layer[node].precision is Precision.INT8
        assert by_layer[node].trt_precision == "INT8"
        assert by_layer[node].output_types == ()
    # FP16 layers: precision and every output's type
    assert by_layer[SOFTMAX].precision is Precision.FP16
    assert by_layer[SOFTMAX].output_types == ((0, "HALF"),)
    # the Gemm's extra bias-add layer follows its node
    assert by_layer[f"{GEMM}_8"].node == GEMM
    assert by_layer[f"{GEMM}_8"].precision is Precision.INT8
    # left alone: shape arithmetic, constants, parser helpers
    skipped = dict(mapping.skipped)
    assert skipped[SHAPE] == "SHAPE layer"
    assert skipped[EMBED] == "non-float inputs ['FLOAT', 'INT64']"  # an embedding lookup
    assert "ONNXTRT_ShapeTensorFromDims_3" in mapping.helper_layers
    assert f"{GEMM}_7" not in by_layer
    assert mapping.nodes_without_layers == [CONST]
    assert mapping.precisions == {Precision.INT8, Precision.FP16}
    summary = mapping.summary()
    assert summary["by_precision"] == {"fp16": 1, "int8": 7}
    assert summary["matched_by_metadata"] == 10


def test_fp32_override_sets_fp32_output_types():
    mapping = map_plan_to_layers(parser_layers(), plan(**{HEAD: Precision.FP32}))
    head = next(a for a in mapping.assignments if a.layer == HEAD)
    assert head.precision is Precision.FP32
    assert head.trt_precision == "FLOAT"
    assert head.output_types == ((0, "FLOAT"),)


def test_names_alone_work_without_metadata():
    mapping = map_plan_to_layers(parser_layers(with_metadata=False), plan())
    by_layer = {a.layer: a.node for a in mapping.assignments}
    assert by_layer[AV] == AV and by_layer[QK] == QK and by_layer[f"{GEMM}_8"] == GEMM
    # every layer but the parser's helper, the bias constant included (then skipped as CONSTANT)
    assert mapping.summary()["matched_by_name"] == 11
    assert mapping.summary()["matched_by_metadata"] == 0
    assert (f"{GEMM}_7", "CONSTANT layer") in mapping.skipped


def test_shape_arithmetic_is_not_constrained():
    layers = [*parser_layers(),
              NetworkLayer(98, "/model/Concat_2", "CONCATENATION", meta(SOFTMAX), ("INT64",), True,
                           ("INT64", "INT64"))]
    mapping = map_plan_to_layers(layers, plan())
    assert ("/model/Concat_2", "computes a shape") in mapping.skipped


def test_layers_with_non_float_outputs_are_not_constrained():
    layers = [
        *parser_layers(),
        NetworkLayer(99, "/model/ArgMax", "TOPK", meta(EMBED), ("FLOAT", "INT32"), False),
    ]
    mapping = map_plan_to_layers(layers, plan())
    assert ("/model/ArgMax", "non-float outputs ['FLOAT', 'INT32']") in mapping.skipped


def test_plan_naming_layers_the_network_lacks_is_an_error():
    other = plan()
    decisions = dict(other.decisions)
    decisions["/model/layers.7/mlp/down_proj/MatMul"] = NodeDecision(
        "/model/layers.7/mlp/down_proj/MatMul", "MatMul", Precision.INT8, "op_type:MatMul"
    )
    with pytest.raises(QuantkitError, match="names 1 node\\(s\\) the TensorRT network does not "
                                            "have: /model/layers.7/mlp/down_proj/MatMul") as info:
        map_plan_to_layers(parser_layers(), PrecisionPlan(Precision.FP16, decisions))
    assert "resolved for another ONNX graph" in str(info.value)


def test_plan_for_an_entirely_different_graph_is_an_error():
    foreign = PrecisionPlan.uniform([("node_linear_3", "Gemm"), ("node_Add_7", "Add")],
                                    Precision.INT8)
    with pytest.raises(QuantkitError, match="names 2 node\\(s\\)"):
        map_plan_to_layers(parser_layers(), foreign)


def test_network_compute_layers_missing_from_plan_is_an_error():
    layers = [*parser_layers(),
              NetworkLayer(50, "/model/layers.1/mlp/down_proj/MatMul", "MATRIX_MULTIPLY",
                           meta("/model/layers.1/mlp/down_proj/MatMul"), ("FLOAT",))]
    with pytest.raises(QuantkitError, match="compute node\\(s\\) the precision plan does not"):
        map_plan_to_layers(layers, plan())


def test_missing_constant_nodes_are_fine():
    # Constant (and other foldable) nodes make no layer: that is not an error
    mapping = map_plan_to_layers(parser_layers(), plan())
    assert CONST in mapping.nodes_without_layers


# -- explicit networks ----------------------------------------------------------------------------

def test_explicit_int8_needs_qdq_layers():
    float_net = parser_layers()
    with pytest.raises(QuantkitError, match="no QuantizeLinear/DequantizeLinear nodes") as info:
        check_explicit_network(float_net, {Precision.INT8})
    assert "qdq_onnx" in str(info.value)
    qdq = [*float_net, NetworkLayer(40, "/q/QuantizeLinear", "QUANTIZE", "", ("INT8",)),
           NetworkLayer(41, "/q/DequantizeLinear", "DEQUANTIZE", "", ("FLOAT",))]
    check_explicit_network(qdq, {Precision.INT8})
    check_explicit_network(float_net, {Precision.FP32})


def test_explicit_fp16_needs_half_tensors():
    with pytest.raises(QuantkitError, match="no FP16 tensors"):
        check_explicit_network(parser_layers(), {Precision.FP16})
    half = [*parser_layers(), NetworkLayer(40, "/c/Cast", "CAST", "", ("HALF",))]
    check_explicit_network(half, {Precision.FP16})


# -- engine inspector -----------------------------------------------------------------------------

INSPECTOR = {
    "Layers": [
        {
            "Name": "Reformatting CopyNode for Input Tensor 0 to /model/layers.0/self_attn/q_proj/"
                    "MatMul",
            "LayerType": "Reformat",
            "Inputs": [{"Name": "x", "Location": "Device", "Dimensions": [1, 16, 64],
                        "Format/Datatype": "Row major linear FP32"}],
            "Outputs": [{"Name": "x_r", "Location": "Device", "Dimensions": [1, 16, 64],
                         "Format/Datatype": "Row major linear INT8 format"}],
            "Metadata": "",
        },
        {
            "Name": Q,
            "LayerType": "CaskGemmMatrixMultiply",
            "Inputs": [{"Name": "x_r", "Format/Datatype": "Row major linear INT8 format"}],
            "Outputs": [{"Name": "q", "Format/Datatype": "Row major linear FP16 format"}],
            "TacticName": "sm90_xmma_gemm_i8f16_i8i32_f32_tn_n_tilesize128x128x64",
            "Metadata": meta(Q),
        },
        {
            "Name": f"{SOFTMAX} + {AV}",
            "LayerType": "Myelin",
            "Inputs": [{"Name": "s", "Format/Datatype": "Channel major FP16 format where channel "
                                                      "% 8 == 0"}],
            "Outputs": [{"Name": "o", "Format/Datatype": "Row major linear FP16 format"}],
            "Metadata": f"{meta(SOFTMAX)}\x1f{meta(AV)}",
        },
        {
            "Name": HEAD,
            "LayerType": "CaskGemmMatrixMultiply",
            "Inputs": [{"Name": "h", "Format/Datatype": "Row major linear FP32"},
                       {"Name": "ids", "Format/Datatype": "Row major linear Int64"}],
            "Outputs": [{"Name": "logits", "Format/Datatype": "Row major linear FP32"}],
            "Metadata": meta(HEAD),
        },
        {
            "Name": SHAPE,
            "LayerType": "Shape",
            "Inputs": [{"Name": "ids", "Format/Datatype": "Int64"}],
            "Outputs": [{"Name": "shape", "Format/Datatype": "Int64"}],
            "Metadata": meta(SHAPE),
        },
    ],
    "Bindings": ["input_ids", "attention_mask", "logits"],
}


@pytest.mark.parametrize(
    ("text", "dtype"),
    [
        ("Row major linear FP32", "FLOAT"),
        ("Row major linear FP16 format", "HALF"),
        ("Channel major FP16 format where channel % 4 == 0", "HALF"),
        ("Row major linear INT8 format", "INT8"),
        ("Int8", "INT8"),
        ("Half", "HALF"),
        ("Float", "FLOAT"),
        ("Row major linear BF16 format", "BF16"),
        ("Row major linear Int64", "INT64"),
        ("Row major linear FP8 format", "FP8"),
        ("Unknown format", None),
    ],
)
def test_dtype_of_format(text, dtype):
    assert dtype_of_format(text) == dtype


def test_inspector_layers_and_their_precision():
    layers = parse_engine_information(json.dumps(INSPECTOR))
    assert [layer.precision for layer in layers] == ["fp32", "int8", "fp16", "fp32", "none"]
    assert layers[0].is_reformat and not layers[1].is_reformat
    assert layers[1].onnx_nodes == (Q,)
    assert layers[1].tactic.startswith("sm90_xmma_gemm_i8f16")
    assert layers[2].onnx_nodes == (SOFTMAX, AV)
    summary = summarize_engine_layers(layers)
    assert summary == {
        "engine_layers": 5,
        "reformat_layers": 1,
        "by_precision": {"fp16": 1, "fp32": 1, "int8": 1, "none": 1},
        "onnx_nodes_in_int8_layers": 1,
    }


def test_inspector_of_tensorrt_11_splits_format_and_data_type():
    text = json.dumps({
        "Layers": [{
            "Name": Q, "LayerType": "CaskGemmMatrixMultiply", "Metadata": meta(Q),
            "Inputs": [{"Name": "x_q", "Format": "Row major linear INT8 format (kLINEAR)",
                        "DataType": "Int8"}],
            "Outputs": [{"Name": "q", "Format": "Row major linear FP16 format (kLINEAR)",
                         "DataType": "Half"}],
        }],
        "I/O Tensors": [{"Name": "input_ids", "IOMode": "Input", "DataType": "Int64"}],
    })
    (layer,) = parse_engine_information(text)
    assert (layer.input_types, layer.output_types, layer.precision) == (("INT8",), ("HALF",),
                                                                        "int8")


def test_inspector_without_detailed_verbosity():
    layers = parse_engine_information(json.dumps({"Layers": ["a", "b + c"], "Bindings": []}))
    assert [(layer.name, layer.precision) for layer in layers] == [("a", "unknown"),
                                                                     ("b + c", "unknown")]


def test_inspector_garbage_is_an_error():
    with pytest.raises(QuantkitError, match="not JSON"):
        parse_engine_information("Layers: none")


def test_compare_with_plan_reports_what_really_ran():
    layers = parse_engine_information(json.dumps(INSPECTOR))
    result = compare_with_plan(layers, plan())
    # found: Q (int8 as planned), SOFTMAX (fp16 as planned), AV (planned int8, fused into the
    # FP16 Myelin layer), HEAD (planned int8, ran fp32), SHAPE (planned fp16, integer layer)
    assert result["found_in_engine"] == 5
    assert result["as_planned"] == 2
    assert result["planned_int8"] == 6
    assert result["realized_int8"] == 1
    differ = {d["node"]: (d["planned"], d["realized"]) for d in result["differ"]}
    assert differ == {AV: ("int8", "fp16"), HEAD: ("int8", "fp32"), SHAPE: ("fp16", "none")}
