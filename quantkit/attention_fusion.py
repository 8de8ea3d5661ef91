"""Fused attention for KV-cache engines on ONNX Runtime: each decoder layer's attention, as the
exporter writes it (the cache concatenated, K/V heads repeated for grouped-query attention,
``MatMul`` → ``Add`` mask → ``Softmax`` → ``MatMul``, ~35 nodes), replaced by one ONNX
``Attention`` node (opset 23) that reads the past and writes the present itself.

Why: a decode step of SmolLM2-135M is bound by per-node overhead and cache copies, not by its
weights (``benchmarks/decode_step.py``); the fused kernel removes the repeat of K/V and most of
the ~2,900 small nodes. What it changes: the attention-score and attention-value MatMuls become
float inside the kernel, so a plan's INT8 decisions for them do not apply in a fused engine (the
manifest lists them; their Q/DQ pairs are dropped). Only the layers that match the pattern
exactly are fused; an FP32 build checks the fused graph against the export over padded prefills
and cached decode steps (``quantkit.cache_transform``'s 1e-4 rule).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np

from quantkit.errors import QuantkitError
from quantkit.graph_edit import drop_unused, graph_index, replace_nodes

ATTENTION_OPSET = 23
ATTENTION_MODES = ("auto", "fused", "graph")
ATTENTION_OP = f"Attention (ONNX opset {ATTENTION_OPSET}, float)"
PAST_PREFIX = "past_key_values."
_QDQ = ("QuantizeLinear", "DequantizeLinear")
# ops the exporter puts between a present tensor and the MatMul that reads it: the repeat of
# K/V heads (Unsqueeze, Expand, Reshape) and the transpose of K (Reshape, Transpose)
_LAYOUT_OPS = frozenset({"Reshape", "Transpose", "Expand", "Unsqueeze", "Squeeze"})


@dataclass(frozen=True)
class FusedLayer:
    """One fused attention: the node written and the float MatMuls it replaced."""

    node: str
    score_matmul: str
    value_matmul: str
    present_key: str
    present_value: str


@dataclass
class AttentionFusion:
    """What ``fuse_cache_attention`` did to a graph."""

    layers: list[FusedLayer] = field(default_factory=list)
    removed_nodes: int = 0
    removed_qdq: int = 0

    @property
    def replaced_matmuls(self) -> list[str]:
        return [name for layer in self.layers for name in (layer.score_matmul,
                                                           layer.value_matmul)]

    def to_dict(self) -> dict[str, Any]:
        return {"op": ATTENTION_OP, "layers": len(self.layers),
                "removed_nodes": self.removed_nodes, "removed_qdq": self.removed_qdq,
                "replaced_matmuls": self.replaced_matmuls}


class _Graph:
    """Producer/consumer/constant lookups over a graph's node list."""

    def __init__(self, graph: Any) -> None:
        from onnx import numpy_helper

        self.graph = graph
        self.producer, self.consumers, self._initializers = graph_index(graph)
        self.inputs = {i.name for i in graph.input}
        self.outputs = {o.name for o in graph.output}
        self._numpy_helper = numpy_helper

    def constant(self, name: str) -> np.ndarray | None:
        """The value of an initializer or a Constant node's output (None when computed)."""
        tensor = self._initializers.get(name)
        if tensor is None:
            node = self.producer.get(name)
            if node is None or node.op_type != "Constant" or not node.attribute:
                return None
            tensor = node.attribute[0].t
        if tensor.data_location == 1:  # external data: never a scalar scale
            return None
        return np.asarray(self._numpy_helper.to_array(tensor))

    def before_qdq(self, name: str) -> tuple[str, list[Any]]:
        """``name`` with any DequantizeLinear(QuantizeLinear(x)) pairs in front of it skipped:
        the float tensor and the Q/DQ nodes passed."""
        passed: list[Any] = []
        node = self.producer.get(name)
        while node is not None and node.op_type == "DequantizeLinear":
            quant = self.producer.get(node.input[0])
            if quant is None or quant.op_type != "QuantizeLinear":
                break
            passed += [node, quant]
            name = quant.input[0]
            node = self.producer.get(name)
        return name, passed

    def after_qdq(self, name: str) -> tuple[Any | None, list[Any]]:
        """The single float consumer of ``name``, through Q/DQ pairs, and the nodes passed."""
        passed: list[Any] = []
        while True:
            users = self.consumers.get(name, [])
            if len(users) != 1 or name in self.outputs:
                return None, passed
            node = users[0]
            if node.op_type not in _QDQ:
                return node, passed
            passed.append(node)
            name = node.output[0]

    def present_above(self, name: str, kind: str) -> Any | None:
        """The ``Concat(past, new)`` that writes a ``present.*.<kind>`` output, found by walking
        up from ``name`` through layout ops only (what the exporter puts between them)."""
        for _ in range(12):
            name, _passed = self.before_qdq(name)
            node = self.producer.get(name)
            if node is None:
                return None
            if node.op_type == "Concat" and name in self.outputs and name.endswith(f".{kind}"):
                if (len(node.input) == 2 and node.input[0] in self.inputs
                        and node.input[0].startswith(PAST_PREFIX)):
                    return node
                return None
            if node.op_type not in _LAYOUT_OPS:
                return None
            name = node.input[0]
        return None

    def scalar_factor(self, name: str) -> tuple[str, float] | None:
        """``(x, c)`` where ``name`` is ``Mul(x, c)`` with a scalar constant ``c``."""
        node = self.producer.get(name)
        if node is None or node.op_type != "Mul":
            return None
        for data, const in ((0, 1), (1, 0)):
            value = self.constant(node.input[const])
            if value is not None and value.size == 1:
                return node.input[data], float(value.reshape(()))
        return None


