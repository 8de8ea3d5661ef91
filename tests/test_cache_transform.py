"""Rotation and SmoothQuant on the KV-cache graph: the source cache graph's function over padded
prefills and cached decode steps, the weights of the same transform on the plain export, tables
of the transformed plain export carried over, INT8 cache engines built, refusals."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from quantkit.errors import QuantkitError
from quantkit.export_cache import CacheLayout, hf_positions
from tests.build_helpers import INT8_LOGIT_TOLERANCE, make_table, run_onnx, token_feeds


@pytest.fixture(scope="module")
def rotated_pair(tiny_llama_export, tiny_llama_cache_export, tmp_path_factory):
    """The tiny Llama's plain and cache exports, each rotated with seed 5."""
    from quantkit.rotation import rotate_export

    root = tmp_path_factory.mktemp("rotated")
    plain = rotate_export(tiny_llama_export.onnx_path, root / "plain", seed=5)
    cache = rotate_export(tiny_llama_cache_export.onnx_path, root / "cache", seed=5)
    return plain, cache


@pytest.fixture(scope="module")
def smoothed_pair(tiny_gpt2_export, tiny_gpt2_cache_export, tmp_path_factory):
    """The tiny GPT-2's plain export smoothed (alpha per group), and its cache export smoothed
    by carrying the plain smoothing."""
    from quantkit.cache_transform import smooth_cache_export
    from quantkit.smoothquant import smooth_export

    root = tmp_path_factory.mktemp("smoothed")
    plain = smooth_export(tiny_gpt2_export.onnx_path, token_feeds(2, seq=24), root / "plain",
                          alpha="auto")
    cache = smooth_cache_export(tiny_gpt2_cache_export.onnx_path, tiny_gpt2_export.onnx_path,
                                plain, root / "cache")
    return plain, cache


def _decode(onnx_path, layout: CacheLayout, steps: int = 3) -> tuple[list, dict]:
    """Logits of a left-padded prefill and ``steps`` decode steps on the graph's own presents,
    and the last presents."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path))
    rng = np.random.default_rng(11)
    ids = rng.integers(0, 512, (3, 10), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :7] = 0
    names = ["logits", *layout.present_names]
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": hf_positions(mask),
             **layout.empty_past(3)}
    out = dict(zip(names, session.run(names, feeds), strict=True))
    logits = [out["logits"]]
    positions = feeds["position_ids"]
    for _ in range(steps):
        mask = np.concatenate([mask, np.ones((3, 1), dtype=mask.dtype)], axis=1)
        positions = positions[:, -1:] + 1
        feeds = {"input_ids": rng.integers(0, 512, (3, 1), dtype=np.int64),
                 "attention_mask": mask, "position_ids": positions,
                 **{p: out[q] for p, q in zip(layout.past_names, layout.present_names,
                                              strict=True)}}
        out = dict(zip(names, session.run(names, feeds), strict=True))
        logits.append(out["logits"])
    return logits, out


def _relative(ref, new) -> float:
    ref, new = np.concatenate(ref), np.concatenate(new)
    return float(np.abs(ref - new).max() / np.abs(ref).max())


def _linear_weights(onnx_path) -> dict[str, np.ndarray]:
    """Every MatMul/Gemm's constant inputs as the node reads them, by node name and position."""
    from quantkit.cache_transform import _constant
    from quantkit.graph_edit import graph_index

    model = onnx.load(str(onnx_path))
    producers, _, inits = graph_index(model.graph)
    found = {}
    for node in model.graph.node:
        if node.op_type in ("MatMul", "Gemm"):
            for i, name in enumerate(node.input):
                value = _constant(name, inits, producers, onnx_path.parent)
                if value is not None:
                    found[f"{node.name}:{i}"] = value
    return found


def test_rotated_cache_graph_computes_the_source_over_decode_steps(rotated_pair,
                                                                     tiny_llama_cache_export):
    _, cache = rotated_pair
    layout = CacheLayout.from_dict(tiny_llama_cache_export.manifest["cache"])
    ref, ref_out = _decode(tiny_llama_cache_export.onnx_path, layout)
    new, new_out = _decode(cache, layout)
    assert _relative(ref, new) < 1e-4
    # keys are the source's; values are rotated per head, so only this graph may read them
    key, value = "present.1.key", "present.1.value"
    assert np.abs(ref_out[key] - new_out[key]).max() < 1e-4 * np.abs(ref_out[key]).max()
    assert np.abs(ref_out[value] - new_out[value]).max() > 0.1 * np.abs(ref_out[value]).max()
    manifest = json.loads((cache.parent / "manifest.json").read_text())
    assert manifest["cache"] == tiny_llama_cache_export.manifest["cache"]
    assert manifest["check"]["decode_steps"] == 3 and manifest["check"]["relative_error"] < 1e-4
    assert manifest["check"]["padding"] == ["right", "left"]
    assert manifest["rotation"]["down"]["layers"] == 2


def test_rotated_cache_graph_has_the_rotated_plain_exports_weights(rotated_pair):
    plain, cache = rotated_pair
    plain_weights, cache_weights = _linear_weights(plain), _linear_weights(cache)
    assert set(plain_weights) == set(cache_weights)
    assert any("online_hadamard" in k for k in plain_weights)
    for key, value in plain_weights.items():
        assert np.array_equal(value, cache_weights[key]), key


