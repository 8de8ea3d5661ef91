"""SmoothQuant (Xiao et al., 2023) as an ONNX rewrite of the FP32 export.

Activation outliers live in a few channels; weights are smooth. For each linear layer fed by a
normalisation, scale input channel j by s_j = max|X_j|^alpha / max|W_j|^(1-alpha): divide the
norm's weight (and bias) by s and multiply the following linear weights' input rows by s. The
smoothed graph computes the same function in FP32 (up to rounding) and its activations quantize
with less error. Llama MLPs get a second pair: ``up_proj`` output columns / s, ``down_proj`` input
rows * s (``act(gate) * up`` is linear in ``up``).

``alpha="auto"`` chooses alpha per group: for each alpha of ``AUTO_GRID`` the group's linears
are fake-quantized as an engine would run them (activation per tensor with its min/max range,
weights per output channel) on a sample of calibration tokens, and the alpha with the lowest
relative output error wins. Outlier-heavy inputs (Llama's MLP products) want a larger alpha than
well-behaved ones; one global alpha serves neither.

A smoothed model is written as a new export directory (its own model hash), so calibration,
builds and evaluation treat it like any other export.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from quantkit.errors import QuantkitError
from quantkit.export import write_derived_export
from quantkit.graph_edit import PASS_THROUGH, drop_unused, graph_index
from quantkit.weight_quant import INT8_MAX, dequantize, quantize_weight, symmetric_scale

MIN_SCALE = 1e-5
AUTO = "auto"
AUTO_GRID = tuple(round(0.1 * i, 1) for i in range(11))
SAMPLE_ROWS = 1024  # calibration tokens per activation the auto search scores alphas on
MAX_SAMPLE_COLUMNS = 4096  # output channels scored per linear (quantized independently)

Alpha = float | str  # a value in 0..1, or "auto"


def parse_alpha(value: Alpha | None) -> Alpha | None:
    """A SmoothQuant alpha as given on the command line or in a config: 0..1 or ``auto``."""
    if value is None:
        return None
    if isinstance(value, str):
        if value.strip().lower() == AUTO:
            return AUTO
        try:
            value = float(value)
        except ValueError:
            raise QuantkitError(f"cannot read the SmoothQuant alpha '{value}'",
                                "give a number within 0..1 (e.g. 0.5) or 'auto'") from None
    alpha = float(value)
    if not 0.0 <= alpha <= 1.0:
        raise QuantkitError(f"SmoothQuant alpha must be within 0..1 or 'auto', got {value}")
    return alpha


@dataclass
class LinearInput:
    """A linear node reading the smoothed activation, and where its weight's input axis is."""

    node: str
    axis: int  # axis of the weight (or of the transposed embedding) indexed by the input channel


@dataclass
class SmoothGroup:
    """One activation tensor, the op that scales its channels, and the linears that read it."""

    kind: str  # "norm" (RMSNorm / LayerNorm weight) or "up-down" (Llama MLP)
    activation: str  # tensor whose per-channel |max| drives the scales
    scale_node: str  # the node whose initializers are divided by s
    scale_inputs: list[int]  # their input positions (norm weight and bias, or up_proj's weight)
    scale_axis: int  # their axis indexed by the activation's channel
    linears: list[LinearInput] = field(default_factory=list)


def _attr(node: Any, name: str, default: int) -> int:
    for a in node.attribute:
        if a.name == name:
            return int(a.i)
    return default


def _linear_readers(
    tensor: str,
    consumers: Mapping[str, list[Any]],
    inits: Mapping[str, Any],
    producers: Mapping[str, Any],
) -> list[LinearInput] | None:
    """The linears reading ``tensor`` (through reshapes); None if anything else reads it."""
    readers: list[LinearInput] = []
    stack = [tensor]
    while stack:
        name = stack.pop()
        for node in consumers.get(name, []):
            if node.op_type in PASS_THROUGH and node.input[0] == name:
                stack.extend(node.output)
                continue
            linear = _as_linear(node, name, inits, producers)
            if linear is None:
                return None
            readers.append(linear)
    return readers or None


