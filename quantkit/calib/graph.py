"""ONNX graph analysis for calibration: which tensors to calibrate, and how to run the graph in
segments so that only a bounded slice of its activations is ever alive.

Pure ``onnx`` (no ONNX Runtime). Used by :mod:`quantkit.calib.collect`.

* **Activations** are tensors that depend on a graph input: initializers, ``Constant`` outputs
  and whatever is computed from those alone are not. ``tensors="all"`` calibrates every
  floating-point activation of the top-level graph, graph inputs and outputs included;
  ``"quantizable"`` only the activation inputs of MatMul / Gemm (the two attention batched MatMuls
  included, where both inputs are activations; the online rotations excluded, they stay FP32).
* **Aliases**: Reshape, Transpose, Squeeze, Unsqueeze, Flatten, Identity and same-type Cast only
  move values, so their output holds exactly the values of their input and gets the same
  histogram. Only the *root* of such a chain is fetched from ONNX Runtime and histogrammed.
* **Segments**: the nodes needed for the roots, in topological order, are cut into consecutive
  segments with at most ``max_tensors`` roots each. Each segment becomes a small model whose
  inputs are the values it needs from earlier segments (or the graph inputs) and whose outputs are
  its roots plus the values later segments need. Run one after the other, a segment's
  activations can be histogrammed and dropped before the next segment runs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from quantkit.errors import QuantkitError
from quantkit.plan import is_rotation

FLOAT_TYPES = {1: "float32", 10: "float16", 11: "float64", 16: "bfloat16"}
QUANTIZABLE_OPS = {("", "MatMul"), ("", "Gemm"), ("com.microsoft", "FusedMatMul")}
# op -> index of the input whose values the output holds unchanged (only rearranged)
ALIAS_OPS = {"Reshape": 0, "Transpose": 0, "Squeeze": 0, "Unsqueeze": 0, "Flatten": 0,
             "Identity": 0}
# Nodes without (activation) inputs that are nevertheless not constants.
NONDETERMINISTIC_OPS = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                        "Multinomial", "Bernoulli"}
TENSOR_MODES = ("all", "quantizable")


def _domain(node: Any) -> str:
    return "" if node.domain in ("", "ai.onnx") else node.domain


def _subgraph_refs(node: Any) -> set[str]:
    """Outer-scope names a node's subgraphs (If/Loop/Scan bodies) read."""
    refs: set[str] = set()
    for attr in node.attribute:
        graphs = list(attr.graphs) + ([attr.g] if attr.HasField("g") else [])
        for g in graphs:
            defined = {i.name for i in g.input} | {t.name for t in g.initializer}
            for inner in g.node:
                defined.update(o for o in inner.output if o)
            for inner in g.node:
                for name in list(inner.input) + sorted(_subgraph_refs(inner)):
                    if name and name not in defined:
                        refs.add(name)
    return refs


def node_inputs(node: Any) -> list[str]:
    """Explicit (non-empty) inputs plus the outer-scope names of its subgraphs."""
    names = [n for n in node.input if n]
    extra = sorted(_subgraph_refs(node) - set(names))
    return names + extra


@dataclass
class GraphInfo:
    """What calibration needs to know about a model's top-level graph."""

    nodes: list[Any]  # topologically sorted
    inputs: dict[str, int]  # graph input (not initializer) -> elem type
    outputs: list[str]
    initializers: set[str]
    elem_types: dict[str, int]
    producer: dict[str, int]  # tensor -> index into nodes
    constant: set[str]  # initializers and everything computed from them alone
    node_inputs: list[list[str]] = field(default_factory=list)

    def is_float(self, name: str) -> bool:
        return self.elem_types.get(name) in FLOAT_TYPES

    def is_activation(self, name: str) -> bool:
        return name not in self.constant and (name in self.inputs or name in self.producer)


def analyse(model: Any) -> GraphInfo:
    """Sort the graph, infer element types where missing, and find the constant tensors."""
    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    inputs = {i.name: i.type.tensor_type.elem_type for i in graph.input
              if i.name not in initializers}
    elem_types = _elem_types(model)
    nodes = _toposort(list(graph.node), set(inputs) | initializers)
    ins = [node_inputs(n) for n in nodes]
    producer = {o: idx for idx, n in enumerate(nodes) for o in n.output if o}
    constant = set(initializers)
    for node, names in zip(nodes, ins, strict=True):
        if node.op_type in NONDETERMINISTIC_OPS:
            continue
        if all(n in constant for n in names):
            constant.update(o for o in node.output if o)
    missing = [o for n in nodes for o in n.output if o and o not in elem_types]
    if missing:
        raise QuantkitError(
            f"cannot tell the element type of {len(missing)} tensors (first: {missing[0]!r})",
            "ONNX shape inference failed on this model; re-export it",
        )
    return GraphInfo(nodes, inputs, [o.name for o in graph.output], initializers, elem_types,
                     producer, constant, ins)


