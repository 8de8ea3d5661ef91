"""ONNX Runtime builds of an export whose weights are in external data: the rewrite reads one
weight at a time and writes its new weights to disk as it makes them (quantkit.rewrite_io), and
the engine is the one the in-memory build makes from the same weights inline, bit for bit."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from quantkit.backends import get_backend
from quantkit.backends.base import BuildRequest, Engine
from quantkit.build import plan_for
from quantkit.calib.gptq import QuantizedWeight
from quantkit.environment import cpu_isa
from quantkit.onnx_io import INLINE_BYTES, is_external, read_initializer
from quantkit.plan import PlanRecipe, PlanRule, Precision, resolve_plan
from quantkit.qdq import QdqOptions
from quantkit.rewrite_io import SPILL_NAME, open_for_rewrite
from quantkit.weight_quant import quantize_weight
from tests.build_helpers import MACHINE_WEIGHT_LAYOUT

pytest_plugins = ("tests.fixtures_build",)


@pytest.fixture(scope="module")
def external_export(tiny_llama_export, tmp_path_factory):
    """The tiny Llama export (manifest, tokenizer) with every initializer of 1 KiB or more in
    model.onnx.data, as an export past 2 GB has them."""
    out = tmp_path_factory.mktemp("external") / "tiny-llama"
    shutil.copytree(tiny_llama_export.directory, out)
    model = onnx.load(str(out / "model.onnx"))
    onnx.save_model(model, str(out / "model.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="model.onnx.data",
                    size_threshold=INLINE_BYTES)
    return out / "model.onnx"


@pytest.fixture(scope="module")
def gptq_table(tiny_llama_export, llama_table):
    """The MinMax table with int8 weights of its own (as GPTQ gives) for q_proj and up_proj:
    round to nearest, one step down, so they differ from what the build would round to."""
    model = onnx.load(str(tiny_llama_export.onnx_path))
    producers = {o: n for n in model.graph.node for o in n.output}
    inits = {t.name: t for t in model.graph.initializer}
    weights = {}
    for node in model.graph.node:
        if node.op_type == "MatMul" and ("q_proj" in node.name or "up_proj" in node.name):
            name = node.input[1]
            assert name in inits and name not in producers
            q, scale = quantize_weight(numpy_helper.to_array(inits[name]), 1)
            weights[name] = QuantizedWeight(np.clip(q.astype(np.int16) - 1, -127, 127)
                                            .astype(np.int8), scale, 1)
    assert len(weights) == 4
    from dataclasses import replace

    return replace(llama_table, weights=weights)


def _build(onnx_path, precision, out, table, plan=None, **options) -> Engine:
    resolved = plan_for(onnx_path, precision, None) if plan is None else resolve_plan(
        plan, onnx_path)
    return get_backend("onnxruntime").build(
        BuildRequest(onnx_path, precision, resolved, table, options), out)


def _initializers(path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def _assert_same_engine(inline: Engine, streamed: Engine, feed) -> None:
    a = onnx.load(str(inline.path / "engine.onnx"))
    b = onnx.load(str(streamed.path / "engine.onnx"))
    assert list(a.graph.node) == list(b.graph.node)
    assert [t.name for t in a.graph.initializer] == [t.name for t in b.graph.initializer]
    for x, y in zip(a.graph.initializer, b.graph.initializer, strict=True):
        assert x.data_type == y.data_type and list(x.dims) == list(y.dims), x.name
        np.testing.assert_array_equal(numpy_helper.to_array(x), numpy_helper.to_array(y),
                                      err_msg=x.name)
    for key in ("rewrite", "as_built_counts", "int8_coverage", "coverage",
                "onnxruntime_fusion", "weight_layout", "fp16", "source_model_hash"):
        assert inline.manifest.get(key) == streamed.manifest.get(key), key
    with inline.runner(threads=1) as r1, streamed.runner(threads=1) as r2:
        np.testing.assert_array_equal(r1.run(feed, ["logits"])["logits"],
                                      r2.run(feed, ["logits"])["logits"])


def _assert_streamed_layout(engine: Engine) -> None:
    """The streamed engine keeps its weights in engine.onnx.data (page-aligned), nothing of
    the rewrite's scratch file is left, and the manifest says so."""
    assert engine.manifest["external_data"] is True
    assert (engine.path / "engine.onnx.data").is_file()
    assert not (engine.path / SPILL_NAME).exists()
    graph = onnx.load(str(engine.path / "engine.onnx"), load_external_data=False)
    external = [t for t in graph.graph.initializer if is_external(t)]
    assert external and all(not t.HasField("raw_data") or len(t.raw_data) < INLINE_BYTES
                            for t in graph.graph.initializer)
    for tensor in external:
        fields = {e.key: e.value for e in tensor.external_data}
        assert fields["location"] == "engine.onnx.data" and int(fields["offset"]) % 4096 == 0
    assert engine.manifest["size_bytes"] == sum(
        (engine.path / n).stat().st_size for n in ("engine.onnx", "engine.onnx.data"))


