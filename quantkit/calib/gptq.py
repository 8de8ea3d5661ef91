"""GPTQ (Frantar et al., 2023) for the INT8 weights: round each weight so that the layer's
output on calibration activations changes least, not each weight to its nearest level.

Round-to-nearest (RTN) per output channel is close to lossless for most layers, but not after a
rotation (``quantkit rotate``): there the readers of the residual stream carry the RMSNorm gains
folded in, and on SmolLM2-135M RTN weights alone cost +0.3 % perplexity for q/k/v and +0.3 % for
gate/up. GPTQ quantizes the input rows of ``W`` (``y = x W``) one at a time and spreads each
row's rounding error over the rows not yet quantized, weighted by the inverse of the input
second-moment matrix ``H = sum x^T x`` (so that ``X W_q`` stays close to ``X W``).

The scales stay the RTN ones (``max|W[:, j]| / 127`` per output channel j, what TensorRT and
``quantkit.qdq`` use), so the result is an ordinary per-channel int8 weight: only the integers
differ. The weights are stored beside the calibration table (``weights.npz``) and every INT8
build, the autotune probe and the TensorRT Q/DQ path use them in place of RTN.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from quantkit.errors import QuantkitError

DAMPING = 0.01  # share of mean(diag H) added to the diagonal (H is often near singular)
BLOCK = 128  # rows updated lazily together (the algorithm's batched form; same result)
_INT8_MAX = 127.0
DEFAULT_HESSIAN_BYTES = 1 << 30  # Hessians held at once, at least (see hessian_budget)


@dataclass(frozen=True)
class QuantizedWeight:
    """An int8 weight as the node reads it (after the Transpose of a tied head) and its
    per-output-channel scale along ``axis``."""

    q: np.ndarray
    scale: np.ndarray
    axis: int


def weight_key(source: str, perm: tuple[int, ...] | None) -> str:
    """How a weight is named in ``weights.npz``: its initializer, and the perm of a Transpose
    between them."""
    return source if perm is None else f"{source}|T{','.join(map(str, perm))}"


@dataclass(frozen=True)
class WeightTarget:
    """A constant weight of an INT8-capable MatMul/Gemm and the activation it multiplies."""

    node: str
    activation: str
    source: str
    perm: tuple[int, ...] | None
    axis: int  # output-channel axis of the weight as the node reads it

    @property
    def key(self) -> str:
        return weight_key(self.source, self.perm)


def weight_targets(model: Any) -> list[WeightTarget]:
    """Every MatMul/Gemm with one constant 2-D weight and one activation, in graph order."""
    from quantkit.graph_edit import constant_weight, node_attrs
    from quantkit.plan import int8_capable
    from quantkit.weight_quant import weight_axis

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    out = []
    for node in graph.node:
        if node.op_type not in ("MatMul", "Gemm") or not int8_capable(node.name, node.op_type):
            continue
        found = [(i, constant_weight(t, inits, producers)) for i, t in enumerate(node.input[:2])]
        weights = [(i, w) for i, w in found if w is not None]
        if len(weights) != 1 or len(inits[weights[0][1][0]].dims) != 2:
            continue
        index, (source, perm) = weights[0]
        axis = weight_axis(node.op_type, index, 2, node_attrs(node))
        if (index == 1) != (axis == 1):  # the weight's input axis must meet the activation's
            continue
        out.append(WeightTarget(node.name, node.input[1 - index], source, perm, axis))
    return out


def hessian_passes(targets: Sequence[WeightTarget], widths: Mapping[str, int],
                   budget_bytes: int) -> list[list[str]]:
    """The activations of ``targets`` in graph order, cut into consecutive groups whose float32
    Hessians (``width**2 * 4`` bytes each) fit ``budget_bytes`` together: one calibration pass
    per group, so a model's Hessians are never all in memory at once (TinyLlama-1.1B's are
    3.9 GB; a 7B model's about 30 GB). A single Hessian past the budget gets a pass of its own."""
    passes: list[list[str]] = []
    held = budget_bytes + 1
    for name in dict.fromkeys(t.activation for t in targets):
        size = widths[name] ** 2 * 4
        if held + size > budget_bytes:
            passes.append([])
            held = 0
        passes[-1].append(name)
        held += size
    return passes


