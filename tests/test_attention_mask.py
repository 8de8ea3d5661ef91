"""Exports carry no softmax NaN guards: every query may see its own position instead, so
padding rows stay finite and real tokens compute what PyTorch computes."""

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from quantkit.attention_mask import DIAGONAL_PREFIX, drop_softmax_nan_guards

EXPORTS = ["tiny_llama_export", "tiny_gpt2_export", "tiny_llama_cache_export",
           "tiny_gpt2_cache_export"]


@pytest.mark.parametrize("fixture", EXPORTS)
def test_exports_have_no_guards_and_say_so(fixture, request):
    export = request.getfixturevalue(fixture)
    ops = Counter(n.op_type for n in onnx.load(str(export.onnx_path)).graph.node)
    assert ops["IsNaN"] == 0
    assert export.manifest["softmax_nan_guards_removed"] == ops["Softmax"] == 2  # two layers


def _left_padded_batch(vocab: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    ids = rng.integers(0, vocab, (3, 12), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[0, :5] = 0  # left padding: rows 0-4 of sequence 0 see no valid key but their own
    mask[2, 9:] = 0  # right padding
    return ids, mask


def _logits(model_or_path, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model_or_path, providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"input_ids": ids, "attention_mask": mask})[0]


@pytest.mark.parametrize("model, fixture", [("tiny_llama", "tiny_llama_export"),
                                            ("tiny_gpt2", "tiny_gpt2_export")])
def test_padded_rows_finite_and_real_tokens_match_torch(model, fixture, request):
    import torch

    loaded, export = request.getfixturevalue(model), request.getfixturevalue(fixture)
    ids, mask = _left_padded_batch(int(loaded.model.config.vocab_size))
    logits = _logits(str(export.onnx_path), ids, mask)
    with torch.no_grad():
        ref = loaded.model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                           use_cache=False).logits.float().numpy()
    assert np.isfinite(logits).all()
    valid = mask.astype(bool)
    assert np.abs(logits[valid] - ref[valid]).max() <= 1e-4 * np.abs(ref[valid]).max()


def test_an_infinite_mask_value_gives_no_nan(tiny_llama_export):
    """float16 turns the mask's float32 minimum into -inf; with the diagonal let through no
    row is fully masked, so no softmax sees only -inf."""
    model = onnx.load(str(tiny_llama_export.onnx_path))
    minimum = np.finfo(np.float32).min
    changed = 0
    for tensor in model.graph.initializer:
        value = numpy_helper.to_array(tensor)
        if value.size == 1 and value.dtype == np.float32 and float(value.reshape(-1)[0]) == minimum:
            tensor.CopyFrom(numpy_helper.from_array(np.full_like(value, -np.inf), tensor.name))
            changed += 1
    assert changed >= 1
    ids, mask = _left_padded_batch(512)
    before = _logits(str(tiny_llama_export.onnx_path), ids, mask)
    after = _logits(model.SerializeToString(), ids, mask)
    assert np.isfinite(after).all()
    valid = mask.astype(bool)
    np.testing.assert_allclose(after[valid], before[valid], rtol=0, atol=1e-5)


def _guarded_graph(mask_value: float | None) -> onnx.ModelProto:
    """scores [1,1,3,3] (+ Where(mask, 0, mask_value) when given) -> Softmax -> NaN guard."""
    nodes = []
    scores = "scores"
    if mask_value is not None:
        nodes += [helper.make_node("Where", ["mask", "zero", "negative"], ["additive"]),
                  helper.make_node("Add", ["scores", "additive"], ["masked"])]
        scores = "masked"
    nodes += [helper.make_node("Softmax", [scores], ["probs"], axis=-1),
              helper.make_node("IsNaN", ["probs"], ["nan"]),
              helper.make_node("Where", ["nan", "zero", "probs"], ["guarded"]),
              helper.make_node("Identity", ["guarded"], ["out"])]
    inits = [numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
             numpy_helper.from_array(np.array(mask_value or 0.0, np.float32), "negative")]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 1, 3, 3]),
         helper.make_tensor_value_info("mask", TensorProto.BOOL, [1, 1, 3, 3])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 1, 3, 3])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_a_fully_masked_row_attends_to_itself():
    model = _guarded_graph(float(np.finfo(np.float32).min))
    assert drop_softmax_nan_guards(model.graph) == 1
    onnx.checker.check_model(model, full_check=True)
    assert not any(n.op_type == "IsNaN" for n in model.graph.node)
    assert any(n.name.startswith(DIAGONAL_PREFIX) for n in model.graph.node)
    scores = np.arange(9, dtype=np.float32).reshape(1, 1, 3, 3)
    mask = np.array([[False, False, False], [True, True, False], [True, True, True]])
    session = ort.InferenceSession(model.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    out = session.run(None, {"scores": scores, "mask": mask.reshape(1, 1, 3, 3)})[0][0, 0]
    np.testing.assert_allclose(out[0], [1, 0, 0])  # was all masked: now its own position only
    expect = np.exp(scores[0, 0, 1, :2]) / np.exp(scores[0, 0, 1, :2]).sum()
    np.testing.assert_allclose(out[1], [*expect, 0], rtol=1e-6)  # rows with valid keys: as before


@pytest.mark.parametrize("mask_value", [None, -1.0])
def test_guards_it_does_not_understand_are_left_alone(mask_value):
    """No additive mask, or one whose value is not a large negative: the graph is unchanged."""
    model = _guarded_graph(mask_value)
    before = model.SerializeToString()
    assert drop_softmax_nan_guards(model.graph) == 0
    assert model.SerializeToString() == before