def _as_linear(node: Any, act: str, inits: Mapping[str, Any],
               producers: Mapping[str, Any]) -> LinearInput | None:
    if node.op_type not in ("MatMul", "Gemm") or node.input[0] != act:
        return None
    weight = node.input[1]
    if weight in inits:
        if node.op_type == "Gemm" and _attr(node, "transB", 0):
            return LinearInput(node.name, axis=1)
        return LinearInput(node.name, axis=0)
    producer = producers.get(weight)
    # tied LM head: MatMul(x, Transpose(embedding)); the embedding is [vocab, hidden] -> axis 1
    if producer is not None and producer.op_type == "Transpose" and producer.input[0] in inits:
        return LinearInput(node.name, axis=1)
    return None


def find_smooth_groups(model: Any) -> list[SmoothGroup]:
    """Norm -> linear groups (LayerNormalization, or RMSNorm ending in Mul by a weight) and
    Llama's up_proj -> down_proj pairs, in graph order."""
    graph = model.graph
    producers, consumers, inits = graph_index(graph)
    groups: list[SmoothGroup] = []
    for node in graph.node:
        group: SmoothGroup | None = None
        if node.op_type == "LayerNormalization" and all(i in inits for i in node.input[1:3]):
            group = SmoothGroup("norm", node.output[0], node.name,
                                [i for i in (1, 2) if i < len(node.input) and node.input[i]], -1)
        elif node.op_type == "Mul" and "norm" in node.name.lower():
            weights = [i for i, name in enumerate(node.input)
                       if name in inits and len(inits[name].dims) == 1]
            if len(weights) == 1:
                group = SmoothGroup("norm", node.output[0], node.name, weights, -1)
        elif node.op_type == "MatMul" and node.name.endswith("down_proj/MatMul"):
            group = _up_down_group(node, producers, inits)
        if group is None:
            continue
        if group.kind == "norm":
            linears = _linear_readers(group.activation, consumers, inits, producers)
            if not linears:
                continue
            group.linears = linears
        groups.append(group)
    return groups


def _up_down_group(down: Any, producers: Mapping[str, Any],
                   inits: Mapping[str, Any]) -> SmoothGroup | None:
    """down_proj(act(gate) * up): scale up_proj's output columns, down_proj's input rows."""
    mul = producers.get(down.input[0])
    if mul is None or mul.op_type != "Mul" or down.input[1] not in inits:
        return None
    for operand in mul.input:
        up = producers.get(operand)
        if up is not None and up.op_type == "MatMul" and up.name.endswith("up_proj/MatMul") \
                and up.input[1] in inits:
            return SmoothGroup(
                "up-down", down.input[0], up.name, [1], scale_axis=1,
                linears=[LinearInput(down.name, axis=0)],
            )
    return None


def channel_amax(onnx_path: Path, batches: Iterable[Mapping[str, np.ndarray]],
                 tensors: list[str]) -> dict[str, np.ndarray]:
    """Per-channel (last axis) max|x| of ``tensors`` over all batches, one batch alive at a time."""
    return channel_stats(onnx_path, batches, tensors)[0]