def test_rotated_table_carries_to_the_rotated_cache_graph(rotated_pair,
                                                          tiny_llama_cache_export, tmp_path):
    """The rotated plain export's table (GPTQ-free MinMax) builds an INT8 engine of the rotated
    cache graph whose prefill is the rotated plain INT8 engine's last position (attention as
    exported: fused attention is float, tests/test_attention_fusion.py)."""
    from quantkit.build import build_engine

    plain, cache = rotated_pair
    table = make_table(plain, token_feeds(2, seq=24))
    plain_engine = build_engine(tmp_path / "plain", precision="int8", onnx=plain.parent,
                                table=table)
    engine = build_engine(tmp_path / "cache", precision="int8", onnx=cache.parent, table=table,
                          table_onnx=plain, options={"attention": "graph"})
    assert engine.manifest["cache"] == tiny_llama_cache_export.manifest["cache"]
    # the same MatMuls INT8 (the Hadamard chains FP32); coverage differs: the cache graph's LM
    # head runs on the last position only
    counts = engine.manifest["as_built_counts"]
    assert counts["int8"] == plain_engine.manifest["as_built_counts"]["int8"]
    assert 0.9 < engine.manifest["int8_coverage"] < 1.0
    feed = token_feeds(1, batch=2, seq=20, seed=5)[0]
    layout = CacheLayout.from_dict(engine.manifest["cache"])
    prefill = {**feed, "position_ids": hf_positions(feed["attention_mask"]),
               **layout.empty_past(2)}
    ref = run_onnx(plain_engine.path / "engine.onnx", feed)[:, -1:]
    got = run_onnx(engine.path / "engine.onnx", prefill)
    assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-4
    fp32 = run_onnx(plain, feed)[:, -1:]
    assert np.abs(got - fp32).max() / np.abs(fp32).max() < INT8_LOGIT_TOLERANCE


def test_rotated_table_is_refused_for_another_rotation(rotated_pair, tiny_llama_cache_export,
                                                       tmp_path):
    from quantkit.build import build_engine
    from quantkit.rotation import rotate_export

    plain, _ = rotated_pair
    table = make_table(plain, token_feeds(1, seq=16))
    other = rotate_export(tiny_llama_cache_export.onnx_path, tmp_path / "seed6", seed=6)
    for cache in (tiny_llama_cache_export.onnx_path, other):
        with pytest.raises(QuantkitError, match="different weights.*same seed"):
            build_engine(tmp_path / "e", precision="int8", onnx=cache.parent, table=table,
                         table_onnx=plain)
    assert not (tmp_path / "e").exists()


def test_a_rotation_that_changes_the_cache_graphs_function_writes_nothing(
        tiny_llama_cache_export, tmp_path, monkeypatch):
    import quantkit.rotation as rotation

    monkeypatch.setattr(rotation, "random_signs", lambda n, seed: np.full(n, 2.0))  # not ±1
    with pytest.raises(QuantkitError, match="rotated cache graph does not compute.*decode"):
        rotation.rotate_export(tiny_llama_cache_export.onnx_path, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_cli_rotates_a_cache_export_and_generates_the_same_tokens(tiny_llama_cache_export,
                                                                  tmp_path):
    from quantkit.build import build_engine
    from quantkit.cli.main import cli
    from quantkit.generate import generate

    result = CliRunner().invoke(cli, ["rotate", "--onnx", str(tiny_llama_cache_export.directory),
                                      "--out", str(tmp_path / "rot")])
    assert result.exit_code == 0, result.output
    source = build_engine(tmp_path / "src", precision="fp32",
                          onnx=tiny_llama_cache_export.directory)
    rotated = build_engine(tmp_path / "e", precision="fp32", onnx=tmp_path / "rot")
    prompts = ["The", "A cat sat on the mat and"]
    ref = generate(source, prompts, max_new_tokens=12, threads=1)
    got = generate(rotated, prompts, max_new_tokens=12, threads=1)
    assert got.tokens == ref.tokens and len(got.tokens[1]) == 12


def test_smoothed_cache_graph_computes_the_source_and_has_the_plain_weights(
        smoothed_pair, tiny_gpt2_cache_export):
    plain, cache = smoothed_pair
    layout = CacheLayout.from_dict(tiny_gpt2_cache_export.manifest["cache"])
    ref, _ = _decode(tiny_gpt2_cache_export.onnx_path, layout)
    new, _ = _decode(cache, layout)
    assert _relative(ref, new) < 1e-4
    plain_weights, cache_weights = _linear_weights(plain), _linear_weights(cache)
    assert set(plain_weights) == set(cache_weights)
    for key, value in plain_weights.items():
        assert np.array_equal(value, cache_weights[key]), key
    manifest = json.loads((cache.parent / "manifest.json").read_text())
    # 5 LayerNorms (scale and bias) and the 5 linears they feed, the tied LM head among them
    assert manifest["smoothquant"]["carried"] == {"constants": 15, "nodes": 10}
    assert manifest["check"]["decode_steps"] == 3 and manifest["cache"]


def test_smoothed_table_carries_and_builds(smoothed_pair, tmp_path):
    from quantkit.build import build_engine

    plain, cache = smoothed_pair
    table = make_table(plain, token_feeds(2, seq=24))
    engine = build_engine(tmp_path / "e", precision="int8", onnx=cache.parent, table=table,
                          table_onnx=plain, options={"attention": "graph"})
    assert engine.manifest["int8_coverage"] > 0.9


def test_smoothing_is_not_carried_to_another_models_cache_graph(
        smoothed_pair, tiny_gpt2_export, tiny_tokenizer, tmp_path):
    from quantkit.cache_transform import smooth_cache_export
    from quantkit.export import export_model
    from tests.conftest import loaded, make_tiny_gpt2

    other = export_model(loaded(make_tiny_gpt2(seed=4), tiny_tokenizer, "other"),
                         tmp_path / "other", with_cache=True)
    with pytest.raises(QuantkitError, match="reads other weights"):
        smooth_cache_export(other.onnx_path, tiny_gpt2_export.onnx_path, smoothed_pair[0],
                            tmp_path / "out")
    assert not (tmp_path / "out").exists()
