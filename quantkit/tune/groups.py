"""Quantization groups: the MatMul/Gemm nodes of an FP32 graph, grouped per transformer block x
op kind (or one node each), the unit that sensitivity analysis measures and autotune switches.

Kinds follow the module paths that the exporter keeps in node names (GPT-2 and Llama families):

| kind          | Llama                           | GPT-2              |
| ------------- | ------------------------------- | ------------------ |
| ``qkv``       | ``q_proj``, ``k_proj``, ``v_proj`` | ``attn/c_attn``  |
| ``attn_scores`` | the batched attention MatMul ``Q K^T`` (no constant weight) | the same |
| ``attn_values`` | the batched attention MatMul ``P V`` (it reads the Softmax) | the same |
| ``attn_out``  | ``o_proj``                       | ``attn/c_proj``    |
| ``mlp_in``    | ``gate_proj``, ``up_proj``       | ``mlp/c_fc``       |
| ``mlp_down``  | ``down_proj``                    | ``mlp/c_proj``     |
| ``lm_head``   | ``lm_head``                      | ``lm_head``        |

A quantizable node that fits none of them is its block's ``other`` group, so every MatMul/Gemm
belongs to exactly one group. The two attention MatMuls are told apart by the graph, not the
name: ``P V`` is the one with a Softmax among its operands' producers. They quantize very
differently (probabilities in [0, 1] against rotated queries and keys), so they are separate
kinds, each with its own calibration method.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from quantkit.errors import QuantkitError
from quantkit.plan import int8_capable

GRANULARITIES = ("group", "op")
KIND_ORDER = ("qkv", "attn_scores", "attn_values", "attn_out", "mlp_in", "mlp_down", "other",
              "lm_head")
_SOFTMAX_DEPTH = 4  # producers searched from an attention MatMul's operands for its Softmax
_BLOCK = re.compile(r"/(layers|h|blocks|layer|decoder\.layers)\.(\d+)/")
_KIND_SEGMENTS = {
    "qkv": {"q_proj", "k_proj", "v_proj", "c_attn", "qkv_proj", "query_key_value", "Wqkv",
            "query", "key", "value"},
    "attn_out": {"o_proj", "out_proj", "dense"},
    "mlp_in": {"gate_proj", "up_proj", "c_fc", "fc1", "w1", "w3", "gate_up_proj",
               "dense_h_to_4h"},
    "mlp_down": {"down_proj", "fc2", "w2", "dense_4h_to_h"},
}


class MatMulNode(NamedTuple):
    """What grouping needs of one MatMul/Gemm: its name, whether one operand is a constant
    weight, and whether an operand comes from a Softmax (attention probabilities)."""

    name: str
    constant_weight: bool
    reads_softmax: bool = False


@dataclass(frozen=True)
class QuantGroup:
    """Nodes that are switched to INT8 together. ``block`` is None outside transformer blocks."""

    name: str  # e.g. "layers.3.mlp_down", "lm_head", or a node name at op granularity
    kind: str
    block: int | None
    nodes: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "block": self.block,
                "nodes": list(self.nodes)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QuantGroup:
        block = data.get("block")
        return cls(str(data["name"]), str(data["kind"]),
                   None if block is None else int(block), tuple(data["nodes"]))


def node_kind(name: str, has_constant_weight: bool, reads_softmax: bool = False) -> str:
    """The op kind of a MatMul/Gemm node from its module path and, for the attention MatMuls,
    whether it reads the Softmax (see the module docstring)."""
    segments = [s for s in name.split("/") if s]
    if any(s == "lm_head" or s.startswith("lm_head") for s in segments):
        return "lm_head"
    in_attn = any(s in {"attn", "self_attn", "attention", "self_attention"} for s in segments)
    in_mlp = any(s in {"mlp", "feed_forward", "ffn"} for s in segments)
    if not has_constant_weight:
        if in_attn or not in_mlp:
            return "attn_values" if reads_softmax else "attn_scores"
        return "other"
    for segment in reversed(segments):
        if segment == "c_proj":
            return "attn_out" if in_attn else "mlp_down"
        for kind, names in _KIND_SEGMENTS.items():
            if segment in names:
                return kind
    return "other"


def block_of(name: str) -> tuple[str, int] | None:
    """``("layers", 3)`` for a node under ``/layers.3/``; None outside transformer blocks."""
    match = _BLOCK.search(name)
    if match is None:
        return None
    return match.group(1), int(match.group(2))


def _reads_softmax(node: Any, producers: Mapping[str, Any]) -> bool:
    """Whether a Softmax is among the producers of ``node``'s operands, within a few ops and
    without crossing another MatMul/Gemm (so never into an earlier layer)."""
    frontier = [producers.get(t) for t in node.input[:2]]
    for _ in range(_SOFTMAX_DEPTH):
        parents = []
        for producer in frontier:
            if producer is None or producer.op_type in ("MatMul", "Gemm"):
                continue
            if producer.op_type == "Softmax":
                return True
            parents += [producers.get(t) for t in producer.input]
        frontier = parents
    return False


def quantizable_nodes(model: Any) -> list[MatMulNode]:
    """Every MatMul/Gemm of ``model`` that has an INT8 form (not the online rotations), in graph
    order. A weight is constant when it is an initializer or a Transpose of one (a tied LM
    head)."""
    from quantkit.graph_edit import constant_weight

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    out = []
    for node in graph.node:
        if not int8_capable(node.name, node.op_type):
            continue
        constant = any(constant_weight(t, inits, producers) is not None for t in node.input[:2])
        out.append(MatMulNode(node.name, constant,
                              not constant and _reads_softmax(node, producers)))
    return out


def make_groups(nodes: Iterable[tuple[str, bool] | tuple[str, bool, bool]],
                granularity: str = "group") -> list[QuantGroup]:
    """Groups in a stable order: blocks ascending, kinds in ``KIND_ORDER``, then the rest.
    ``nodes``: ``MatMulNode`` values or plain ``(name, constant_weight[, reads_softmax])``."""
    if granularity not in GRANULARITIES:
        raise QuantkitError(f"unknown granularity '{granularity}'",
                            f"use one of: {', '.join(GRANULARITIES)}")
    members: dict[tuple[int, int, str], list[str]] = {}
    meta: dict[tuple[int, int, str], tuple[str, str, int | None]] = {}
    for entry in nodes:
        name, constant, softmax = MatMulNode(*entry)
        kind = node_kind(name, constant, softmax)
        block = block_of(name)
        index = block[1] if block is not None else None
        order = (index if index is not None else 1 << 30, KIND_ORDER.index(kind))
        if granularity == "op":
            key = (*order, name)
            group_name = name
        else:
            prefix = f"{block[0]}.{block[1]}." if block is not None else ""
            group_name = f"{prefix}{kind}"
            key = (*order, group_name)
        members.setdefault(key, []).append(name)
        meta[key] = (group_name, kind, index)
    if not members:
        raise QuantkitError("the model has no MatMul/Gemm nodes to quantize")
    groups = []
    for key in sorted(members):
        group_name, kind, index = meta[key]
        groups.append(QuantGroup(group_name, kind, index, tuple(members[key])))
    return groups


def groups_of_model(model: Any, granularity: str = "group") -> list[QuantGroup]:
    return make_groups(quantizable_nodes(model), granularity)
