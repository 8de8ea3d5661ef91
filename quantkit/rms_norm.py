"""RMSNorm in the form ONNX Runtime fuses.

torch's exporter writes ``x * rsqrt(mean(x^2) + eps)`` as ``Mul(x, Reciprocal(Sqrt(a)))``.
ONNX Runtime's SimplifiedLayerNormalization fusion matches ``Div(x, Sqrt(a))`` only, so every
RMSNorm of a Llama-family export stayed seven small ops (Pow, ReduceMean, Add, Sqrt, Reciprocal,
Mul, Mul), which dominate a one-token decode step. ``divide_by_root`` rewrites the pair into one
standard Div (TensorRT reads it as well), keeping the Mul's node and output names so precision
plans and calibration tables name the same tensors; the division rounds once where the product
of a reciprocal rounded twice (a difference far inside the export's 1e-4 check).
"""

from __future__ import annotations

from typing import Any

from quantkit.graph_edit import graph_index


def divide_by_root(graph: Any) -> int:
    """Rewrite each ``Mul(x, Reciprocal(Sqrt(a)))`` whose Reciprocal feeds nothing else into
    ``Div(x, Sqrt(a))`` in place; return how many were rewritten."""
    producers, consumers, _ = graph_index(graph)
    outputs = {o.name for o in graph.output}
    dropped: set[str] = set()  # the output names of the Reciprocals made redundant
    for node in graph.node:
        if node.op_type != "Mul" or node.domain not in ("", "ai.onnx"):
            continue
        for k, name in enumerate(node.input):
            reciprocal = producers.get(name)
            if (reciprocal is None or reciprocal.op_type != "Reciprocal"
                    or len(consumers.get(name, [])) != 1 or name in outputs):
                continue
            root = producers.get(reciprocal.input[0])
            if root is None or root.op_type != "Sqrt":
                continue
            numerator = node.input[1 - k]
            node.op_type = "Div"
            del node.input[:]
            node.input.extend([numerator, reciprocal.input[0]])
            dropped.add(reciprocal.output[0])
            break
    if dropped:
        kept = [n for n in graph.node if not (n.op_type == "Reciprocal" and n.output[0] in dropped)]
        del graph.node[:]
        graph.node.extend(kept)
    return len(dropped)


__all__ = ["divide_by_root"]