def test_int8_build_of_external_weights_is_the_in_memory_build(
        tiny_llama_export, external_export, llama_table, eval_feed, tmp_path):
    inline = _build(tiny_llama_export.onnx_path, "int8", tmp_path / "inline", llama_table)
    streamed = _build(external_export, "int8", tmp_path / "streamed", llama_table)
    assert inline.manifest["external_data"] is False
    assert not (inline.path / "engine.onnx.data").exists()  # small inline exports: one file
    _assert_streamed_layout(streamed)
    _assert_same_engine(inline, streamed, eval_feed)
    assert streamed.manifest["as_built_counts"]["int8"] == 19
    assert streamed.manifest["rewrite"]["options"]["weight_layout"] == MACHINE_WEIGHT_LAYOUT


def test_given_int8_weights_and_dynamic_activations_stream_too(
        tiny_llama_export, external_export, gptq_table, eval_feed, tmp_path):
    engines = [_build(path, "int8", tmp_path / name, gptq_table, activations="dynamic",
                      weight_layout="s8")
               for name, path in (("inline", tiny_llama_export.onnx_path),
                                  ("streamed", external_export))]
    _assert_streamed_layout(engines[1])
    _assert_same_engine(*engines, eval_feed)
    assert engines[0].manifest["activations"] == engines[1].manifest["activations"]
    # the fused q/k/v weight of layer 0 holds the given integers, not round to nearest
    source = onnx.load(str(tiny_llama_export.onnx_path), load_external_data=False)
    q_proj = next(n for n in source.graph.node
                  if n.name == "/model/layers.0/self_attn/q_proj/MatMul")
    given = gptq_table.weights[q_proj.input[1]]
    inits = _initializers(engines[1].path / "engine.onnx")
    fused = inits["/model/layers.0/self_attn/q_proj+k_proj+v_proj/MatMul/weight_int8"]
    np.testing.assert_array_equal(fused[:, :given.q.shape[1]], given.q)


@pytest.mark.parametrize("precision, recipe, options", [
    ("mixed", PlanRecipe(rules=(PlanRule(Precision.FP16, node="re:/mlp/"),)),
     {"fp16": "emulate"}),
    ("fp16", PlanRecipe.uniform("fp16"), {"fp16_fallback": True}),
])
def test_fp16_regions_of_external_weights_match_too(
        precision, recipe, options, tiny_llama_export, external_export, llama_table, eval_feed,
        tmp_path):
    table = llama_table if precision == "mixed" else None
    inline = _build(tiny_llama_export.onnx_path, precision, tmp_path / "inline", table,
                    recipe, **options)
    streamed = _build(external_export, precision, tmp_path / "streamed", table, recipe,
                      **options)
    _assert_streamed_layout(streamed)
    _assert_same_engine(inline, streamed, eval_feed)
    assert streamed.manifest["fp16"]["nodes"] > 0


def test_the_streamed_rewrite_never_holds_a_weight_in_its_graph(external_export, llama_table,
                                                                tmp_path):
    plan = plan_for(external_export, "int8", None)
    with open_for_rewrite(external_export, tmp_path) as source:
        assert source.streamed
        result = source.rewrite(plan, llama_table.amax, QdqOptions())
        big = [t for t in result.model.graph.initializer
               if not is_external(t) and len(t.raw_data) >= INLINE_BYTES]
        assert big == []
        spilled = [t for t in result.model.graph.initializer if is_external(t) and
                   SPILL_NAME in {e.key: e.value for e in t.external_data}["location"]]
        assert spilled and all(read_initializer(t, tmp_path).dtype in (np.int8, np.uint8,
                                                                       np.float32)
                               for t in spilled)
        assert (tmp_path / SPILL_NAME).is_file()
    assert not (tmp_path / SPILL_NAME).exists()  # removed with the block