def _match_layer(g: _Graph, softmax: Any) -> tuple[Any, list[Any]] | None:
    """The Attention node for the attention around ``softmax`` and the nodes it replaces
    directly (the two MatMuls, the present Concats, the Q/DQ pairs around the MatMuls), or
    None when the pattern differs in any way."""
    from onnx import helper

    axis = next((a.i for a in softmax.attribute if a.name == "axis"), -1)
    if axis not in (-1, 3):
        return None
    scores_name, qdq = g.before_qdq(softmax.input[0])
    node = g.producer.get(scores_name)
    mask = ""
    if node is not None and node.op_type == "Add":
        sides = [g.before_qdq(i) for i in node.input]
        kinds = [g.producer.get(name) for name, _ in sides]
        hits = [i for i, k in enumerate(kinds) if k is not None and k.op_type == "MatMul"]
        if len(hits) != 1:
            return None
        mask = node.input[1 - hits[0]]
        qdq += sides[hits[0]][1]
        if len(g.consumers.get(scores_name, [])) != 1:
            return None
        node = kinds[hits[0]]
    if node is None or node.op_type != "MatMul":
        return None
    score_mm = node
    q_side, q_qdq = g.before_qdq(score_mm.input[0])
    k_side, k_qdq = g.before_qdq(score_mm.input[1])
    q_scaled, k_scaled = g.scalar_factor(q_side), g.scalar_factor(k_side)
    if q_scaled is None or k_scaled is None:
        return None
    present_key = g.present_above(k_scaled[0], "key")
    value_mm, out_qdq = g.after_qdq(softmax.output[0])
    if present_key is None or value_mm is None or value_mm.op_type != "MatMul":
        return None
    if g.before_qdq(value_mm.input[0])[0] != softmax.output[0]:
        return None
    v_side, v_qdq = g.before_qdq(value_mm.input[1])
    present_value = g.present_above(v_side, "value")
    if present_value is None:
        return None
    attention = helper.make_node(
        "Attention",
        [q_scaled[0], present_key.input[1], present_value.input[1], mask,
         present_key.input[0], present_value.input[0]],
        [value_mm.output[0], present_key.output[0], present_value.output[0]],
        name=score_mm.name.rsplit("/", 1)[0] + "/Attention",
        scale=q_scaled[1] * k_scaled[1],
    )
    replaced = [score_mm, value_mm, present_key, present_value,
                *qdq, *q_qdq, *k_qdq, *out_qdq, *v_qdq]
    return attention, replaced