def add_gram(hessians: dict[str, np.ndarray], name: str, value: np.ndarray,
             keep: np.ndarray | None) -> None:
    """Add one sequence's ``x^T x`` of activation ``value`` (its real tokens: ``keep``)."""
    rows = value.reshape(-1, value.shape[-1])
    if keep is not None and len(keep) == len(rows):
        rows = rows[keep]
    # float32 throughout (BLAS sgemm, twice dgemm's speed, half the memory held); the sum of a
    # few hundred products keeps float32's 1e-7 relative precision
    gram = rows.T @ rows
    if name in hessians:
        hessians[name] += gram
    else:
        hessians[name] = gram


class _GramSink:
    """Layer by layer: each sequence's activations of a segment into their Hessians."""

    pending_bytes = 0

    def __init__(self, wanted: set[str], masks: list[np.ndarray | None]) -> None:
        self.wanted = wanted
        self.masks = masks
        self.hessians: dict[str, np.ndarray] = {}
        self.row = 0

    def start_row(self, index: int) -> None:
        self.row = index

    def submit(self, values: list[tuple[str, np.ndarray]]) -> None:
        mask = self.masks[self.row]
        keep = None if mask is None else mask.reshape(-1).astype(bool)
        for name, value in values:
            if name in self.wanted:
                add_gram(self.hessians, name, value, keep)

    def wait(self) -> None:
        pass


def collect_hessians(onnx_path: Path, batches: Iterable[Mapping[str, np.ndarray]],
                     tensors: list[str]) -> tuple[dict[str, np.ndarray], int]:
    """``sum x^T x`` (float32) over every token of ``batches`` for each activation in
    ``tensors`` (last axis = the MatMul's input channels), and the number of tokens.

    The graph is cut to what ``tensors`` need (an early layer's pass skips the rest of the
    model) and run one sequence at a time, so the fetched activations are one sequence's whatever
    the batch size; each sequence's product is summed in the same order whichever pass a tensor
    falls in, so the Hessians do not depend on how the activations are grouped."""
    from quantkit.graph_edit import exposing_session

    session = exposing_session(onnx_path, tensors, only=True)
    inputs = [i.name for i in session.get_inputs()]
    hessians: dict[str, np.ndarray] = {}
    tokens = 0
    for batch in batches:
        for row in range(len(batch[inputs[0]])):
            feeds = {name: batch[name][row:row + 1] for name in inputs}
            mask = feeds.get("attention_mask")
            keep = None if mask is None else mask.reshape(-1).astype(bool)
            for name, value in zip(tensors, session.run(tensors, feeds), strict=True):
                add_gram(hessians, name, value, keep)
            tokens += int(keep.sum()) if keep is not None else int(feeds[inputs[0]].size)
    if not hessians:
        raise QuantkitError("GPTQ needs calibration batches; got none")
    return hessians, tokens


