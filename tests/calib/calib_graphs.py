"""Small ONNX graphs built with onnx.helper for the collector tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper

VOCAB, DIM = 50, 16


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(array, name)


def toy_lm(path: Path, seed: int = 0) -> Path:
    """One attention block: embedding, q/k/v, causal mask via Where(-3.4e38), softmax, output.

    Also float tensors that must be skipped: a shape-derived all-ones tensor, a zero tensor and
    the float attention mask (constant when there is no padding)."""
    rng = np.random.default_rng(seed)
    w = lambda *shape: (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)  # noqa: E731
    inits = [
        _init("E", rng.standard_normal((VOCAB, DIM)).astype(np.float32)),
        _init("Wq", w(DIM, DIM)), _init("Wk", w(DIM, DIM)), _init("Wv", w(DIM, DIM)),
        _init("Wo", w(DIM, DIM)), _init("Wout", w(DIM, VOCAB)),
        _init("scale", np.array(0.25, dtype=np.float32)),
        _init("zero", np.array(0.0, dtype=np.float32)),
        _init("neg", np.array(-3.4028234663852886e38, dtype=np.float32)),
        _init("one_idx", np.array(1, dtype=np.int64)),
        _init("flat_shape", np.array([-1, DIM], dtype=np.int64)),
        _init("axes0", np.array([0], dtype=np.int64)),
    ]
    nodes = [
        h.make_node("Gather", ["E", "input_ids"], ["emb"], name="embed"),
        h.make_node("MatMul", ["emb", "Wq"], ["q"], name="q_proj"),
        h.make_node("MatMul", ["emb", "Wk"], ["k"], name="k_proj"),
        h.make_node("MatMul", ["emb", "Wv"], ["v"], name="v_proj"),
        h.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1], name="k_t"),
        h.make_node("MatMul", ["q", "kt"], ["scores"], name="qk"),
        h.make_node("Mul", ["scores", "scale"], ["scaled"], name="scale_mul"),
        # causal mask from the sequence length
        h.make_node("Shape", ["input_ids"], ["ids_shape"], name="shape"),
        h.make_node("Gather", ["ids_shape", "one_idx"], ["seq"], name="seq_len"),
        h.make_node("Unsqueeze", ["seq", "axes0"], ["seq1"], name="seq_1d"),
        h.make_node("Concat", ["seq1", "seq1"], ["ss"], axis=0, name="ss"),
        h.make_node("ConstantOfShape", ["ss"], ["ones"], name="ones",
                    value=h.make_tensor("one", T.FLOAT, [1], [1.0])),
        h.make_node("Trilu", ["ones"], ["tril"], upper=0, name="tril"),
        h.make_node("Cast", ["tril"], ["keep"], to=T.BOOL, name="keep"),
        h.make_node("Where", ["keep", "scaled", "neg"], ["masked"], name="mask"),
        h.make_node("Softmax", ["masked"], ["probs"], axis=-1, name="softmax"),
        h.make_node("MatMul", ["probs", "v"], ["ctx"], name="pv"),
        h.make_node("Reshape", ["ctx", "flat_shape"], ["ctx_flat"], name="flatten"),
        h.make_node("MatMul", ["ctx_flat", "Wo"], ["out"], name="o_proj"),
        h.make_node("MatMul", ["out", "Wout"], ["logits"], name="lm_head"),
        # float tensors that are not worth a range
        h.make_node("Mul", ["emb", "zero"], ["zeros"], name="zeros"),
        h.make_node("Cast", ["attention_mask"], ["mask_f"], to=T.FLOAT, name="mask_f"),
        h.make_node("Add", ["zeros", "zeros"], ["zeros2"], name="zeros2"),
    ]
    graph = h.make_graph(
        nodes, "toy_lm",
        [h.make_tensor_value_info("input_ids", T.INT64, ["batch", "seq"]),
         h.make_tensor_value_info("attention_mask", T.INT64, ["batch", "seq"])],
        [h.make_tensor_value_info("logits", T.FLOAT, None),
         h.make_tensor_value_info("zeros2", T.FLOAT, None),
         h.make_tensor_value_info("mask_f", T.FLOAT, None)],
        inits,
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


def float_input_model(path: Path, op: str = "Sqrt") -> Path:
    """x (float input) -> op -> y -> Mul(2) -> z. Sqrt of a negative gives NaN; Reciprocal of 0
    gives +Inf."""
    nodes = [h.make_node(op, ["x"], ["y"], name="op"),
             h.make_node("Mul", ["y", "two"], ["z"], name="double")]
    graph = h.make_graph(nodes, "f", [h.make_tensor_value_info("x", T.FLOAT, ["n", 4])],
                         [h.make_tensor_value_info("z", T.FLOAT, None)],
                         [_init("two", np.array(2.0, dtype=np.float32))])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


def lm_batches(n: int, batch: int = 3, seq: int = 12, seed: int = 0, pad: bool = False):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ids = rng.integers(0, VOCAB, size=(batch, seq), dtype=np.int64)
        mask = np.ones_like(ids)
        if pad:
            mask[0, seq // 2:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out
