"""SmoothQuant rewrite: finds norm -> linear groups and keeps the FP32 function."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from quantkit.data import TokenBlocks, resolve_text_source
from quantkit.errors import QuantkitError
from quantkit.smoothquant import (
    AUTO_GRID,
    alpha_error,
    choose_alpha,
    find_smooth_groups,
    parse_alpha,
    smooth_export,
    smooth_scales,
)


def _batches(tokenizer, n=4):
    return TokenBlocks(resolve_text_source("sample"), tokenizer, seq_len=32, num_samples=n,
                       batch_size=2)


def _logits(path, ids):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0]


def test_llama_groups(tiny_llama_export):
    groups = find_smooth_groups(onnx.load(str(tiny_llama_export.onnx_path)))
    by_kind = {}
    for g in groups:
        by_kind.setdefault(g.kind, []).append(g)
    # per layer: input_layernorm -> q/k/v, post_attention_layernorm -> gate/up; final norm -> head
    assert len(by_kind["norm"]) == 2 * 2 + 1
    assert len(by_kind["up-down"]) == 2
    qkv = by_kind["norm"][0]
    assert [lin.node.split("/")[-2] for lin in qkv.linears] == ["q_proj", "k_proj", "v_proj"]
    assert by_kind["norm"][-1].linears[0].node == "/lm_head/MatMul"


def test_gpt2_groups(tiny_gpt2_export):
    groups = find_smooth_groups(onnx.load(str(tiny_gpt2_export.onnx_path)))
    names = [[lin.node for lin in g.linears] for g in groups]
    assert ["/transformer/h.0/attn/c_attn/Gemm"] in names
    assert ["/transformer/h.0/mlp/c_fc/Gemm"] in names
    assert ["/lm_head/MatMul"] in names


@pytest.mark.parametrize("fixture", ["tiny_llama_export", "tiny_gpt2_export"])
def test_smoothed_graph_is_equivalent_in_fp32(request, fixture, tiny_tokenizer, tmp_path):
    export = request.getfixturevalue(fixture)
    out = smooth_export(export.onnx_path, _batches(tiny_tokenizer), tmp_path / "sq", alpha=0.5)
    ids = np.random.default_rng(0).integers(0, 512, (2, 40), dtype=np.int64)
    ref, new = _logits(export.onnx_path, ids), _logits(out, ids)
    rel = np.abs(ref - new).max() / np.abs(ref).max()
    assert rel < 1e-5
    manifest = (tmp_path / "sq" / "manifest.json").read_text()
    assert '"exporter": "quantkit.smoothquant"' in manifest
    # the scales actually did something: some weight changed
    before = {t.name for t in onnx.load(str(export.onnx_path)).graph.initializer}
    after = {t.name for t in onnx.load(str(out)).graph.initializer}
    assert any(".smoothquant_" in name for name in after - before)


def test_smoothing_moves_outliers_from_activation_to_weights(tiny_llama, tiny_tokenizer,
                                                             tmp_path):
    """Make one input channel of layer 0 an outlier: after smoothing its activation is tamer."""
    import torch

    from quantkit.export import export_model
    from quantkit.smoothquant import channel_amax

    model = tiny_llama.model
    with torch.no_grad():
        original = model.model.layers[0].input_layernorm.weight.clone()
        model.model.layers[0].input_layernorm.weight[3] = 40.0
    try:
        export = export_model(tiny_llama, tmp_path / "e")
    finally:
        with torch.no_grad():
            model.model.layers[0].input_layernorm.weight.copy_(original)
    act = "/model/layers.0/input_layernorm/Mul_1_output_0"
    before = channel_amax(export.onnx_path, _batches(tiny_tokenizer), [act])[act]
    out = smooth_export(export.onnx_path, _batches(tiny_tokenizer), tmp_path / "sq", alpha=0.5)
    groups = {g.activation: g for g in find_smooth_groups(onnx.load(str(out)))}
    after = channel_amax(out, _batches(tiny_tokenizer), [act])[act]
    assert act in groups
    assert before.max() / np.median(before) > 10
    assert after.max() / np.median(after) < before.max() / np.median(before) / 3


def test_scales_formula():
    s = smooth_scales(np.array([4.0, 1.0]), np.array([1.0, 4.0]), alpha=0.5)
    np.testing.assert_allclose(s, [2.0, 0.5])
    np.testing.assert_allclose(smooth_scales(np.array([0.0]), np.array([1.0]), 0.5), [3.16e-3],
                               rtol=1e-2)


def test_bad_alpha_and_no_batches(tiny_llama_export, tiny_tokenizer, tmp_path):
    with pytest.raises(QuantkitError, match="alpha must be within"):
        smooth_export(tiny_llama_export.onnx_path, _batches(tiny_tokenizer), tmp_path / "a",
                      alpha=1.5)
    with pytest.raises(QuantkitError, match="needs calibration batches"):
        smooth_export(tiny_llama_export.onnx_path, [], tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def _outlier_case(rng, act_outlier: float, weight_outlier: float):
    x = rng.standard_normal((512, 64))
    x[:, 7] *= act_outlier
    w = rng.standard_normal((64, 48))
    w[11] *= weight_outlier
    return x, np.abs(x).max(axis=0), [w]


@pytest.mark.parametrize(("act_outlier", "weight_outlier"), [(200.0, 1.0), (1.0, 200.0)])
def test_auto_alpha_balances_activation_and_weight_outliers(act_outlier, weight_outlier):
    """An outlier channel in the activation, or an outlier input row in the weight: the chosen
    alpha shares the range between the two, far better than either extreme."""
    rng = np.random.default_rng(0)
    x, amax, weights = _outlier_case(rng, act_outlier, weight_outlier)
    alpha, errors = choose_alpha(x, amax, weights)
    assert set(errors) == {f"{a:g}" for a in AUTO_GRID}
    assert errors[f"{alpha:g}"] == min(errors.values())
    assert 0.3 <= alpha <= 0.8
    assert errors[f"{alpha:g}"] < min(errors["0"], errors["1"]) / 3


def test_auto_alpha_without_outliers_is_not_forced():
    rng = np.random.default_rng(0)
    x, amax, weights = _outlier_case(rng, 1.0, 1.0)
    alpha, errors = choose_alpha(x, amax, weights)
    # the errors are all small and close; the choice is still the minimum
    assert max(errors.values()) < 3 * min(errors.values()) < 1e-3
    assert alpha_error(x, amax, weights, alpha) == pytest.approx(min(errors.values()))


def test_alpha_error_measures_fake_quant_output_error():
    rng = np.random.default_rng(1)
    x, amax, weights = _outlier_case(rng, 1.0, 1.0)
    error = alpha_error(x, amax, weights, 0.5)
    # int8 of gaussian data: a relative squared error of order 1e-4, not zero and not large
    assert 1e-6 < error < 1e-2


def test_auto_alpha_export_is_equivalent_and_records_alphas(tiny_llama_export, tiny_tokenizer,
                                                             tmp_path):
    out = smooth_export(tiny_llama_export.onnx_path, _batches(tiny_tokenizer), tmp_path / "sq",
                        alpha="auto")
    ids = np.random.default_rng(0).integers(0, 512, (2, 40), dtype=np.int64)
    ref, new = _logits(tiny_llama_export.onnx_path, ids), _logits(out, ids)
    assert np.abs(ref - new).max() / np.abs(ref).max() < 1e-5
    import json

    summary = json.loads((tmp_path / "sq" / "manifest.json").read_text())["smoothquant"]
    assert summary["alpha"] == "auto"
    assert len(summary["groups"]) == 7
    for group in summary["groups"]:
        assert group["alpha"] in AUTO_GRID
        assert group["alpha_errors"][f"{group['alpha']:g}"] == min(group["alpha_errors"].values())


@pytest.mark.parametrize(("text", "expected"), [("auto", "auto"), ("AUTO", "auto"),
                                                ("0.25", 0.25), (0.5, 0.5), (None, None)])
def test_parse_alpha(text, expected):
    assert parse_alpha(text) == expected


@pytest.mark.parametrize("text", ["1.5", "-0.1", "high"])
def test_parse_alpha_rejects(text):
    with pytest.raises(QuantkitError, match="alpha"):
        parse_alpha(text)
