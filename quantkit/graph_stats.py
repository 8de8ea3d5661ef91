"""Measurements of an ONNX graph: the multiply-accumulates of its linear layers (MatMul/Gemm) for
one forward pass, the share of them an engine runs in INT8, the Q/DQ pairs feeding each node, the
element type of every tensor, and the as-built precisions of an unmodified FP32 graph.

Kept apart from the rewrite that changes graphs (:mod:`quantkit.qdq`): builds, autotune and tests
measure graphs, rewritten or not, and the rewrite itself only reads element types from here.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from quantkit.graph_edit import (
    constant_weight,
    node_attrs,
    unoptimized_session,
    zeros_for_float_weights,
)
from quantkit.plan import QUANTIZABLE_OP_TYPES, Precision


def _elem_types(model: Any) -> dict[str, int]:
    """Element type of every tensor, from the graph and ONNX shape inference."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # inference is best effort: fall back to the graph's own value_info
        inferred = model
    types: dict[str, int] = {}
    graph = inferred.graph
    for info in list(graph.value_info) + list(graph.input) + list(graph.output):
        if info.type.HasField("tensor_type"):
            types[info.name] = info.type.tensor_type.elem_type
    for init in model.graph.initializer:
        types[init.name] = init.data_type
    return types


def float_node_precisions(model: Any) -> dict[str, str]:
    """``fp32`` for every node that reads or writes a float32 tensor, ``none`` for the rest
    (shape arithmetic): the as-built record of an unmodified FP32 graph."""
    types = _elem_types(model)
    return {
        node.name: "fp32" if any(types.get(t) == 1 for t in [*node.input, *node.output] if t)
        else "none"
        for node in model.graph.node
    }


# -- MACs and coverage -------------------------------------------------------------------------
def linear_layer_macs(model_path: Path, seq_len: int, batch: int = 1) -> dict[str, int]:
    """Multiply-accumulates of every MatMul/Gemm node for one ``batch x seq_len`` forward pass.

    Shapes come from running the FP32 graph once in ONNX Runtime on dummy ids with a ``Shape``
    node added after each operand (so every shape is concrete, whatever the exporter did with
    reshapes); MACs = broadcast batch dims x M x K x N. The weights are zeros made when they
    are read (``zeros_for_float_weights``): shapes do not depend on them, and the run holds a
    node's weights at a time instead of the model's (a 1.1B model's 4.4 GB and their prepacked
    copies); constant operands' shapes are read from the graph.
    """
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(model_path), load_external_data=False)  # weights stay on disk
    targets = [n for n in model.graph.node if n.op_type in QUANTIZABLE_OP_TYPES]
    inits = {t.name: t for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output if o}
    # a constant operand's shape is in the graph; a Shape node on it would be a leaf that ONNX
    # Runtime may run first, holding every weight from the start of the run
    shapes: dict[str, list[int]] = {}
    for node in targets:
        for tensor in node.input[:2]:
            weight = constant_weight(tensor, inits, producers)
            if weight is not None:
                dims = [int(d) for d in inits[weight[0]].dims]
                shapes[tensor] = dims if weight[1] is None else [dims[p] for p in weight[1]]
    zeros_for_float_weights(model.graph)
    shape_outputs: dict[str, str] = {}
    for node in targets:
        for tensor in node.input[:2]:
            if tensor in shapes or tensor in shape_outputs:
                continue
            name = f"{tensor}/__qk_shape"
            model.graph.node.append(helper.make_node("Shape", [tensor], [name]))
            model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.INT64, None))
            shape_outputs[tensor] = name
    feeds = _dummy_feeds(model, batch, seq_len)
    # in the graph's order: each zero-filled weight is made just before its reader and freed
    # after it (ONNX Runtime's default order made them all first: 2.9 GB at 1.1B, not 0.65)
    session = unoptimized_session(model, Path(model_path).parent, in_node_order=True)
    names = list(shape_outputs.values())
    values = dict(zip(shape_outputs, session.run(names, feeds), strict=True))
    shapes.update({t: [int(d) for d in v] for t, v in values.items()})
    return {node.name: _matmul_macs(node, shapes[node.input[0]], shapes[node.input[1]])
            for node in targets}


def _matmul_macs(node: Any, a: list[int], b: list[int]) -> int:
    if node.op_type == "Gemm":
        attrs = node_attrs(node)
        m, k = (a[1], a[0]) if attrs.get("transA", 0) else (a[0], a[1])
        n = b[0] if attrs.get("transB", 0) else b[1]
        return m * k * n
    if len(a) == 1:
        a = [1, a[0]]
    if len(b) == 1:
        b = [b[0], 1]
    m, k, n = a[-2], a[-1], b[-1]
    batch_a, batch_b = a[:-2], b[:-2]
    width = max(len(batch_a), len(batch_b))
    batch_a = [1] * (width - len(batch_a)) + batch_a
    batch_b = [1] * (width - len(batch_b)) + batch_b
    batch = math.prod(max(x, y) for x, y in zip(batch_a, batch_b, strict=True))
    return batch * m * k * n


PAST_PREFIX = "past_key_values."  # quantkit.export_cache's past inputs


def _dummy_feeds(model: Any, batch: int, seq_len: int) -> dict[str, np.ndarray]:
    from onnx import helper

    initializers = {t.name for t in model.graph.initializer}
    feeds: dict[str, np.ndarray] = {}
    for info in model.graph.input:
        if info.name in initializers:
            continue
        dims = info.type.tensor_type.shape.dim
        shape = []
        for i, dim in enumerate(dims):
            if dim.HasField("dim_value"):
                shape.append(int(dim.dim_value))
            elif i == 0:
                shape.append(batch)
            else:  # a KV-cache graph's past is empty: the forward pass of a plain graph
                shape.append(0 if info.name.startswith(PAST_PREFIX) else seq_len)
        dtype = helper.tensor_dtype_to_np_dtype(info.type.tensor_type.elem_type)
        feeds[info.name] = np.ones(shape, dtype=dtype)
    return feeds


def int8_coverage(macs: Mapping[str, int], as_built: Mapping[str, str]) -> float:
    """Share of linear-layer MACs (all MatMul/Gemm nodes) that run in INT8."""
    total = sum(macs.values())
    if total == 0:
        return 0.0
    return sum(v for k, v in macs.items() if as_built.get(k) == Precision.INT8.value) / total


def count_qdq(model: Any) -> dict[str, Counter[str]]:
    """For each node that reads a DequantizeLinear output: how many activation pairs
    (Q -> DQ) and weight DQs (DQ of an initializer) feed it. For tests and ``plan show``."""
    producers = {o: n for n in model.graph.node for o in n.output}
    inits = {t.name for t in model.graph.initializer}
    result: dict[str, Counter[str]] = defaultdict(Counter)
    for node in model.graph.node:
        for tensor in node.input:
            dq = producers.get(tensor)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            source = dq.input[0]
            q = producers.get(source)
            if source in inits:
                result[node.name]["weight"] += 1
            elif q is not None and q.op_type == "QuantizeLinear":
                result[node.name]["activation"] += 1
    return dict(result)