def fuse_cache_attention(model: Any) -> AttentionFusion:
    """Replace every matching attention of the KV-cache graph ``model`` (a ModelProto, weights
    loaded or not) in place; nodes left without a consumer are removed, and the default
    domain's opset raised to 23 when anything was fused."""
    graph = model.graph
    g = _Graph(graph)
    fusion = AttentionFusion()
    replacement: dict[int, Any] = {}
    dropped: set[int] = set()
    for softmax in [n for n in graph.node if n.op_type == "Softmax"]:
        matched = _match_layer(g, softmax)
        if matched is None:
            continue
        attention, replaced = matched
        if any(id(n) in dropped for n in replaced):
            continue
        value_mm = replaced[1]
        replacement[id(value_mm)] = attention
        dropped.update(id(n) for n in replaced)
        fusion.layers.append(FusedLayer(attention.name, replaced[0].name, value_mm.name,
                                        attention.output[1], attention.output[2]))
    if not fusion.layers:
        return fusion
    before = len(graph.node)
    qdq_before = sum(1 for n in graph.node if n.op_type in _QDQ)
    replace_nodes(graph, [replacement.get(id(n), n) for n in graph.node
                          if id(n) not in dropped or id(n) in replacement])
    drop_unused(graph, {n.op_type for n in graph.node})  # what only the old attention read
    fusion.removed_qdq = qdq_before - sum(1 for n in graph.node if n.op_type in _QDQ)
    fusion.removed_nodes = before - len(graph.node)
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version < ATTENTION_OPSET:
            opset.version = ATTENTION_OPSET
    return fusion


def is_cache_graph(model: Any) -> bool:
    """Whether ``model`` reads a KV cache (inputs ``past_key_values.*``)."""
    return any(i.name.startswith(PAST_PREFIX) for i in model.graph.input)


