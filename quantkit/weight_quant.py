"""INT8 weight quantization arithmetic: symmetric scales, round-to-nearest integers per output
channel (or per tensor) and their inverse, which axis of a MatMul/Gemm weight holds the output
channels, and how the integers are stored in each weight layout (``s8``, ``u8``, ``s7``; described
in :mod:`quantkit.qdq`'s docstring).

Numbers only (numpy, no ONNX), kept apart from the graph rewrite that stores them
(:mod:`quantkit.qdq`) because the tuning probe, SmoothQuant and GPTQ compute the very same
integers without rewriting a graph.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from quantkit.errors import QuantkitError

INT8_MAX = 127
INT7_MAX = 63
WEIGHT_LAYOUTS = ("s8", "u8", "s7")  # see quantkit.qdq's docstring; quantkit.environment chooses
U8_ZERO_POINT = 128


def check_weight_layout(layout: str) -> str:
    if layout not in WEIGHT_LAYOUTS:
        raise QuantkitError(f"unknown weight layout '{layout}'",
                            f"use one of: {', '.join(WEIGHT_LAYOUTS)}")
    return layout


def weight_qmax(layout: str) -> int:
    """The largest |integer| of a weight in ``layout`` (127, or 63 for ``s7``)."""
    return INT7_MAX if check_weight_layout(layout) == "s7" else INT8_MAX


def stored_weight(q: np.ndarray, layout: str) -> tuple[np.ndarray, np.generic]:
    """The initializer and the zero point that store the symmetric integers ``q`` in ``layout``:
    int8 with zero point 0, or for ``u8`` ``q + 128`` as uint8 with zero point 128
    (DequantizeLinear gives the same values)."""
    if layout == "u8":
        return (q.astype(np.int16) + U8_ZERO_POINT).astype(np.uint8), np.uint8(U8_ZERO_POINT)
    return q.astype(np.int8), np.int8(0)


def check_given_weights_layout(layout: str) -> None:
    """GPTQ weights are 8-bit integers: ``s8`` and ``u8`` store them as they are; ``s7`` would
    round them a second time, undoing what GPTQ chose."""
    if layout == "s7":
        raise QuantkitError("the calibration table's GPTQ weights are 8-bit; the s7 weight "
                            "layout would round them again to 7 bits",
                            "build with weight_layout=u8 (exact on every x86 CPU) or s8")


def symmetric_scale(amax: np.ndarray | float, qmax: int = INT8_MAX) -> np.ndarray:
    """``amax / qmax`` (127 by default); an all-zero channel or tensor gets scale 1 (its values
    quantize to 0)."""
    amax = np.asarray(amax, dtype=np.float64)
    if not np.all(np.isfinite(amax)):
        raise QuantkitError("cannot quantize a tensor whose range is not finite")
    return np.where(amax > 0, amax / qmax, 1.0).astype(np.float32)


def quantize_weight(weight: np.ndarray, axis: int | None,
                    qmax: int = INT8_MAX) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric integer quantization of a weight, per channel along ``axis`` (None: per tensor).

    Returns ``(q, scale)`` with ``q`` int8 in [-qmax, qmax] (127, or 63 for 7-bit weights) and
    ``scale`` float32 of shape ``[weight.shape[axis]]`` (or a scalar)."""
    weight = np.asarray(weight, dtype=np.float32)
    if axis is None:
        scale = symmetric_scale(_abs_max(weight, None), qmax)
        return _round_clip(weight, scale, qmax), scale.reshape(())
    axis = axis % weight.ndim
    reduce = tuple(i for i in range(weight.ndim) if i != axis)
    scale = symmetric_scale(_abs_max(weight, reduce), qmax)
    shape = [1] * weight.ndim
    shape[axis] = -1
    return _round_clip(weight, scale.reshape(shape), qmax), scale


def _abs_max(weight: np.ndarray, axis: tuple[int, ...] | None) -> np.ndarray:
    """max|w| (along ``axis``) as max(max w, -min w): the same numbers, without a copy of the
    weight (a 1.1B model's LM head is 262 MB in FP32)."""
    return np.maximum(np.max(weight, axis=axis), -np.min(weight, axis=axis))


def _round_clip(weight: np.ndarray, scale: np.ndarray, qmax: int) -> np.ndarray:
    """``clip(rint(weight / scale), -qmax, qmax)`` as int8, in one float32 temporary."""
    scaled = np.divide(weight, scale, dtype=np.float32)
    np.rint(scaled, out=scaled)
    np.clip(scaled, -qmax, qmax, out=scaled)
    return scaled.astype(np.int8)


def dequantize(q: np.ndarray, scale: np.ndarray, axis: int | None) -> np.ndarray:
    """Inverse of ``quantize_weight`` (what DequantizeLinear computes)."""
    scale = np.asarray(scale, dtype=np.float32)
    if axis is None or scale.ndim == 0:
        return q.astype(np.float32) * scale
    shape = [1] * q.ndim
    shape[axis % q.ndim] = -1
    return q.astype(np.float32) * scale.reshape(shape)


def weight_axis(op_type: str, input_index: int, rank: int, attrs: Mapping[str, Any]) -> int:
    """The axis of a constant MatMul/Gemm operand that holds the op's output channels."""
    if op_type == "Gemm":
        if input_index == 1:
            return 0 if attrs.get("transB", 0) else 1
        return 1 if attrs.get("transA", 0) else 0
    # MatMul: B [..., K, N] -> N; A [..., M, K] -> M
    return rank - 1 if input_index == 1 else max(rank - 2, 0)
