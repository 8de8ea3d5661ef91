"""ONNX Runtime INT8 engines whose activations are quantized per block of each row at run time
(--activations blockwise, ``MatMulNBits``): the weights as built, what the kernel computes, the
engine, and the refusals."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from quantkit.dynamic_quant import BLOCK_SIZE, to_blockwise_activations
from quantkit.environment import cpu_isa
from quantkit.errors import QuantkitError
from tests.backends.test_dynamic_activations import _static_matmul
from tests.backends.test_onnxruntime import CONFIGS, build, run_engine
from tests.build_helpers import INT8_LOGIT_TOLERANCE, run_onnx

pytest_plugins = ("tests.fixtures_build",)

needs_vnni = pytest.mark.skipif(cpu_isa().u8s8_saturates,
                                reason="activations=blockwise is refused on x86 without VNNI")


def _blockwise_reference(x: np.ndarray, weights_u8: np.ndarray, w_scale: np.ndarray,
                         block: int) -> np.ndarray:
    """Each row of x quantized to int8 per block of ``block`` along K (symmetric, amax / 127),
    integer products with the built weights (value - 128), both scales."""
    k = x.shape[1]
    out = np.zeros((x.shape[0], weights_u8.shape[1]), np.float64)
    w = weights_u8.astype(np.float64) - 128
    for start in range(0, k, block):
        part = x[:, start:start + block].astype(np.float64)
        scale = np.abs(part).max(axis=1, keepdims=True) / 127
        scale[scale == 0] = 1
        out += (np.rint(part / scale) @ w[start:start + block]) * scale
    return (out * w_scale).astype(np.float32)


@needs_vnni
@pytest.mark.parametrize("k", [64, 48])  # 48: the last block padded with zero weights
def test_blockwise_matmul_keeps_the_weights_and_quantizes_rows_per_block(k):
    rng = np.random.default_rng(0)
    weights = rng.integers(1, 256, (k, 8), dtype=np.uint8)
    w_scale = rng.uniform(0.001, 0.01, 8)
    model = _static_matmul(weights, w_scale, x_scale=0.5)  # a table's scale: not used after
    assert to_blockwise_activations(model) == 1
    onnx.checker.check_model(model, full_check=True)
    node = next(n for n in model.graph.node)
    assert [n.op_type for n in model.graph.node] == ["MatMulNBits"]
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    stored = inits[node.input[1]]
    blocks = -(-k // BLOCK_SIZE)
    assert stored.shape == (8, blocks, BLOCK_SIZE)
    np.testing.assert_array_equal(stored.reshape(8, -1).T[:k], weights)  # the built weights
    assert np.all(stored.reshape(8, -1).T[k:] == 128)
    np.testing.assert_array_equal(inits[node.input[2]].reshape(8, blocks)[:, 0],
                                  w_scale.astype(np.float32))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = rng.normal(0, 3, (2, k)).astype(np.float32)
    x[0, :BLOCK_SIZE] *= 100  # one loud block: per-block ranges keep the rest of the row fine
    y = session.run(None, {"x": x})[0]
    ref = _blockwise_reference(x, weights, w_scale, BLOCK_SIZE)
    exact = x.astype(np.float64) @ ((weights.astype(np.float64) - 128) * w_scale)
    assert np.max(np.abs(y - ref)) / np.max(np.abs(ref)) < 2e-2
    assert np.max(np.abs(y - exact)) / np.max(np.abs(exact)) < 2e-2


@needs_vnni
def test_blockwise_int8_engine(tiny_llama_export, llama_table, eval_feed, tmp_path):
    static = build(tiny_llama_export, "int8", tmp_path / "s", plan=str(CONFIGS / "int8.yaml"),
                   table=llama_table)
    blockwise = build(tiny_llama_export, "int8", tmp_path / "b",
                      plan=str(CONFIGS / "int8.yaml"), table=llama_table,
                      activations="blockwise")
    m = blockwise.manifest
    # 13 MatMuls after merging those that share an input; 4 of them read two activations
    # (attention) and keep their static Q/DQ
    assert m["activations"]["mode"] == "blockwise" and m["activations"]["matmuls"] == 9
    assert m["activations"]["block_size"] == BLOCK_SIZE
    assert m["as_built_counts"] == static.manifest["as_built_counts"]
    assert m["onnxruntime_fusion"]["integer_ops"].get("MatMulNBits") == 9
    ref = run_onnx(tiny_llama_export.onnx_path, eval_feed)
    out_blockwise, out_static = run_engine(blockwise, eval_feed), run_engine(static, eval_feed)
    error = np.max(np.abs(out_blockwise - ref)) / np.max(np.abs(ref))
    assert 0 < error < INT8_LOGIT_TOLERANCE
    assert np.max(np.abs(out_blockwise - out_static)) > 0


def test_blockwise_is_refused_where_it_is_not_measured(tiny_llama_export, llama_table,
                                                       tmp_path, monkeypatch):
    from dataclasses import replace

    import quantkit.backends.onnxruntime as backend

    isa = cpu_isa()
    avx2 = replace(isa, name="avx2", flags=("avx2",), arch="x86_64")
    monkeypatch.setattr(backend, "cpu_isa", lambda: avx2)
    assert avx2.u8s8_saturates
    with pytest.raises(QuantkitError, match="activations=blockwise is measured only on CPUs "
                                            "with VNNI"):
        build(tiny_llama_export, "int8", tmp_path / "e", plan=str(CONFIGS / "int8.yaml"),
              table=llama_table, activations="blockwise")
    assert not (tmp_path / "e").exists()


def test_blockwise_without_int8_nodes_is_refused(tiny_llama_export, tmp_path):
    with pytest.raises(QuantkitError, match="activations=blockwise needs INT8 nodes"):
        build(tiny_llama_export, "fp32", tmp_path / "e", activations="blockwise")
