"""Helpers for the plan / Q/DQ / engine-build tests (fixtures are in ``fixtures_build.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from quantkit.environment import cpu_isa, weight_layout_for
from tests.conftest import TINY_VOCAB

# INT8 (W8A8, per-tensor activations, per-channel weights) logits of the tiny random models must
# stay within this share of FP32's largest |logit|; measured: about 1-2 %.
INT8_LOGIT_TOLERANCE = 0.05
# The INT8 weight layout ONNX Runtime engines get on this machine (quantkit.qdq: s8 where the
# integer kernels are exact, u8 on x86 without VNNI), so the INT8 tolerances above hold on both.
MACHINE_WEIGHT_LAYOUT = weight_layout_for(cpu_isa())[0]
# An engine's fused integer kernels against the same graph with its Q/DQ executed literally
# (ORT_DISABLE_ALL), relative to the largest |logit|: only the float accumulation order differs.
# Measured 2.5e-7 (tiny Llama, u8 on AVX2); s8 on AVX2 without VNNI: 0.10 (saturation).
QDQ_REFERENCE_TOLERANCE = 1e-4
# FP16 rewrite of the tiny models against FP32 (float16 rounding of weights and activations)
FP16_LOGIT_TOLERANCE = 0.01


def token_feeds(n: int, batch: int = 2, seq: int = 32, seed: int = 0,
                vocab: int = TINY_VOCAB) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"input_ids": rng.integers(0, vocab, (batch, seq), dtype=np.int64),
             "attention_mask": np.ones((batch, seq), np.int64)} for _ in range(n)]


def linear_activation_inputs(model: Any) -> list[str]:
    """Activation (non-constant) inputs of every MatMul/Gemm."""
    inits = {t.name for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    names: list[str] = []
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        for name in node.input[:2]:
            producer = producers.get(name)
            constant = name in inits or (producer is not None and producer.op_type == "Transpose"
                                         and producer.input[0] in inits)
            if not constant and name not in names:
                names.append(name)
    return names


def minmax_amax(onnx_path: Path, feeds: list[dict[str, np.ndarray]],
                names: list[str] | None = None) -> dict[str, float]:
    """max|x| of the given tensors (default: MatMul/Gemm activation inputs) over the feeds,
    by running the FP32 graph in ONNX Runtime with those tensors as extra outputs."""
    import onnx
    import onnxruntime as ort
    from onnx import helper

    model = onnx.load(str(onnx_path))
    names = names if names is not None else linear_activation_inputs(model)
    outputs = {o.name for o in model.graph.output}
    for name in names:
        if name not in outputs:
            model.graph.output.append(helper.make_empty_tensor_value_info(name))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    amax = dict.fromkeys(names, 0.0)
    for feed in feeds:
        for name, value in zip(names, session.run(names, feed), strict=True):
            amax[name] = max(amax[name], float(np.max(np.abs(value))))
    return {k: v for k, v in amax.items() if v > 0}


def make_table(onnx_path: Path, feeds: list[dict[str, np.ndarray]], **overrides: Any) -> Any:
    """A real CalibrationTable of MinMax ranges for the export at ``onnx_path``."""
    from quantkit.calib.table import CalibrationTable
    from quantkit.export import export_manifest

    fields: dict[str, Any] = {
        "method": "minmax",
        "amax": minmax_amax(onnx_path, feeds),
        "model_hash": (export_manifest(onnx_path) or {}).get("model_hash"),
        "num_samples": sum(len(f["input_ids"]) for f in feeds),
    }
    fields.update(overrides)
    return CalibrationTable(**fields)


def run_onnx(model_or_path: Any, feed: dict[str, np.ndarray], output: str = "logits",
             optimization: str = "ORT_ENABLE_ALL") -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, optimization)
    options.intra_op_num_threads = 1
    source = model_or_path.SerializeToString() if hasattr(model_or_path, "SerializeToString") \
        else str(model_or_path)
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    return np.asarray(session.run([output], feed)[0])
