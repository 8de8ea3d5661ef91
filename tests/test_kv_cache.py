"""The KV-cache export (``export --with-cache``): layout, checks, names shared with the plain
export, plans and tables of the plain export on the cache graph, engine builds."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from quantkit.errors import QuantkitError
from quantkit.export import export_model
from quantkit.export_cache import CacheLayout, hf_positions
from tests.build_helpers import INT8_LOGIT_TOLERANCE, make_table, token_feeds

CACHE_FIXTURES = ["tiny_llama_cache_export", "tiny_gpt2_cache_export"]


@pytest.mark.parametrize("fixture,kv_heads", [("tiny_llama_cache_export", 2),
                                              ("tiny_gpt2_cache_export", 4)])
def test_cache_export_layout_names_and_check(request, fixture, kv_heads):
    result = request.getfixturevalue(fixture)
    manifest = result.manifest
    cache = manifest["cache"]
    assert (cache["num_layers"], cache["num_kv_heads"], cache["head_dim"]) == (2, kv_heads, 16)
    assert cache["dtype"] == "float32"
    assert manifest["inputs"]["with_cache"] is True
    check = manifest["check"]
    assert check["relative_error"] < 1e-4
    assert check["decode_steps"] >= 3 and check["padding"] == ["right", "left"]
    graph = onnx.load(str(result.onnx_path)).graph
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
              for i in graph.input}
    assert list(inputs) == cache["inputs"]
    assert inputs["attention_mask"] == ["batch", "total_seq"]
    assert inputs["past_key_values.1.value"] == ["batch", kv_heads, "past_seq", 16]
    assert [o.name for o in graph.output] == cache["outputs"] == manifest["outputs"]


@pytest.mark.parametrize("fixture,model", [("tiny_llama_cache_export", "tiny_llama"),
                                           ("tiny_gpt2_cache_export", "tiny_gpt2")])
def test_prefill_then_decode_matches_torch(request, fixture, model):
    """Left-padded prefill, then 4 decode steps on ONNX Runtime's own presents, against the HF
    model run on the whole sequence at once (no cache)."""
    import onnxruntime as ort
    import torch

    export = request.getfixturevalue(fixture)
    hf = request.getfixturevalue(model).model
    layout = CacheLayout.from_dict(export.manifest["cache"])
    session = ort.InferenceSession(str(export.onnx_path))
    rng = np.random.default_rng(3)
    full = rng.integers(0, 512, (3, 13), dtype=np.int64)
    mask = np.ones_like(full)
    mask[1, :4] = 0
    mask[2, :8] = 0
    prompt, steps = 9, 4
    feeds = {"input_ids": full[:, :prompt], "attention_mask": mask[:, :prompt],
             "position_ids": hf_positions(mask[:, :prompt]), **layout.empty_past(3)}
    names = ["logits", *layout.present_names]
    out = dict(zip(names, session.run(names, feeds), strict=True))
    logits = [out["logits"]]
    for k in range(steps):
        end = prompt + k + 1
        feeds = {"input_ids": full[:, end - 1:end], "attention_mask": mask[:, :end],
                 "position_ids": hf_positions(mask[:, :end])[:, -1:],
                 **{p: out[q] for p, q in zip(layout.past_names, layout.present_names,
                                              strict=True)}}
        out = dict(zip(names, session.run(names, feeds), strict=True))
        logits.append(out["logits"])
    assert all(step.shape == (3, 1, 512) for step in logits)  # the last position's only
    got = np.concatenate(logits, axis=1)
    with torch.no_grad():
        ref = hf(input_ids=torch.from_numpy(full), attention_mask=torch.from_numpy(mask),
                 position_ids=torch.from_numpy(hf_positions(mask)), use_cache=False).logits
    ref = ref.numpy()[:, prompt - 1:]  # the prompt's last token, then each decode step
    assert mask[:, prompt - 1:].all()
    assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-4
    assert out["present.0.key"].shape == (3, layout.num_kv_heads, 13, layout.head_dim)


@pytest.mark.parametrize("plain,cache", [("tiny_llama_export", "tiny_llama_cache_export"),
                                         ("tiny_gpt2_export", "tiny_gpt2_cache_export")])
def test_linear_node_names_match_the_plain_export(request, plain, cache):
    def linear(path):
        return {n.name for n in onnx.load(str(path)).graph.node if n.op_type in ("MatMul", "Gemm")}

    plain_nodes = linear(request.getfixturevalue(plain).onnx_path)
    assert plain_nodes == linear(request.getfixturevalue(cache).onnx_path)


@pytest.mark.parametrize("config", ["mixed-safe.yaml", "smollm2-135m.yaml", "int8.yaml"])
def test_plain_export_plan_resolves_on_the_cache_graph(tiny_llama_export,
                                                       tiny_llama_cache_export, config):
    """The repository's plans, written against plain exports, decide every MatMul and Softmax of
    the cache graph as they decide the plain graph's node of the same name."""
    from quantkit.plan import PlanRecipe, Precision, resolve_plan
    from tests.conftest import REPO

    recipe = PlanRecipe.load(REPO / "configs" / config)
    plain = resolve_plan(recipe, tiny_llama_export.onnx_path)
    cache = resolve_plan(recipe, tiny_llama_cache_export.onnx_path)

    def decided(plan):
        return {n: (d.precision, d.rule) for n, d in plan.decisions.items()
                if d.op_type in ("MatMul", "Gemm", "Softmax")}

    assert decided(cache) == decided(plain)
    assert len(cache.nodes_with(Precision.INT8)) > 0