def test_external_data_outside_the_model_folder_is_refused_before_any_work(
        external_export, llama_table, tmp_path):
    from quantkit.errors import QuantkitError

    bad = tmp_path / "bad"
    bad.mkdir()
    model = onnx.load(str(external_export), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../model.onnx.data"
    onnx.save_model(model, str(bad / "model.onnx"))
    shutil.copy(external_export.parent / "model.onnx.data", tmp_path / "model.onnx.data")
    out = tmp_path / "engine"
    with pytest.raises(QuantkitError, match="points outside the model's folder"):
        get_backend("onnxruntime").build(
            BuildRequest(bad / "model.onnx", "int8", None, llama_table, {}), out)
    assert not out.exists()


def test_tensorrts_qdq_onnx_of_external_weights_is_the_in_memory_one(
        tiny_llama_export, external_export, llama_table, tmp_path):
    """The explicit TensorRT path writes the same rewrite (parsed with parse_from_file, which
    resolves model.qdq.onnx.data beside it)."""
    from quantkit.backends.tensorrt.backend import write_qdq_onnx
    from quantkit.backends.tensorrt.version import TrtVersion

    written = {}
    for name, path in (("inline", tiny_llama_export.onnx_path), ("streamed", external_export)):
        (tmp_path / name).mkdir()
        request = BuildRequest(path, "int8", plan_for(path, "int8", None), llama_table, {})
        write_qdq_onnx(request, tmp_path / name / "model.qdq.onnx", TrtVersion(11, 0))
        written[name] = tmp_path / name / "model.qdq.onnx"
    assert sorted(p.name for p in (tmp_path / "streamed").iterdir()) == [
        "model.qdq.onnx", "model.qdq.onnx.data"]
    assert [p.name for p in (tmp_path / "inline").iterdir()] == ["model.qdq.onnx"]
    a, b = (onnx.load(str(written[k])) for k in ("inline", "streamed"))
    assert list(a.graph.node) == list(b.graph.node)
    inline, streamed = _initializers(written["inline"]), _initializers(written["streamed"])
    assert list(inline) == list(streamed)
    for name, value in inline.items():
        np.testing.assert_array_equal(value, streamed[name], err_msg=name)
        assert value.dtype == streamed[name].dtype


def test_fp32_engine_of_external_weights_counts_its_data_file(external_export, eval_feed,
                                                              tiny_llama_export, tmp_path):
    engine = _build(external_export, "fp32", tmp_path / "e", None)
    data = engine.path / "model.onnx.data"  # the export's own file name, which the graph names
    assert engine.manifest["external_data"] is True and data.is_file()
    assert engine.manifest["size_bytes"] == (engine.path / "engine.onnx").stat().st_size + \
        data.stat().st_size
    inline = _build(tiny_llama_export.onnx_path, "fp32", tmp_path / "inline", None)
    assert inline.manifest["external_data"] is False
    with engine.runner(threads=1) as r1, inline.runner(threads=1) as r2:
        np.testing.assert_array_equal(r1.run(eval_feed, ["logits"])["logits"],
                                      r2.run(eval_feed, ["logits"])["logits"])


@pytest.mark.skipif(cpu_isa().u8s8_saturates,
                    reason="activations=blockwise is refused on x86 without VNNI first")
def test_blockwise_activations_refuse_streamed_weights(external_export, llama_table, tmp_path):
    """Blockwise needs every weight in memory to repack it: a streamed export is refused with
    the way out, and nothing is left behind."""
    from quantkit.errors import QuantkitError

    with pytest.raises(QuantkitError, match="activations=blockwise needs the weights in memory"):
        _build(external_export, "int8", tmp_path / "e", llama_table, activations="blockwise")
    assert not (tmp_path / "e").exists()