def gptq_quantize(weight: np.ndarray, hessian: np.ndarray, *, damping: float = DAMPING,
                  block: int = BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """GPTQ of ``weight`` [in, out] (``y = x W``) against ``hessian`` [in, in]: int8 ``q`` and
    the RTN per-output-channel ``scale`` with ``q * scale`` close to ``weight`` where the
    activations are. Rows are taken in order of decreasing ``diag(H)`` (the most active input
    channels first, "act order"), so their errors can be absorbed by the others."""
    from quantkit.weight_quant import symmetric_scale

    w = np.asarray(weight, dtype=np.float64).copy()
    n = w.shape[0]
    if hessian.shape != (n, n):
        raise QuantkitError(f"GPTQ: a weight of {n} input channels got a Hessian of shape "
                            f"{hessian.shape}")
    scale = symmetric_scale(np.abs(w).max(axis=0)).astype(np.float64)
    h = np.array(hessian, dtype=np.float64)
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    w[dead, :] = 0.0
    order = np.argsort(-np.diag(h), kind="stable")
    w, h = w[order], h[np.ix_(order, order)]
    h[np.diag_indices(n)] += damping * float(np.mean(np.diag(h)))
    try:
        upper = np.linalg.cholesky(np.linalg.inv(h)).T  # inv(H) = U^T U
    except np.linalg.LinAlgError:
        raise QuantkitError("GPTQ: the activation second moments are not positive definite "
                            "even after damping", "calibrate on more tokens") from None
    q = np.zeros(w.shape, dtype=np.int8)
    for start in range(0, n, block):
        stop = min(start + block, n)
        part = w[start:stop].copy()
        errors = np.zeros_like(part)
        u = upper[start:stop, start:stop]
        for i in range(stop - start):
            row = part[i]
            levels = np.clip(np.rint(row / scale), -_INT8_MAX, _INT8_MAX)
            q[start + i] = levels.astype(np.int8)
            error = (row - levels * scale) / u[i, i]
            part[i + 1:] -= np.outer(u[i, i + 1:], error)
            errors[i] = error
        w[stop:] -= upper[start:stop, stop:].T @ errors
    restored = np.empty_like(q)
    restored[order] = q
    return restored, scale.astype(np.float32)


def hessian_budget(weights: int) -> int:
    """Bytes of Hessians held at once by default: half the model's FP32 weights, at least
    1 GiB (SmolLM2-135M's 0.4 GB take one pass; TinyLlama-1.1B's 3.9 GB take two)."""
    return max(DEFAULT_HESSIAN_BYTES, weights // 2)


def gptq_weights(onnx_path: Path, batches: Iterable[Mapping[str, np.ndarray]], *,
                 memory: int | None = None, segment_bytes: int | None = None,
                 ) -> tuple[dict[str, QuantizedWeight], dict[str, Any]]:
    """GPTQ int8 weights for every constant-weight MatMul/Gemm of the FP32 export, from the
    activations of ``batches``; and a summary for the manifest.

    ``segment_bytes`` (big models): layer by layer, one pass in all: the graph runs in segments
    of at most that many bytes of weights, each over every sequence before the next is loaded,
    and a segment's weights are quantized and its Hessians freed as soon as it is done (memory:
    one segment's weights and Hessians, and the hidden states carried between segments).
    Otherwise ``memory`` bounds the bytes of Hessians held at once (default:
    ``hessian_budget``): the activations are taken a group of layers at a time, one pass over
    ``batches`` each, the graph cut to what the group needs."""
    import onnx

    from quantkit.onnx_io import read_initializer, weight_bytes
    from quantkit.weight_quant import quantize_weight

    model = onnx.load(str(onnx_path), load_external_data=False)
    targets = weight_targets(model)
    if not targets:
        raise QuantkitError("the model has no MatMul/Gemm with a constant weight for GPTQ")
    inits = {t.name: t for t in model.graph.initializer}
    first: dict[str, WeightTarget] = {}  # a weight read by several nodes: its first reader's data
    for target in targets:
        first.setdefault(target.key, target)
    widths = {t.activation: input_width(t, inits[t.source]) for t in targets}
    out: dict[str, QuantizedWeight] = {}
    gain: list[float] = []

    def quantize_group(hessians: Mapping[str, np.ndarray]) -> None:
        for target in first.values():
            if target.activation not in hessians:
                continue
            # weights read one at a time: a model past 2 GB keeps them in its external data
            value = np.asarray(read_initializer(inits[target.source], Path(onnx_path).parent),
                               dtype=np.float32)
            if target.perm is not None:
                value = np.transpose(value, target.perm)
            as_in_out = value if target.axis == 1 else value.T
            h = hessians[target.activation]
            q, scale = gptq_quantize(as_in_out, h)
            rtn, _ = quantize_weight(as_in_out, 1)
            gain.append(_output_error(as_in_out, rtn, scale, h)
                        / max(_output_error(as_in_out, q, scale, h), 1e-30))
            out[target.key] = QuantizedWeight(
                np.ascontiguousarray(q if target.axis == 1 else q.T), scale, target.axis)

    activations = list(dict.fromkeys(t.activation for t in targets))
    if segment_bytes is not None:
        tokens, groups = _layerwise(onnx_path, batches, activations, segment_bytes,
                                    quantize_group)
        missed = sorted(set(first) - set(out))
        if missed:  # an activation no node makes (a graph input): not in any segment
            raise QuantkitError(f"GPTQ layer by layer found no activation for {missed[:3]}",
                                "calibrate with --weights rtn")
    else:
        if memory is None:
            memory = hessian_budget(weight_bytes(model))
        groups = hessian_passes(targets, widths, memory)
        batches = list(batches)  # a few hundred KB of token ids, read once per pass
        tokens = 0
        for tensors in groups:
            hessians, tokens = collect_hessians(onnx_path, batches, tensors)
            quantize_group(hessians)
            del hessians
    summary = {"method": "gptq", "weights": len(out), "tokens": tokens, "damping": DAMPING,
               "mode": "layer_by_layer" if segment_bytes is not None else "passes",
               "passes": 1 if segment_bytes is not None else len(groups),
               "groups": len(groups), "hessian_bytes_per_group_max":
                   max(sum(widths[n] ** 2 * 4 for n in g) for g in groups),
               "rtn_to_gptq_output_error": {"median": float(np.median(gain)),
                                            "min": float(np.min(gain))}}
    return out, summary


def _layerwise(onnx_path: Path, batches: Iterable[Mapping[str, np.ndarray]],
               activations: list[str], segment_bytes: int,
               quantize_group: Callable[[Mapping[str, np.ndarray]], None],
               ) -> tuple[int, list[list[str]]]:
    """The Hessians segment by segment (``quantkit.calib.collect.run_layer_by_layer``), each
    segment's handed to ``quantize_group`` when every sequence has passed it; the number of
    tokens and the activations of each segment."""
    import tempfile

    from quantkit.calib.collect import (
        SegmentRunner,
        load_weightless,
        run_layer_by_layer,
        sequences,
    )
    from quantkit.calib.graph import analyse

    groups: list[list[str]] = []
    with tempfile.TemporaryDirectory(prefix="quantkit-gptq-") as tmp:
        model = load_weightless(Path(onnx_path), Path(tmp))
        info = analyse(model)
        # every activation is its own root: no segment count limit, weights alone cut them
        runner = SegmentRunner(Path(tmp), model, info, activations, len(activations), None,
                               segment_bytes)
        del model
        rows, _, tokens = sequences(batches, info)
        sink = _GramSink(set(activations), [row.get("attention_mask") for row in rows])

        def done(seg: Any) -> None:
            names = [n for n in seg.roots if n in sink.wanted]
            groups.append(names)
            quantize_group({n: sink.hessians[n] for n in names if n in sink.hessians})
            for name in names:
                sink.hessians.pop(name, None)

        run_layer_by_layer(runner, rows, sink, done)
    return tokens, groups


def input_width(target: WeightTarget, initializer: Any) -> int:
    """Input channels of a target's weight (the width of its activation's last axis)."""
    dims = list(initializer.dims)
    if target.perm is not None:
        dims = [dims[i] for i in target.perm]
    return int(dims[0] if target.axis == 1 else dims[1])


def _output_error(weight: np.ndarray, q: np.ndarray, scale: np.ndarray, h: np.ndarray) -> float:
    """``trace(D^T H D)`` with ``D = W - q * scale``: the squared output error on the data."""
    d = weight.astype(np.float64) - q.astype(np.float64) * scale[None, :]
    # sum_ij d_ij (H d)_ij: one BLAS product (a three-operand einsum loops in C without BLAS,
    # 20x slower: 4.4 s for one 1536 x 576 weight, minutes over SmolLM2's 211 weights)
    return float(np.sum(d * (h @ d)))


def weights_digest(weights: Mapping[str, QuantizedWeight] | None) -> str | None:
    """A hash of the int8 weights (None without): what cached measurements depend on."""
    if not weights:
        return None
    import hashlib

    digest = hashlib.sha256()
    for key in sorted(weights):
        w = weights[key]
        digest.update(key.encode())
        digest.update(np.ascontiguousarray(w.q).tobytes())
        digest.update(np.ascontiguousarray(w.scale, np.float32).tobytes())
    return digest.hexdigest()


def save_weights(path: Path, weights: Mapping[str, QuantizedWeight]) -> None:
    """``weights.npz``: per key, ``q`` (int8), ``scale`` and ``axis``; written atomically."""
    from quantkit.artifacts import atomic_write_bytes

    arrays: dict[str, np.ndarray] = {}
    for i, (key, w) in enumerate(sorted(weights.items())):
        arrays[f"{i}/key"] = np.array(key)
        arrays[f"{i}/q"] = w.q
        arrays[f"{i}/scale"] = w.scale
        arrays[f"{i}/axis"] = np.array(w.axis)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(Path(path), buffer.getvalue())


def load_weights(path: Path) -> dict[str, QuantizedWeight]:
    try:
        with np.load(Path(path), allow_pickle=False) as data:
            count = len({name.split("/")[0] for name in data.files})
            return {str(data[f"{i}/key"]): QuantizedWeight(data[f"{i}/q"], data[f"{i}/scale"],
                                                           int(data[f"{i}/axis"]))
                    for i in range(count)}
    except (OSError, ValueError, KeyError) as exc:
        raise QuantkitError(f"cannot read the GPTQ weights {path}: {exc}",
                            "recalibrate (quantkit calibrate --weights gptq)") from None