@lru_cache(maxsize=1)
def attention_kernel_available() -> str | None:
    """None when this ONNX Runtime runs ONNX ``Attention`` (opset 23) with a past on the CPU,
    else why not (older ONNX Runtime versions have no such kernel)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    shape = ["b", 2, "s", 4]
    past = ["b", 1, "p", 4]
    names = [("q", shape), ("k", ["b", 1, "s", 4]), ("v", ["b", 1, "s", 4]),
             ("m", ["b", 1, "s", "t"]), ("pk", past), ("pv", past)]
    node = helper.make_node("Attention", [n for n, _ in names], ["y", "ok", "ov"], scale=0.5)
    graph = helper.make_graph(
        [node], "probe",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in names],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y", "ok", "ov")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ATTENTION_OPSET)])
    model.ir_version = 10
    try:
        session = ort.InferenceSession(model.SerializeToString(),
                                       providers=["CPUExecutionProvider"])
        feeds = {"q": np.ones((1, 2, 1, 4), np.float32), "k": np.ones((1, 1, 1, 4), np.float32),
                 "v": np.ones((1, 1, 1, 4), np.float32), "m": np.zeros((1, 1, 1, 3), np.float32),
                 "pk": np.ones((1, 1, 2, 4), np.float32), "pv": np.ones((1, 1, 2, 4), np.float32)}
        session.run(None, feeds)
    except Exception as exc:  # NOT_IMPLEMENTED, invalid graph: the version lacks the kernel
        return (f"ONNX Runtime {ort.__version__} cannot run ONNX Attention-{ATTENTION_OPSET} "
                f"with a past: {str(exc).splitlines()[0][:160]}")
    return None


def check_attention_mode(mode: str) -> str:
    if mode not in ATTENTION_MODES:
        raise QuantkitError(f"unknown attention mode '{mode}'",
                            f"use one of: {', '.join(ATTENTION_MODES)}")
    return mode


def fusion_decision(model: Any, mode: str) -> str | None:
    """None when ``model`` may be fused under ``mode`` (a KV-cache graph, a kernel for it),
    else why it stays as exported."""
    check_attention_mode(mode)
    if mode == "graph":
        return "attention=graph: left as exported"
    if not is_cache_graph(model):
        return "not a KV-cache graph"
    return attention_kernel_available()


def check_fused_export(export: Any, scratch_dir: Any) -> dict[str, Any]:
    """The fused float graph of the KV-cache ``export`` against the export itself: written to
    ``scratch_dir`` and compared by ``quantkit.cache_transform.check_cache_equivalent`` (padded
    prefills and cached decode steps, max|dlogits| / max|logits|), then removed."""
    from pathlib import Path

    from quantkit.cache_transform import check_cache_equivalent
    from quantkit.rewrite_io import open_for_rewrite

    target = Path(scratch_dir) / ".attention-check.onnx"
    try:
        with open_for_rewrite(Path(export), Path(scratch_dir)) as source:
            fusion = fuse_cache_attention(source.model)
            if not fusion.layers:
                return {"layers": 0}
            source.save(source.model, target)
            del source.model
        return {"layers": len(fusion.layers), **check_cache_equivalent(Path(export), target)}
    finally:
        target.unlink(missing_ok=True)
        Path(f"{target}.data").unlink(missing_ok=True)


def plan_fusion(export: Any, graph: Any, mode: str, has_cache_layout: bool,
                scratch_dir: Any, *, check: bool = True) -> dict[str, Any]:
    """Whether a build of ``export`` (its weightless ``graph``) fuses attention under ``mode``:
    ``{"fuse": bool, "reason" | "check": ...}``. ``auto`` fuses a KV-cache graph when this ONNX
    Runtime has the kernel, the pattern matches and the fused float graph passes the 1e-4
    check; ``fused`` raises where ``auto`` would not fuse. ``check=False`` leaves the check to
    ``checked_fp32_fusion`` (an FP32 engine is the fused float graph: checked in place)."""
    reason = fusion_decision(graph, mode)
    if reason is None and not has_cache_layout:
        reason = "the export's manifest has no KV-cache layout"
    if reason is not None or not check:
        return _decided(reason, {}, mode)
    return _decided(None, check_fused_export(export, scratch_dir), mode)


def checked_fp32_fusion(export: Any, target: Any, fusion: AttentionFusion,
                        mode: str) -> dict[str, Any]:
    """``plan_fusion``'s answer for an FP32 engine already fused and written at ``target``:
    the 1e-4 check run on the engine itself, so the export is written once."""
    from pathlib import Path

    from quantkit.cache_transform import check_cache_equivalent

    check: dict[str, Any] = {"layers": len(fusion.layers)}
    if fusion.layers:
        check.update(check_cache_equivalent(Path(export), Path(target)))
    return _decided(None, check, mode)


def _decided(reason: str | None, check: dict[str, Any], mode: str) -> dict[str, Any]:
    """The fusion decision from a reason not to fuse or a check's numbers; ``fused`` raises
    where the answer is no."""
    from quantkit.cache_transform import CHECK_TOLERANCE

    if reason is None and check:
        if not check["layers"]:
            reason = "no attention in the graph matches the pattern quantkit fuses"
        elif not check["relative_error"] <= CHECK_TOLERANCE:
            reason = (f"the fused graph does not compute the export's function: "
                      f"max|dlogits|/max|logits| = {check['relative_error']:.2e} "
                      f"(tolerance {CHECK_TOLERANCE:.0e})")
    if reason is not None and mode == "fused":
        raise QuantkitError(f"cannot fuse attention: {reason}",
                            "build with --attention auto or graph")
    return {"fuse": False, "reason": reason} if reason else {"fuse": True, "check": check}


def fuse_rewritten(model: Any, plan: dict[str, Any], mode: str
                   ) -> tuple[AttentionFusion | None, dict[str, Any]]:
    """Fuse the Q/DQ (or FP16) rewrite ``model`` of an export that ``plan_fusion`` cleared:
    the fusion, or None and the plan changed to say why nothing matched (FP16 regions put
    Casts through the pattern); ``fused`` mode raises then."""
    fusion = fuse_cache_attention(model)
    if fusion.layers:
        return fusion, plan
    reason = ("no attention of the rewritten graph matches the pattern (the plan's FP16 "
              "regions put Casts through it)")
    if mode == "fused":
        raise QuantkitError(f"cannot fuse attention: {reason}",
                            "build with --attention auto or graph, or keep attention fp32")
    return None, {"fuse": False, "reason": reason}


def fusion_record(fusion: AttentionFusion, plan: dict[str, Any],
                  as_built: dict[str, str]) -> dict[str, Any]:
    """The engine manifest's ``attention``; marks the replaced MatMuls fp32 in ``as_built``
    (their work is float inside the kernel) and lists those the plan had in INT8."""
    planned_int8 = [n for n in fusion.replaced_matmuls if as_built.get(n) == "int8"]
    for name in fusion.replaced_matmuls:
        if name in as_built:
            as_built[name] = "fp32"
    return {"fused": True, **fusion.to_dict(), "planned_int8_now_float": planned_int8,
            "check": plan.get("check")}
