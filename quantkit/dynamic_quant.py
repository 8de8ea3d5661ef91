"""Dynamic activation quantization for ONNX Runtime engines: ranges measured at run time, per
tensor (``to_dynamic_activations``) or per block of each row (``to_blockwise_activations``).

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
    _replace_static_matmuls(graph, replaced)
    return count


def _replace_static_matmuls(graph: Any, replaced: dict[int, list[Any]],
                            new_initializers: list[Any] | None = None) -> None:
    """Put ``replaced[i]`` where node ``i`` was, add ``new_initializers`` and drop the static
    Q/DQ pairs nothing reads any more."""
    if not replaced:
        return
    rewritten = []
    for index, node in enumerate(graph.node):
        rewritten.extend(replaced.get(index, [node]))
    replace_nodes(graph, rewritten)
    graph.initializer.extend(new_initializers or [])
    drop_unused(graph, ("QuantizeLinear", "DequantizeLinear"))



BLOCK_SIZE = 32
BLOCKWISE_SUFFIX = "/blockwise"
BLOCKWISE_KERNEL = ("MatMulNBits (com.microsoft): the built 8-bit weights, activations "
                    "quantized to int8 per block of each row at run time (accuracy_level 4)")


def to_blockwise_activations(model: Any, block_size: int = BLOCK_SIZE) -> int:
    """Rewrite ``model`` (a static Q/DQ ``onnx.ModelProto`` with its weights in memory) in place:
    every MatMul of a dequantized activation and a dequantized constant weight becomes ONNX
    Runtime's ``MatMulNBits`` with 8-bit weights — the weights as built (per-channel, GPTQ's
    where the table has them) stored as ``value - zero point + 128`` in blocks of
    ``block_size`` along K, each block with its channel's scale — at ``accuracy_level`` 4, where
    the kernel quantizes each row of the activation to int8 per block when it runs. Finer than
    per-tensor dynamic ranges (``to_dynamic_activations``), and still an integer kernel.
    Activation x activation MatMuls keep their static Q/DQ. Returns how many MatMuls changed."""
    import numpy as np
    from onnx import helper, numpy_helper

    from quantkit.errors import QuantkitError
    from quantkit.onnx_io import is_external

    graph = model.graph
    producers, _, inits = graph_index(graph)
    new_inits: list[Any] = []
    replaced: dict[int, list[Any]] = {}
    for index, node in enumerate(graph.node):
        if node.op_type != "MatMul":
            continue
        found = [_dequantized(name, producers, inits) for name in node.input]
        if None in found or [kind for kind, _ in found] != ["activation", "weight"]:
            continue
        weight_dq = found[1][1]
        tensors = [inits[name] for name in weight_dq.input[:3] if name in inits]
        if any(is_external(t) for t in tensors):
            raise QuantkitError("activations=blockwise needs the weights in memory, and this "
                                "export keeps them in an external data file",
                                "build with --activations static or dynamic")
        values = numpy_helper.to_array(inits[weight_dq.input[0]]).astype(np.int32)
        scale = numpy_helper.to_array(inits[weight_dq.input[1]]).astype(np.float32)
        zero = (numpy_helper.to_array(inits[weight_dq.input[2]]).astype(np.int32)
                if len(weight_dq.input) > 2 and weight_dq.input[2] in inits else 0)
        k, n = values.shape
        blocks = -(-k // block_size)
        stored = np.full((blocks * block_size, n), 128, np.uint8)  # padding: zero weights
        stored[:k] = (values - np.reshape(zero, (1, -1) if np.ndim(zero) else ()) + 128
                      ).astype(np.uint8)
        name = f"{node.name}{BLOCKWISE_SUFFIX}"
        new_inits += [
            numpy_helper.from_array(np.ascontiguousarray(
                stored.T.reshape(n, blocks, block_size)), f"{name}/weight"),
            numpy_helper.from_array(np.repeat(np.broadcast_to(scale, (n,))[:, None], blocks,
                                              axis=1).reshape(-1), f"{name}/scale"),
        ]
        replaced[index] = [helper.make_node(
            "MatMulNBits", [found[0][1], f"{name}/weight", f"{name}/scale"], [node.output[0]],
            name=name, domain="com.microsoft", K=k, N=n, bits=8, block_size=block_size,
            accuracy_level=4)]
    if not replaced:
        return 0
    _replace_static_matmuls(graph, replaced, new_inits)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return len(replaced)
