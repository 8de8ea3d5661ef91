"""Fused attention in ONNX Runtime KV-cache engines (``quantkit.attention_fusion``): what is
replaced, that the fused graph computes the export's function, what the build records, and the
refusals."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from quantkit.attention_fusion import (
    ATTENTION_OPSET,
    attention_kernel_available,
    check_fused_export,
    fuse_cache_attention,
)
from quantkit.errors import QuantkitError
from tests.build_helpers import make_table, token_feeds
from tests.cli.cli_helpers import invoke, one_line_error

CACHE_FIXTURES = ["tiny_llama_cache_export", "tiny_gpt2_cache_export"]

pytestmark = pytest.mark.skipif(attention_kernel_available() is not None,
                                reason=str(attention_kernel_available()))


def _ops(path) -> dict[str, int]:
    from collections import Counter

    return dict(Counter(n.op_type for n in onnx.load(str(path)).graph.node))


@pytest.mark.parametrize("fixture", CACHE_FIXTURES)
def test_each_layer_becomes_one_attention_node(request, fixture):
    export = request.getfixturevalue(fixture)
    model = onnx.load(str(export.onnx_path))
    softmaxes = sum(n.op_type == "Softmax" for n in model.graph.node)
    concats = sum(n.op_type == "Concat" for n in model.graph.node)
    before = len(model.graph.node)
    fusion = fuse_cache_attention(model)
    ops = [n.op_type for n in model.graph.node]
    assert len(fusion.layers) == softmaxes == 2
    assert ops.count("Attention") == 2 and "Softmax" not in ops
    assert ops.count("Concat") <= concats - 4  # the present Concats at least
    assert fusion.removed_nodes == before - len(ops) > 10
    assert len(fusion.replaced_matmuls) == 4
    assert {layer.present_key for layer in fusion.layers} == {"present.0.key", "present.1.key"}
    assert next(o.version for o in model.opset_import if o.domain == "") == ATTENTION_OPSET
    onnx.checker.check_model(model, full_check=True)


@pytest.mark.parametrize("fixture", CACHE_FIXTURES)
def test_fused_graph_computes_the_exports_function(request, fixture, tmp_path):
    """Padded prefills and cached decode steps, each graph reading its own presents."""
    check = check_fused_export(request.getfixturevalue(fixture).onnx_path, tmp_path)
    assert check["layers"] == 2
    assert check["relative_error"] <= 1e-4 and check["decode_steps"] >= 3
    assert list(tmp_path.iterdir()) == []  # the scratch graph is removed


def test_a_different_softmax_axis_is_left_alone(tiny_llama_cache_export):
    model = onnx.load(str(tiny_llama_cache_export.onnx_path))
    softmax = next(n for n in model.graph.node if n.op_type == "Softmax")
    del softmax.attribute[:]
    softmax.attribute.append(onnx.helper.make_attribute("axis", 1))
    fusion = fuse_cache_attention(model)
    assert len(fusion.layers) == 1
    assert sum(n.op_type == "Softmax" for n in model.graph.node) == 1


def test_plain_export_is_never_changed(tiny_llama_export, tmp_path):
    from quantkit.build import build_engine

    engine = build_engine(tmp_path / "e", precision="fp32", onnx=tiny_llama_export.directory)
    assert engine.manifest["attention"] == {"fused": False, "reason": "not a KV-cache graph"}
    assert (engine.path / "engine.onnx").read_bytes() == tiny_llama_export.onnx_path.read_bytes()
    with pytest.raises(QuantkitError, match="cannot fuse attention: not a KV-cache graph"):
        build_engine(tmp_path / "f", precision="fp32", onnx=tiny_llama_export.directory,
                     options={"attention": "fused"})
    assert not (tmp_path / "f").exists()


@pytest.mark.parametrize("fixture", CACHE_FIXTURES)
def test_fp32_cache_engine_is_fused_and_generates_the_same_tokens(request, fixture, tmp_path):
    from quantkit.backends.base import Engine
    from quantkit.build import build_engine
    from quantkit.generate import generate

    export = request.getfixturevalue(fixture)
    fused = build_engine(tmp_path / "fused", precision="fp32", onnx=export.directory)
    graph = build_engine(tmp_path / "graph", precision="fp32", onnx=export.directory,
                         options={"attention": "graph"})
    record = fused.manifest["attention"]
    assert record["fused"] and record["layers"] == 2 and record["planned_int8_now_float"] == []
    assert record["check"]["relative_error"] <= 1e-4
    assert graph.manifest["attention"] == {"fused": False,
                                           "reason": "attention=graph: left as exported"}
    assert _ops(fused.path / "engine.onnx").get("Attention") == 2
    assert "Attention" not in _ops(graph.path / "engine.onnx")
    prompts = ["the cat sat on", "a b c"]
    tokens = [generate(Engine.load(e.path), prompts, max_new_tokens=12).tokens
              for e in (fused, graph)]
    assert tokens[0] == tokens[1]


def test_int8_cache_engine_runs_attention_in_float(tiny_llama_export, tiny_llama_cache_export,
                                                   tmp_path):
    """An all-INT8 plan: the attention MatMuls' Q/DQ go with them, the rest stays INT8."""
    from quantkit.build import build_engine
    from tests.build_helpers import run_onnx

    table = make_table(tiny_llama_export.onnx_path, token_feeds(2, seq=24))
    kwargs = {"precision": "int8", "onnx": tiny_llama_cache_export.directory, "table": table,
              "table_onnx": tiny_llama_export.onnx_path}
    fused = build_engine(tmp_path / "fused", **kwargs)
    graph = build_engine(tmp_path / "graph", options={"attention": "graph"}, **kwargs)
    record = fused.manifest["attention"]
    attention_matmuls = sorted(record["replaced_matmuls"])
    assert sorted(record["planned_int8_now_float"]) == attention_matmuls
    assert all("self_attn/MatMul" in n for n in attention_matmuls)
    assert record["removed_qdq"] > 0
    counts = fused.manifest["as_built_counts"], graph.manifest["as_built_counts"]
    assert counts[0]["int8"] == counts[1]["int8"] - 4
    assert fused.manifest["int8_coverage"] < graph.manifest["int8_coverage"]
    ops = _ops(fused.path / "engine.onnx")
    assert ops["Attention"] == 2 and ops["QuantizeLinear"] < _ops(
        graph.path / "engine.onnx")["QuantizeLinear"]
    # the prefill's logits stay within INT8's tolerance of FP32's
    from quantkit.export_cache import CacheLayout, hf_positions
    from tests.build_helpers import INT8_LOGIT_TOLERANCE

    feed = token_feeds(1, batch=2, seq=20, seed=5)[0]
    layout = CacheLayout.from_dict(fused.manifest["cache"])
    feeds = {**feed, "position_ids": hf_positions(feed["attention_mask"]),
             **layout.empty_past(2)}
    fp32 = run_onnx(tiny_llama_cache_export.onnx_path, feeds)
    got = run_onnx(fused.path / "engine.onnx", feeds)
    assert np.abs(got - fp32).max() / np.abs(fp32).max() < INT8_LOGIT_TOLERANCE


