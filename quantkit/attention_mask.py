"""Drop the exporter's softmax NaN guards by making sure no attention row is fully masked.

torch's ONNX exporter writes attention as ``Softmax(scores + mask)`` followed by
``Where(IsNaN(p), 0, p)``: a query row whose keys are all masked (a padding position in a
left-padded batch) would give NaN, and the guard turns it into zeros. The guard costs a full
pass over every [batch, heads, query, key] probability tensor per layer — on SmolLM2-135M at
1 x 512, 12 % of a forward pass on a CPU (``benchmarks/profile_ops.py``), FP32 and INT8 alike.

The same safety is cheaper one step earlier: let every query attend to its own position. Real
tokens already do (causality keeps the diagonal, and their own key is valid), so their outputs
do not change; only padding rows, whose outputs nothing reads, now average their own value
instead of being zeroed. With no row fully masked, softmax cannot give NaN in any precision
(float16 included, where the mask's float32 minimum becomes -inf), and the guards are dead.

The rewrite is all or nothing: where a guard's softmax is not fed ``scores + Where(mask, 0,
negative)`` the graph is left as it was.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from quantkit.graph_edit import graph_index, replace_nodes

DIAGONAL_PREFIX = "/attention_mask_diagonal"


def _constant_value(name: str, inits: dict[str, Any], producers: dict[str, Any]) -> Any:
    """The value of an initializer or Constant node output, else None."""
    from onnx import numpy_helper

    if name in inits:
        return numpy_helper.to_array(inits[name])
    node = producers.get(name)
    if node is not None and node.op_type == "Constant":
        for attr in node.attribute:
            if attr.name == "value":
                return numpy_helper.to_array(attr.t)
    return None


def _is_scalar(value: Any, test: Any) -> bool:
    return value is not None and np.asarray(value).size == 1 and bool(test(float(
        np.asarray(value).reshape(-1)[0])))


def _find_guards(graph: Any) -> list[tuple[int, int, int]] | None:
    """Node indices of (guard Where, its IsNaN, the mask Where feeding the softmax) for every
    guard; None when any guard does not have the shape this rewrite understands."""
    producers, consumers, inits = graph_index(graph)
    index = {node.output[0]: i for i, node in enumerate(graph.node) if node.output}
    found = []
    for i, node in enumerate(graph.node):
        if node.op_type != "Where" or len(node.input) != 3:
            continue
        isnan = producers.get(node.input[0])
        if isnan is None or isnan.op_type != "IsNaN" or isnan.input[0] != node.input[2]:
            continue
        softmax = producers.get(node.input[2])
        if softmax is None or softmax.op_type != "Softmax":
            return None
        if not _is_scalar(_constant_value(node.input[1], inits, producers), lambda v: v == 0):
            return None
        add = producers.get(softmax.input[0])
        if add is None or add.op_type != "Add":
            return None
        masks = [producers.get(t) for t in add.input]
        mask_where = next((m for m in masks if m is not None and m.op_type == "Where"
                           and _is_scalar(_constant_value(m.input[1], inits, producers),
                                          lambda v: v == 0)
                           and _is_scalar(_constant_value(m.input[2], inits, producers),
                                          lambda v: v < -1e4)), None)
        if mask_where is None or len(consumers[isnan.output[0]]) != 1:
            return None
        found.append((i, index[isnan.output[0]], index[mask_where.output[0]]))
    return found


def _diagonal_nodes(mask: str, index: int) -> tuple[list[Any], str]:
    """Nodes computing ``mask OR (query i may see key past+i)`` for a [..., query, key] bool
    mask; queries are the last positions of the keys (past + new tokens). Tensors are named
    like the exporter's: ``<node name>_output_0``."""
    from onnx import TensorProto, helper

    p = f"{DIAGONAL_PREFIX}{'' if index == 0 else f'_{index}'}"
    nodes: list[Any] = []

    def node(op: str, name: str, inputs: list[str], **attrs: Any) -> str:
        out = f"{p}/{name}_output_0"
        nodes.append(helper.make_node(op, inputs, [out], name=f"{p}/{name}", **attrs))
        return out

    def const(name: str, value: int | list[int]) -> str:
        dims = [] if isinstance(value, int) else [len(value)]
        vals = [value] if isinstance(value, int) else value
        return node("Constant", name, [], value=helper.make_tensor(
            f"{p}/{name}_value", TensorProto.INT64, dims, vals))

    zero, one = const("Zero", 0), const("One", 1)
    shape = node("Shape", "Shape", [mask], start=-2)  # [queries, keys]
    queries = node("Gather", "GatherQueries", [shape, zero], axis=0)
    keys = node("Gather", "GatherKeys", [shape, one], axis=0)
    past = node("Sub", "Sub", [keys, queries])
    rows = node("Unsqueeze", "UnsqueezeRows",
                [node("Range", "RangeRows", [past, keys, one]), const("AxisOne", [1])])
    cols = node("Unsqueeze", "UnsqueezeCols",
                [node("Range", "RangeCols", [zero, keys, one]), const("AxisZero", [0])])
    diagonal = node("Equal", "Equal", [rows, cols])
    return nodes, node("Or", "Or", [mask, diagonal])


def drop_softmax_nan_guards(graph: Any) -> int:
    """Unmask each query's own position and remove the softmax NaN guards, in place; returns
    how many guards went (0: the graph is unchanged)."""
    guards = _find_guards(graph)
    if not guards:
        return 0
    nodes = list(graph.node)
    graph_outputs = {o.name for o in graph.output}
    if any(nodes[where].output[0] in graph_outputs for where, _, _ in guards):
        return 0
    new_mask: dict[str, str] = {}  # bool mask -> the mask with the diagonal let through
    insert_before: dict[int, list[Any]] = {}
    for _, _, mask_where in sorted(guards, key=lambda g: g[2]):
        source = nodes[mask_where].input[0]
        if source not in new_mask:
            inserted, new_mask[source] = _diagonal_nodes(source, len(new_mask))
            insert_before[mask_where] = inserted
    mask_where_outputs = {nodes[g[2]].output[0] for g in guards}
    renames = {nodes[where].output[0]: nodes[where].input[2] for where, _, _ in guards}
    dead = {i for where, isnan, _ in guards for i in (where, isnan)}
    rewritten = []
    for i, original in enumerate(nodes):
        if i in dead:
            continue
        rewritten.extend(insert_before.get(i, []))
        rewritten.append(original)
    replace_nodes(graph, rewritten)
    for node in graph.node:  # the copies: rewire them
        for k, name in enumerate(node.input):
            if name in renames:
                node.input[k] = renames[name]
            elif k == 0 and node.output[0] in mask_where_outputs:
                node.input[k] = new_mask[name]
    return len(guards)
