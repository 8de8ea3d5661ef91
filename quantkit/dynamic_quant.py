"""Dynamic activation quantization for ONNX Runtime engines: ranges measured at run time.

A static INT8 engine quantizes each MatMul input with the scale its calibration table gives
(``QuantizeLinear``/``DequantizeLinear`` pairs, what TensorRT requires). ONNX Runtime also has
integer kernels that find the range of an activation tensor when it runs
(``DynamicQuantizeLinear``: uint8, asymmetric, over [min(x, 0), max(x, 0)] of the whole tensor
of that run) — ``quantize_dynamic``'s form. This rewrite turns a static Q/DQ engine into that
form: every MatMul whose inputs are dequantized int8 values gets

    DynamicQuantizeLinear(x) -> MatMulInteger(xq, W, x_zero, W_zero) -> Cast
        -> Mul(x_scale * W_scale)

(the weights and their per-channel scales stay as built; activation x activation MatMuls
quantize both sides), which ONNX Runtime fuses into ``DynamicQuantizeMatMul`` /
``MatMulIntegerToFloat``. Calibration still decides which MatMuls are INT8 (the plan), but not
their activation ranges. TensorRT has no such form: its INT8 is static, so this is an ONNX
Runtime option only.
"""

from __future__ import annotations

from typing import Any

from quantkit.graph_edit import drop_unused, graph_index, replace_nodes

DYNAMIC_SUFFIX = "/dynamic"


def _dequantized(name: str, producers: dict[str, Any], inits: dict[str, Any]
                 ) -> tuple[str, Any] | None:
    """('activation', float tensor) for DQ(Q(x)), ('weight', DQ node) for DQ(constant), else
    None."""
    dq = producers.get(name)
    if dq is None or dq.op_type != "DequantizeLinear":
        return None
    if dq.input[0] in inits:
        return "weight", dq
    q = producers.get(dq.input[0])
    if q is None or q.op_type != "QuantizeLinear":
        return None
    return "activation", q.input[0]


def to_dynamic_activations(model: Any) -> int:
    """Rewrite ``model`` (a static Q/DQ ``onnx.ModelProto``) in place; returns how many
    MatMuls now quantize their activations at run time."""
    from onnx import TensorProto, helper

    graph = model.graph
    producers, _, inits = graph_index(graph)
    dynamic: dict[str, tuple[str, str, str]] = {}  # float tensor -> (uint8, scale, zero point)
    new_nodes: list[Any] = []
    replaced: dict[int, list[Any]] = {}
    count = 0

    def quantized(tensor: str) -> tuple[str, str, str]:
        if tensor not in dynamic:
            base = f"{tensor}{DYNAMIC_SUFFIX}"
            outs = (f"{base}/quantized", f"{base}/scale", f"{base}/zero_point")
            new_nodes.append(helper.make_node("DynamicQuantizeLinear", [tensor], list(outs),
                                              name=f"{base}/DynamicQuantizeLinear"))
            dynamic[tensor] = outs
        return dynamic[tensor]

    for index, node in enumerate(graph.node):
        if node.op_type != "MatMul":
            continue
        found = [_dequantized(name, producers, inits) for name in node.input]
        sides = [side for side in found if side is not None]
        if len(sides) != len(found) or sides[0][0] != "activation":
            continue
        new_nodes.clear()
        operands = []
        for kind, what in sides:
            if kind == "activation":
                operands.append(quantized(what))
            else:  # the weight as built: int8/uint8 values, per-channel scale and zero point
                operands.append((what.input[0], what.input[1], what.input[2]))
        (a, a_scale, a_zero), (b, b_scale, b_zero) = operands
        p = f"{node.name}{DYNAMIC_SUFFIX}"
        new_nodes += [
            helper.make_node("MatMulInteger", [a, b, a_zero, b_zero], [f"{p}/int32"],
                             name=f"{p}/MatMulInteger"),
            helper.make_node("Cast", [f"{p}/int32"], [f"{p}/float"], name=f"{p}/Cast",
                             to=TensorProto.FLOAT),
            helper.make_node("Mul", [a_scale, b_scale], [f"{p}/scale"], name=f"{p}/MulScales"),
            helper.make_node("Mul", [f"{p}/float", f"{p}/scale"], [node.output[0]],
                             name=f"{p}/Mul"),
        ]
        replaced[index] = list(new_nodes)
        count += 1
    if not count:
        return 0
    rewritten = []
    for index, node in enumerate(graph.node):
        rewritten.extend(replaced.get(index, [node]))
    replace_nodes(graph, rewritten)
    drop_unused(graph, ("QuantizeLinear", "DequantizeLinear"))  # the static pairs replaced
    return count

