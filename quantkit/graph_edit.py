"""Small helpers for the ONNX rewrites (Q/DQ, SmoothQuant, rotation, GPTQ): who produces and reads
each tensor, which tensor is a quantizable constant weight or a view of a calibrated one, a node's
attributes, removing what a rewrite left unused, and running a graph with inner tensors as
outputs."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

PASS_THROUGH = ("Reshape", "Flatten", "Squeeze", "Unsqueeze")  # ops that only move values
# ops whose output holds exactly the values of their first input (same range)
_ALIAS_OPS = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity"})
_TOKEN_AXES = (0, 1, -2, -3)  # batch and sequence axes of a [batch, seq, channels] activation


def graph_index(graph: Any) -> tuple[dict[str, Any], dict[str, list[Any]], dict[str, Any]]:
    """(producer of each tensor, its consumers, the initializers by name)."""
    producers = {out: n for n in graph.node for out in n.output}
    consumers: dict[str, list[Any]] = defaultdict(list)
    for n in graph.node:
        for name in n.input:
            consumers[name].append(n)
    inits = {t.name: t for t in graph.initializer}
    return producers, consumers, inits


def selects_tokens(node: Any, tensor: str, inits: dict[str, Any]) -> bool:
    """Whether ``node`` is a Slice of the [batch, seq, channels] activation ``tensor`` along the
    batch or sequence axes only, keeping every channel: the KV-cache graph's last-position
    slice before the LM head (``logits_to_keep``). A rewrite that scales or rotates channels
    passes through it as through a reshape."""
    from onnx import numpy_helper

    if node.op_type != "Slice" or node.input[0] != tensor or len(node.input) < 4 \
            or node.input[3] not in inits:
        return False
    axes = numpy_helper.to_array(inits[node.input[3]]).reshape(-1)
    return len(axes) > 0 and all(int(a) in _TOKEN_AXES for a in axes)


def replace_nodes(graph: Any, nodes: Iterable[Any]) -> None:
    """Make ``nodes`` (copied: they may be the graph's own) the graph's node list."""
    from onnx import NodeProto

    copies = []
    for node in nodes:
        copy = NodeProto()
        copy.CopyFrom(node)
        copies.append(copy)
    del graph.node[:]
    graph.node.extend(copies)


def drop_unused(graph: Any, op_types: Iterable[str] = ("Transpose",)) -> None:
    """Remove initializers, and nodes of ``op_types``, that nothing reads any more."""
    removable = set(op_types)
    while True:
        used = {name for n in graph.node for name in n.input} | {o.name for o in graph.output}
        alive = [n for n in graph.node if n.op_type not in removable
                 or any(o in used for o in n.output)]
        if len(alive) == len(graph.node):
            break
        replace_nodes(graph, alive)  # one rebuild, not a search per removed node
    used = {name for n in graph.node for name in n.input}
    keep = [t for t in graph.initializer if t.name in used]
    if len(keep) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(keep)


def keep_ancestors(graph: Any, tensors: Iterable[str]) -> None:
    """Drop every node (and initializer) that none of ``tensors`` depends on. A graph with
    subgraphs (If/Loop bodies read outer names implicitly) is left whole."""
    if any(a.type in (a.GRAPH, a.GRAPHS) for n in graph.node for a in n.attribute):
        return
    producer = {o: n for n in graph.node for o in n.output}
    needed: set[int] = set()
    stack = [producer[t] for t in tensors if t in producer]
    while stack:
        node = stack.pop()
        if id(node) in needed:
            continue
        needed.add(id(node))
        stack.extend(producer[i] for i in node.input if i in producer)
    kept = [n for n in graph.node if id(n) in needed]
    del graph.node[:]
    graph.node.extend(kept)
    drop_unused(graph, op_types=())


def exposing_session(onnx_path: Path, tensors: Iterable[str], *, only: bool = False) -> Any:
    """An ONNX Runtime CPU session of the FP32 graph with ``tensors`` added as outputs, graph
    optimizations off (so every inner tensor still exists under its name). ``only``: ``tensors``
    are the sole outputs and the nodes they do not depend on are dropped (their weights are
    never loaded)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    tensors = list(tensors)
    if only:
        del model.graph.output[:]
        keep_ancestors(model.graph, tensors)
    known = {o.name for o in model.graph.output}
    for name in tensors:
        if name not in known:
            model.graph.output.append(onnx.ValueInfoProto(name=name))
            known.add(name)
    return unoptimized_session(model, Path(onnx_path).parent)


def unoptimized_session(model: Any, source_dir: Path, in_node_order: bool = False) -> Any:
    """An ONNX Runtime CPU session of an edited graph, graph optimizations off; weights it keeps
    in external data are read from ``source_dir`` (the graph is saved beside a link to them, so
    a model past 2 GB is never serialized). ``in_node_order``: run the nodes in the graph's
    order wherever their inputs allow (ONNX Runtime's priority-based order), not in its default
    order, which may run nodes that read only initializers first."""
    import shutil
    import tempfile

    import onnx
    import onnxruntime as ort

    from quantkit.onnx_io import is_external, link_external_data

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    if in_node_order:
        options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    providers = ["CPUExecutionProvider"]
    if not any(is_external(t) for t in model.graph.initializer):
        return ort.InferenceSession(model.SerializeToString(), options, providers=providers)
    tmp = Path(tempfile.mkdtemp(prefix="quantkit-session-"))
    try:
        link_external_data(model, Path(source_dir), tmp)
        onnx.save_model(model, str(tmp / "model.onnx"))
        return ort.InferenceSession(str(tmp / "model.onnx"), options, providers=providers)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


FLOAT_TYPES = frozenset({1, 10, 11, 16})  # float, float16, double, bfloat16 (TensorProto)


def zeros_for_float_weights(graph: Any, min_bytes: int = 1024) -> int:
    """Replace each float initializer of at least ``min_bytes`` (or kept in external data) by a
    ``ConstantOfShape`` node that makes zeros of its shape and type when the graph runs, and
    return how many. For runs that need every tensor's shape but no weight's value (counting
    MACs): ONNX Runtime then holds the weights of one node at a time instead of the model's,
    and never reads the data file. Small initializers (shape constants) stay as they are."""
    from onnx import TensorProto, helper

    from quantkit.onnx_io import is_external, tensor_bytes

    inputs = {i.name for i in graph.input}
    keep, nodes = [], {}
    for tensor in graph.initializer:
        if (tensor.data_type not in FLOAT_TYPES or tensor.name in inputs
                or not (is_external(tensor) or tensor_bytes(tensor) >= min_bytes)):
            keep.append(tensor)
            continue
        shape = helper.make_tensor(f"{tensor.name}/__zeros_shape", TensorProto.INT64,
                                   [len(tensor.dims)], [int(d) for d in tensor.dims])
        keep.append(shape)
        nodes[tensor.name] = helper.make_node(
            "ConstantOfShape", [shape.name], [tensor.name], name=f"{tensor.name}/__zeros",
            value=helper.make_tensor("value", tensor.data_type, [1], [0]))
    if not nodes:
        return 0
    del graph.initializer[:]
    graph.initializer.extend(keep)
    count, ordered = len(nodes), []
    for node in list(graph.node):  # each just before its first reader: made when needed
        ordered.extend(nodes.pop(name) for name in node.input if name in nodes)
        ordered.append(node)
    # the rest are read by no node's inputs (by a subgraph, or not at all): first, to be safe
    del graph.node[:]
    graph.node.extend([*nodes.values(), *ordered])
    return count


def node_attrs(node: Any) -> dict[str, Any]:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def constant_weight(tensor: str, inits: Mapping[str, Any], producers: Mapping[str, Any]
                    ) -> tuple[str, tuple[int, ...] | None] | None:
    """(initializer, transpose perm or None) if ``tensor`` is a weight that can be quantized: an
    initializer, or a Transpose of one (a tied LM head)."""
    if tensor in inits:
        return tensor, None
    node = producers.get(tensor)
    if node is not None and node.op_type == "Transpose" and node.input[0] in inits:
        rank = len(inits[node.input[0]].dims)
        perm = node_attrs(node).get("perm") or list(reversed(range(rank)))
        return node.input[0], tuple(int(p) for p in perm)
    return None


def range_source(tensor: str, amax: Mapping[str, float],
                 producers: Mapping[str, Any]) -> str | None:
    """The table entry that holds the range of ``tensor``: itself, or the tensor it is a
    Reshape/Transpose/... view of (such ops move values without changing them); None if neither
    is calibrated."""
    seen = 0
    while tensor not in amax:
        node = producers.get(tensor)
        if node is None or node.op_type not in _ALIAS_OPS or seen > 64:
            return None
        tensor = node.input[0]
        seen += 1
    return tensor