def test_with_cache_and_with_nll_do_not_combine(tiny_llama, tmp_path):
    with pytest.raises(QuantkitError, match="do not combine"):
        export_model(tiny_llama, tmp_path / "x", with_nll=True, with_cache=True)
    assert not (tmp_path / "x").exists()


def test_cli_refuses_with_cache_and_with_nll_before_loading(tmp_path):
    from quantkit.cli.main import cli

    result = CliRunner().invoke(cli, ["export", "--model", "no/such-model", "--with-cache",
                                      "--with-nll", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2
    assert "do not combine" in result.output


@pytest.mark.parametrize("fixture", CACHE_FIXTURES)
def test_fp32_build_of_a_cache_export_records_the_layout(request, fixture, tmp_path):
    from quantkit.build import build_engine

    export = request.getfixturevalue(fixture)
    engine = build_engine(tmp_path / "e", precision="fp32", onnx=export.directory)
    assert engine.manifest["cache"] == export.manifest["cache"]
    assert engine.manifest["coverage"]["total_macs"] > 0


def _prefill_feeds(layout: CacheLayout, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    batch = feed["input_ids"].shape[0]
    return {**feed, "position_ids": hf_positions(feed["attention_mask"]),
            **layout.empty_past(batch)}


@pytest.mark.parametrize("plain_fixture,cache_fixture", [
    ("tiny_llama_export", "tiny_llama_cache_export"),
    ("tiny_gpt2_export", "tiny_gpt2_cache_export")])
def test_int8_cache_engine_from_the_plain_exports_table(request, plain_fixture, cache_fixture,
                                                        tmp_path):
    """A table calibrated on the plain export, carried to the cache graph, quantizes the same
    tensors with the same ranges: the INT8 cache engine's prefill is the plain INT8 engine's
    (attention as exported: fused attention runs in float, tests/test_attention_fusion.py)."""
    from quantkit.backends.base import Engine
    from quantkit.build import build_engine
    from tests.build_helpers import run_onnx

    plain_export = request.getfixturevalue(plain_fixture)
    cache_export = request.getfixturevalue(cache_fixture)

    table = make_table(plain_export.onnx_path, token_feeds(2, seq=24))
    plain = build_engine(tmp_path / "plain", precision="int8", onnx=plain_export.directory,
                         table=table)
    with pytest.raises(QuantkitError, match="belongs to another graph"):
        build_engine(tmp_path / "x", precision="int8", onnx=cache_export.directory,
                     table=table)
    cached = build_engine(tmp_path / "cache", precision="int8",
                          onnx=cache_export.directory, table=table,
                          table_onnx=plain_export.onnx_path, options={"attention": "graph"})
    assert cached.manifest["int8_coverage"] == pytest.approx(plain.manifest["int8_coverage"])
    assert cached.manifest["as_built_counts"]["int8"] == plain.manifest["as_built_counts"]["int8"]
    feed = token_feeds(1, batch=2, seq=20, seed=5)[0]
    layout = CacheLayout.from_dict(cached.manifest["cache"])
    ref = run_onnx(Engine.load(plain.path).path / "engine.onnx", feed)[:, -1:]
    got = run_onnx(cached.path / "engine.onnx", _prefill_feeds(layout, feed))
    fp32 = run_onnx(plain_export.onnx_path, feed)[:, -1:]
    assert got.shape == ref.shape  # the cache graph gives the last position's logits
    assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-4
    assert np.abs(got - fp32).max() / np.abs(fp32).max() < INT8_LOGIT_TOLERANCE


def test_a_table_of_other_weights_is_refused(tiny_llama_cache_export, tmp_path,
                                             tiny_tokenizer):
    from quantkit.build import build_engine
    from tests.conftest import loaded, make_tiny_llama

    other = export_model(loaded(make_tiny_llama(seed=7), tiny_tokenizer, "other"),
                         tmp_path / "other")
    table = make_table(other.onnx_path, token_feeds(1, seq=16))
    with pytest.raises(QuantkitError, match="different weights"):
        build_engine(tmp_path / "e", precision="int8", onnx=tiny_llama_cache_export.directory,
                     table=table, table_onnx=other.onnx_path)
    assert not (tmp_path / "e").exists()


def test_calibrate_refuses_a_cache_graph(tiny_llama_cache_export):
    """Calibration reads full-sequence activations; eval scores cache engines token by token
    (tests/eval/test_generation.py)."""
    from quantkit.calib.run import refuse_cache_graph

    with pytest.raises(QuantkitError, match="KV-cache export.*calibrate a plain export"):
        refuse_cache_graph(tiny_llama_cache_export.onnx_path)