def _elem_types(model: Any) -> dict[str, int]:
    graph = model.graph
    types: dict[str, int] = {}
    for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            types[vi.name] = vi.type.tensor_type.elem_type
    for t in graph.initializer:
        types[t.name] = t.data_type
    needed = [o for n in graph.node for o in n.output if o and o not in types]
    if needed:
        types.update(_infer_types(model, types))
    return types


def _infer_types(model: Any, known: dict[str, int]) -> dict[str, int]:
    """Type inference on a weightless copy (initializers become typed graph inputs)."""
    import onnx

    graph = model.graph
    skeleton = onnx.ModelProto()
    skeleton.ir_version = model.ir_version
    skeleton.opset_import.extend(model.opset_import)
    skeleton.functions.extend(model.functions)
    g = skeleton.graph
    g.name = graph.name
    g.node.extend(graph.node)
    g.input.extend(graph.input)
    g.output.extend(graph.output)
    g.value_info.extend(graph.value_info)
    listed = {i.name for i in graph.input}
    for t in graph.initializer:
        if t.name not in listed:
            g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton, strict_mode=False)
    except Exception as exc:  # onnx raises several types for graphs it cannot infer
        raise QuantkitError(f"ONNX shape inference failed: {exc}") from None
    out: dict[str, int] = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            out.setdefault(vi.name, vi.type.tensor_type.elem_type)
    return out


