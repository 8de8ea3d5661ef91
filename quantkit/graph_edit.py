"""Small helpers for the ONNX rewrites (SmoothQuant, rotation): who produces and reads each
tensor, and removing what a rewrite left unused."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

PASS_THROUGH = ("Reshape", "Flatten", "Squeeze", "Unsqueeze")  # ops that only move values


def graph_index(graph: Any) -> tuple[dict[str, Any], dict[str, list[Any]], dict[str, Any]]:
    """(producer of each tensor, its consumers, the initializers by name)."""
    producers = {out: n for n in graph.node for out in n.output}
    consumers: dict[str, list[Any]] = defaultdict(list)
    for n in graph.node:
        for name in n.input:
            consumers[name].append(n)
    inits = {t.name: t for t in graph.initializer}
    return producers, consumers, inits


def drop_unused(graph: Any) -> None:
    """Remove initializers and Transpose nodes nothing reads any more."""
    while True:
        used = {name for n in graph.node for name in n.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if n.op_type == "Transpose"
                and not any(o in used for o in n.output)]
        for node in dead:
            graph.node.remove(node)
        if not dead:
            break
    used = {name for n in graph.node for name in n.input}
    keep = [t for t in graph.initializer if t.name in used]
    if len(keep) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(keep)