def test_cli_attention_flag(tiny_llama_export, tiny_llama_cache_export, tmp_path):
    result = invoke("build", "--onnx", tiny_llama_cache_export.directory, "--precision", "fp32",
                    "--out", tmp_path / "a")
    assert result.exit_code == 0, result.output
    assert "Attention: 2 layers fused into one Attention (ONNX opset 23, float)" in result.output
    result = invoke("build", "--onnx", tiny_llama_export.directory, "--precision", "fp32",
                    "--attention", "fused", "--out", tmp_path / "b")
    assert "cannot fuse attention: not a KV-cache graph" in one_line_error(result)
    assert not (tmp_path / "b").exists()
    result = invoke("build", "--onnx", tiny_llama_cache_export.directory, "--precision", "fp32",
                    "--attention", "graph", "--backend", "tensorrt", "--out", tmp_path / "c")
    assert "--attention are onnxruntime options" in one_line_error(result)


def test_fp16_regions_through_attention_leave_it_as_exported(tiny_llama_cache_export, tmp_path):
    """FP16 (here emulated) puts Casts through the pattern: nothing is fused, the build says
    why, and ``fused`` refuses."""
    from quantkit.build import build_engine

    kwargs = {"precision": "fp16", "onnx": tiny_llama_cache_export.directory}
    engine = build_engine(tmp_path / "e", options={"fp16": "emulate"}, **kwargs)
    record = engine.manifest["attention"]
    assert record["fused"] is False and "Casts" in record["reason"]
    assert "Attention" not in _ops(engine.path / "engine.onnx")
    with pytest.raises(QuantkitError, match="cannot fuse attention: no attention of the "
                                            "rewritten graph"):
        build_engine(tmp_path / "f", options={"fp16": "emulate", "attention": "fused"},
                     **kwargs)
    assert not (tmp_path / "f").exists()


def test_external_data_cache_export_is_fused_weight_by_weight(tiny_llama, tmp_path):
    """A cache export with its weights in a data file (as past 2 GB): the fused engine keeps
    them in its own data file, and the check ran on the streamed graph."""
    from quantkit.build import build_engine
    from quantkit.export import export_model

    export = export_model(tiny_llama, tmp_path / "x", with_cache=True, external_data=True)
    assert (export.directory / "model.onnx.data").is_file()
    engine = build_engine(tmp_path / "e", precision="fp32", onnx=export.directory)
    record = engine.manifest["attention"]
    assert record["fused"] and record["layers"] == 2
    assert record["check"]["relative_error"] <= 1e-4
    assert engine.manifest["external_data"] is True
    assert (engine.path / "engine.onnx.data").is_file()
    assert sorted(p.name for p in engine.path.iterdir() if p.name.startswith(".")) == []


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_a_failed_check_leaves_attention_as_exported(tiny_llama_export, tiny_llama_cache_export,
                                                     tmp_path, monkeypatch, precision):
    """Where the fused graph would not compute the export's function (a check made to fail
    here), ``auto`` builds the engine as exported and says why; ``fused`` refuses."""
    import quantkit.cache_transform as cache_transform
    from quantkit.build import build_engine

    def failing(source, derived, *args, **kwargs):
        return {"relative_error": 0.5, "against": "source_onnx"}

    monkeypatch.setattr(cache_transform, "check_cache_equivalent", failing)
    kwargs = {"precision": precision, "onnx": tiny_llama_cache_export.directory}
    if precision == "int8":
        kwargs.update(table=make_table(tiny_llama_export.onnx_path, token_feeds(2, seq=24)),
                      table_onnx=tiny_llama_export.onnx_path)
    engine = build_engine(tmp_path / "e", **kwargs)
    record = engine.manifest["attention"]
    assert record["fused"] is False and "does not compute the export's function" in record[
        "reason"] and "5.00e-01" in record["reason"]
    assert "Attention" not in _ops(engine.path / "engine.onnx")
    if precision == "fp32":
        assert (engine.path / "engine.onnx").read_bytes() == (
            tiny_llama_cache_export.onnx_path.read_bytes())
        assert sorted(p.name for p in engine.path.glob("*.onnx*")) == ["engine.onnx"]
    with pytest.raises(QuantkitError, match="cannot fuse attention: the fused graph does not"):
        build_engine(tmp_path / "f", options={"attention": "fused"}, **kwargs)
    assert not (tmp_path / "f").exists()