def _toposort(nodes: list[Any], available: set[str]) -> list[Any]:
    """Kahn's algorithm, keeping the file's order among ready nodes."""
    deps = [set(node_inputs(n)) - available for n in nodes]
    producers: dict[str, int] = {}
    for idx, n in enumerate(nodes):
        for o in n.output:
            if o:
                producers[o] = idx
    waiting: dict[int, list[int]] = {}
    remaining = []
    for idx, d in enumerate(deps):
        unknown = [name for name in d if name not in producers]
        if unknown:
            raise QuantkitError(f"node {nodes[idx].name or nodes[idx].op_type!r} reads "
                                f"{unknown[0]!r}, which nothing produces")
        need = {producers[name] for name in d}
        remaining.append(len(need))
        for p in need:
            waiting.setdefault(p, []).append(idx)
    import heapq

    ready = [idx for idx, r in enumerate(remaining) if r == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        idx = heapq.heappop(ready)
        order.append(idx)
        for nxt in waiting.get(idx, ()):
            remaining[nxt] -= 1
            if remaining[nxt] == 0:
                heapq.heappush(ready, nxt)
    if len(order) != len(nodes):
        raise QuantkitError("the ONNX graph has a cycle")
    return [nodes[i] for i in order]


def select_tensors(info: GraphInfo, mode: str) -> list[str]:
    """The tensors to calibrate, graph inputs first, then in topological order."""
    if mode not in TENSOR_MODES:
        raise QuantkitError(f"unknown tensor selection '{mode}'", "use 'all' or 'quantizable'")
    chosen: list[str] = []
    seen: set[str] = set()

    def add(name: str) -> None:
        if name not in seen and info.is_float(name) and info.is_activation(name):
            seen.add(name)
            chosen.append(name)

    if mode == "all":
        for name in info.inputs:
            add(name)
        for node in info.nodes:
            for o in node.output:
                if o:
                    add(o)
        return chosen
    for node in info.nodes:
        if (_domain(node), node.op_type) in QUANTIZABLE_OPS and not is_rotation(node.name):
            for name in [n for n in node.input[:2] if n]:
                add(name)
    return chosen


def alias_roots(info: GraphInfo, tensors: Iterable[str]) -> dict[str, str]:
    """tensor -> the tensor whose values it holds unchanged (itself if none)."""
    roots: dict[str, str] = {}
    for name in tensors:
        root = name
        while root in info.producer:
            node = info.nodes[info.producer[root]]
            src_index = ALIAS_OPS.get(node.op_type) if _domain(node) == "" else None
            if node.op_type == "Cast" and _domain(node) == "":
                to = next((a.i for a in node.attribute if a.name == "to"), None)
                if node.input and to == info.elem_types.get(node.input[0]):
                    src_index = 0
            if src_index is None or len(node.input) <= src_index:
                break
            src = node.input[src_index]
            if not info.is_activation(src) or info.elem_types.get(src) != info.elem_types.get(root):
                break
            root = src
        roots[name] = root
    return roots


@dataclass
class Segment:
    index: int
    nodes: list[Any]
    inputs: list[str]  # values from the graph inputs or earlier segments
    outputs: list[str]  # roots produced here + values later segments read
    roots: list[str]  # the roots among outputs
    initializers: list[str]


def partition(info: GraphInfo, roots: Iterable[str], max_tensors: int,
              weight_bytes: Mapping[str, int] | None = None,
              max_weight_bytes: int | None = None) -> list[Segment]:
    """Cut the nodes needed for ``roots`` into consecutive segments of at most ``max_tensors``
    roots each (see module docs), and, given the initializers' sizes, of at most
    ``max_weight_bytes`` of weights each (a node's weights past the cap start a new segment; a
    single node's weights are never split). Roots that are graph inputs need no segment."""
    if max_tensors < 1:
        raise ValueError("max_tensors must be at least 1")
    wanted = [r for r in dict.fromkeys(roots) if r in info.producer]
    needed: set[int] = set()
    stack = [info.producer[r] for r in wanted]
    while stack:
        idx = stack.pop()
        if idx in needed:
            continue
        needed.add(idx)
        for name in info.node_inputs[idx]:
            if name in info.producer:
                stack.append(info.producer[name])
    root_set = set(wanted)
    sizes = weight_bytes or {}
    groups: list[list[int]] = []
    current: list[int] = []
    count = held = 0
    seen: set[str] = set()
    for idx in sorted(needed):
        new = {n for n in info.node_inputs[idx] if n in sizes and n not in seen}
        extra = sum(sizes[n] for n in new)
        if max_weight_bytes is not None and current and held + extra > max_weight_bytes:
            groups.append(current)
            current, count, held, seen = [], 0, 0, set()
            new = {n for n in info.node_inputs[idx] if n in sizes}
            extra = sum(sizes[n] for n in new)
        current.append(idx)
        seen |= new
        held += extra
        count += sum(1 for o in info.nodes[idx].output if o in root_set)
        if count >= max_tensors:
            groups.append(current)
            current, count, held, seen = [], 0, 0, set()
    if current:  # every needed node precedes a root, so this group ends with one
        groups.append(current)

    consumed = []
    produced = []
    for group in groups:
        made = {o for i in group for o in info.nodes[i].output if o}
        reads = {n for i in group for n in info.node_inputs[i]}
        produced.append(made)
        consumed.append(reads - made)
    segments = []
    for s, group in enumerate(groups):
        later = set().union(*consumed[s + 1:]) if s + 1 < len(groups) else set()
        reads = consumed[s]
        seg_inputs = sorted(n for n in reads if n not in info.initializers)
        inits = sorted(n for n in reads if n in info.initializers)
        seg_roots = [o for i in group for o in info.nodes[i].output if o in root_set]
        outs = list(seg_roots) + sorted((produced[s] & later) - set(seg_roots))
        segments.append(Segment(s, [info.nodes[i] for i in group], seg_inputs, outs, seg_roots,
                                inits))
    return segments


def segment_model(model: Any, info: GraphInfo, segment: Segment) -> Any:
    """A standalone ModelProto for one segment (initializers copied in)."""
    import onnx

    graph = model.graph
    m = onnx.ModelProto()
    m.ir_version = model.ir_version
    m.opset_import.extend(model.opset_import)
    m.functions.extend(model.functions)
    g = m.graph
    g.name = f"{graph.name or 'graph'}_segment{segment.index}"
    g.node.extend(segment.nodes)
    for name in segment.inputs:
        g.input.append(onnx.helper.make_tensor_value_info(name, info.elem_types[name], None))
    for name in segment.outputs:
        g.output.append(onnx.helper.make_tensor_value_info(name, info.elem_types[name], None))
    wanted = set(segment.initializers)
    g.initializer.extend(t for t in graph.initializer if t.name in wanted)
    return m