def channel_stats(onnx_path: Path, batches: Iterable[Mapping[str, np.ndarray]],
                  tensors: list[str], *, sample_rows: int = 0, seed: int = 0,
                  ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per-channel max|x| of ``tensors`` and, with ``sample_rows``, up to that many of their rows
    (tokens) drawn uniformly from every batch (what the auto alpha search scores on)."""
    from quantkit.graph_edit import exposing_session

    session = exposing_session(onnx_path, tensors)
    rng = np.random.default_rng(seed)
    num_batches = len(batches) if isinstance(batches, Sized) else 0
    per_batch = -(-sample_rows // num_batches) if num_batches else sample_rows
    amax: dict[str, np.ndarray] = {}
    samples: dict[str, list[np.ndarray]] = defaultdict(list)
    seen = 0
    for batch in batches:
        feeds = {i.name: batch[i.name] for i in session.get_inputs()}
        for name, value in zip(tensors, session.run(tensors, feeds), strict=True):
            rows = value.reshape(-1, value.shape[-1])
            flat = np.abs(rows).max(axis=0)
            amax[name] = flat if name not in amax else np.maximum(amax[name], flat)
            if per_batch:
                pick = rng.choice(len(rows), size=min(per_batch, len(rows)), replace=False)
                samples[name].append(rows[np.sort(pick)].astype(np.float32))
        seen += 1
    if seen == 0:
        raise QuantkitError("SmoothQuant needs calibration batches; got none")
    drawn: dict[str, np.ndarray] = {}
    for name, parts in samples.items():
        rows = np.concatenate(parts)
        if len(rows) > sample_rows:
            rows = rows[np.sort(rng.choice(len(rows), size=sample_rows, replace=False))]
        drawn[name] = rows
    return amax, drawn


def smooth_scales(act_amax: np.ndarray, weight_amax: np.ndarray, alpha: float) -> np.ndarray:
    """s_j = max|X_j|^alpha / max|W_j|^(1-alpha), guarded against zero channels."""
    act = np.maximum(act_amax.astype(np.float64), MIN_SCALE)
    wgt = np.maximum(weight_amax.astype(np.float64), MIN_SCALE)
    scales = act**alpha / wgt ** (1.0 - alpha)
    return np.clip(scales, MIN_SCALE, None)


def _fake_quant_rows(x: np.ndarray, amax: float) -> np.ndarray:
    """Per-tensor symmetric int8 fake quantization (what Q/DQ does to an activation)."""
    scale = float(symmetric_scale(amax))
    return np.clip(np.rint(x / scale), -INT8_MAX, INT8_MAX) * scale


def alpha_error(sample: np.ndarray, act_amax: np.ndarray, weights: list[np.ndarray],
                alpha: float) -> float:
    """Relative squared output error of the group's linears, fake-quantized after smoothing
    with ``alpha``: activation per tensor (its min/max range over the calibration data), each
    weight ``[in, out]`` per output channel."""
    w_amax = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
    s = smooth_scales(act_amax, w_amax, alpha)
    x = sample.astype(np.float64)
    xq = _fake_quant_rows(x / s, float(np.max(act_amax / s)))
    error = 0.0
    for w in weights:
        reference = x @ w
        q, scale = quantize_weight(w * s[:, None], axis=1)
        output = xq @ dequantize(q, scale, axis=1).astype(np.float64)
        error += float(np.sum((reference - output) ** 2) / max(np.sum(reference**2), 1e-30))
    return error / len(weights)


def choose_alpha(sample: np.ndarray, act_amax: np.ndarray, weights: list[np.ndarray],
                 grid: Iterable[float] = AUTO_GRID, seed: int = 0,
                 ) -> tuple[float, dict[str, float]]:
    """The alpha of ``grid`` with the lowest ``alpha_error`` (ties: the smaller alpha), and the
    error of every alpha tried. Wide linears (a vocabulary-sized LM head) are scored on a fixed
    subset of their output channels: each is quantized on its own, so the subset is unbiased."""
    rng = np.random.default_rng(seed)
    scored = []
    for w in weights:
        w = np.asarray(w, dtype=np.float64)
        if w.shape[1] > MAX_SAMPLE_COLUMNS:
            w = w[:, np.sort(rng.choice(w.shape[1], MAX_SAMPLE_COLUMNS, replace=False))]
        scored.append(w)
    errors = {f"{a:g}": alpha_error(sample, act_amax, scored, a) for a in grid}
    best = min(errors, key=lambda a: (errors[a], float(a)))
    return float(best), errors


def apply_smoothquant(model: Any, groups: list[SmoothGroup],
                      act_amax: Mapping[str, np.ndarray], alpha: Alpha,
                      samples: Mapping[str, np.ndarray] | None = None) -> dict[str, Any]:
    """Rewrite ``model`` in place; every scaled initializer gets its own copy, so weights the
    exporter shared between nodes (tied embeddings, identical norm weights) stay intact.
    ``alpha="auto"`` needs ``samples`` (rows of each group's activation)."""
    from onnx import numpy_helper

    alpha = parse_alpha(alpha)  # type: ignore[assignment]
    if alpha == AUTO and samples is None:
        raise QuantkitError("SmoothQuant alpha 'auto' needs activation samples")
    graph = model.graph
    producers, _, inits = graph_index(graph)
    nodes = {n.name: n for n in graph.node}
    counter = 0
    summary: list[dict[str, Any]] = []

    def fresh(array: np.ndarray, base: str) -> str:
        nonlocal counter
        counter += 1
        name = f"{base.split('.smoothquant_')[0]}.smoothquant_{counter}"
        tensor = numpy_helper.from_array(array.astype(np.float32), name)
        graph.initializer.append(tensor)
        inits[name] = tensor
        return name

    def weight_array(linear: LinearInput) -> tuple[np.ndarray, bool]:
        """The linear's current weight, and whether it is a transposed embedding."""
        name = nodes[linear.node].input[1]
        if name in inits:
            return numpy_helper.to_array(inits[name]), False
        return numpy_helper.to_array(inits[producers[name].input[0]]), True

    for group in groups:  # groups may share nodes (up_proj): always read the current weights
        current = [weight_array(lin) for lin in group.linears]
        weights = [w for w, _ in current]
        w_amax = np.max(
            [np.abs(w).max(axis=1 - lin.axis)
             for w, lin in zip(weights, group.linears, strict=True)],
            axis=0,
        )
        chosen, errors = float(alpha) if alpha != AUTO else 0.0, None
        if alpha == AUTO:
            assert samples is not None
            oriented = [w if lin.axis == 0 else w.T
                        for w, lin in zip(weights, group.linears, strict=True)]
            chosen, errors = choose_alpha(samples[group.activation], act_amax[group.activation],
                                          oriented)
        scales = smooth_scales(act_amax[group.activation], w_amax, chosen)
        scale_node = nodes[group.scale_node]
        for position in group.scale_inputs:
            name = scale_node.input[position]
            array = numpy_helper.to_array(inits[name]).astype(np.float64)
            shape = [1] * array.ndim
            shape[group.scale_axis] = -1
            scale_node.input[position] = fresh(array / scales.reshape(shape), name)
        for (w, transposed), lin in zip(current, group.linears, strict=True):
            shape = [1, 1]
            shape[lin.axis] = -1
            scaled = w.astype(np.float64) * scales.reshape(shape)
            if transposed:
                # tied LM head: MatMul(x, Transpose(E)) becomes MatMul(x, (E * s)^T), leaving
                # the embedding lookup with the original E
                scaled = np.ascontiguousarray(scaled.T)
            node = nodes[lin.node]
            node.input[1] = fresh(scaled, node.input[1])
        entry: dict[str, Any] = {
            "kind": group.kind, "activation": group.activation,
            "linears": [lin.node for lin in group.linears], "alpha": chosen,
            "scale_min": float(scales.min()), "scale_max": float(scales.max()),
        }
        if errors is not None:
            entry["alpha_errors"] = errors
        summary.append(entry)
    drop_unused(graph)
    return {"alpha": alpha, "groups": summary}


def smooth_export(
    onnx_path: Path,
    batches: Iterable[Mapping[str, np.ndarray]],
    out: Path,
    *,
    alpha: Alpha = 0.5,
    data_description: Mapping[str, Any] | None = None,
    force: bool = False,
) -> Path:
    """Write a smoothed copy of an export directory; return the new ONNX path."""
    from quantkit.onnx_io import load_model

    alpha = parse_alpha(alpha)  # type: ignore[assignment]
    model = load_model(onnx_path)
    groups = find_smooth_groups(model)
    if not groups:
        raise QuantkitError(
            f"{onnx_path} has no normalisation -> linear pattern SmoothQuant can rewrite"
        )
    amax, samples = channel_stats(onnx_path, batches, sorted({g.activation for g in groups}),
                                  sample_rows=SAMPLE_ROWS if alpha == AUTO else 0)
    summary = apply_smoothquant(model, groups, amax, alpha, samples)
    return write_derived_export(
        model, onnx_path, out, exporter="quantkit.smoothquant", force=force,
        inputs={"smoothquant": {"alpha": alpha}, "data": dict(data_description or {})},
        smoothquant=summary)
