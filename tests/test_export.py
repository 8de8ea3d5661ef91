"""ONNX export of tiny GPT-2 and Llama models: names, outputs, checks, sidecar."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from quantkit.errors import QuantkitError
from quantkit.export import export_model, find_onnx, rename_by_module_path


@pytest.mark.parametrize("fixture", ["tiny_llama_export", "tiny_gpt2_export"])
def test_export_passes_checker_and_matches_torch(request, fixture):
    result = request.getfixturevalue(fixture)
    onnx.checker.check_model(str(result.onnx_path), full_check=True)
    check = result.manifest["check"]
    assert check["relative_error"] < 1e-4
    assert check["padded_tokens"] > 0
    assert result.manifest["outputs"] == ["logits", "nll"]
    assert result.manifest["inputs"]["opset"] == 18
    assert len(result.manifest["model_hash"]) == 64
    assert (result.directory / "tokenizer" / "tokenizer_config.json").is_file()


def test_llama_node_names_follow_module_paths(tiny_llama_export):
    names = {n.name for n in onnx.load(str(tiny_llama_export.onnx_path)).graph.node}
    for layer in (0, 1):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert f"/model/layers.{layer}/self_attn/{proj}/MatMul" in names
        for proj in ("gate_proj", "up_proj", "down_proj"):
            assert f"/model/layers.{layer}/mlp/{proj}/MatMul" in names
        assert f"/model/layers.{layer}/self_attn/MatMul" in names  # Q @ K^T
        assert f"/model/layers.{layer}/self_attn/MatMul_1" in names  # P @ V
    assert "/lm_head/MatMul" in names
    assert len(names) == len(onnx.load(str(tiny_llama_export.onnx_path)).graph.node)


def test_gpt2_node_names_and_tensor_names(tiny_gpt2_export):
    graph = onnx.load(str(tiny_gpt2_export.onnx_path)).graph
    names = {n.name for n in graph.node}
    assert "/transformer/h.0/attn/c_attn/Gemm" in names
    assert "/transformer/h.1/mlp/c_proj/Gemm" in names
    for node in graph.node:
        for i, out in enumerate(node.output):
            if out not in ("logits", "nll"):
                assert out == f"{node.name}_output_{i}"


def test_dynamic_batch_and_sequence(tiny_llama_export, tiny_llama):
    session = ort.InferenceSession(str(tiny_llama_export.onnx_path))
    for batch, seq in [(1, 7), (3, 33)]:
        ids = np.random.default_rng(batch).integers(0, 512, (batch, seq), dtype=np.int64)
        logits, nll = session.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})
        assert logits.shape == (batch, seq, 512)
        assert nll.shape == (batch, seq - 1)
        with torch.no_grad():
            ref = tiny_llama.model(input_ids=torch.from_numpy(ids)).logits
            ref_nll = torch.nn.functional.cross_entropy(
                ref[:, :-1].reshape(-1, 512), torch.from_numpy(ids[:, 1:]).reshape(-1),
                reduction="none").reshape(batch, seq - 1)
        np.testing.assert_allclose(logits, ref.numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(nll, ref_nll.numpy(), rtol=1e-4, atol=1e-5)


def test_external_data_export_is_the_same_model_with_its_weights_beside_it(
        tiny_llama, tiny_llama_export, tmp_path):
    from onnx import numpy_helper

    from quantkit.export import onnx_model_hash
    from quantkit.onnx_io import INLINE_BYTES, is_external

    result = export_model(tiny_llama, tmp_path / "e", with_nll=True, external_data=True)
    data = result.directory / "model.onnx.data"
    assert data.is_file() and not (tiny_llama_export.directory / "model.onnx.data").exists()
    graph = onnx.load(str(result.onnx_path), load_external_data=False)
    big = [t for t in graph.graph.initializer if is_external(t) or len(t.raw_data) >= INLINE_BYTES]
    assert big and all(is_external(t) for t in big)
    assert result.manifest["inputs"]["external_data"] is True
    assert "external_data" not in tiny_llama_export.manifest["inputs"]
    assert result.manifest["model_hash"] == onnx_model_hash(result.onnx_path)  # covers the data
    inline = {t.name: numpy_helper.to_array(t)
              for t in onnx.load(str(tiny_llama_export.onnx_path)).graph.initializer}
    external = {t.name: numpy_helper.to_array(t)
                for t in onnx.load(str(result.onnx_path)).graph.initializer}
    assert inline.keys() == external.keys()
    for name, value in inline.items():
        np.testing.assert_array_equal(value, external[name])


def test_output_exists_without_force(tiny_llama, tiny_llama_export):
    with pytest.raises(QuantkitError, match="already exists.*--force"):
        export_model(tiny_llama, tiny_llama_export.directory)


def test_opset_17_is_refused(tiny_llama, tmp_path):
    with pytest.raises(QuantkitError, match="opset 17 is not supported"):
        export_model(tiny_llama, tmp_path / "x", opset=17)
    assert not (tmp_path / "x").exists()


def test_failed_check_leaves_nothing(tiny_llama, tmp_path):
    with pytest.raises(QuantkitError, match="differs from PyTorch"):
        export_model(tiny_llama, tmp_path / "x", check_tolerance=0.0)
    assert list(tmp_path.iterdir()) == []


def test_find_onnx(tiny_llama_export, tmp_path):
    assert find_onnx(tiny_llama_export.directory) == tiny_llama_export.onnx_path
    with pytest.raises(QuantkitError, match="holds no model.onnx"):
        find_onnx(tmp_path)


def test_rename_keeps_graph_io_and_is_unique():
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Relu", ["x"], ["a"], name="n0"),
             helper.make_node("Relu", ["a"], ["y"], name="n1")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph)
    rename_by_module_path(model, prefix="hf.")
    assert [n.name for n in model.graph.node] == ["/Relu", "/Relu_1"]
    assert list(model.graph.node[0].output) == ["/Relu_output_0"]
    assert list(model.graph.node[1].input) == ["/Relu_output_0"]
    assert list(model.graph.node[1].output) == ["y"]


@pytest.mark.slow
def test_export_smollm2(smollm2_export):
    """The embedded default exports within 1e-4 of PyTorch (about 1-2 minutes on 2 cores)."""
    manifest = smollm2_export.manifest
    assert manifest["check"]["relative_error"] < 1e-4
    assert manifest["vocab_size"] == 49152
    assert manifest["inputs"]["model"]["sha256"].startswith("b179c952")
    graph = onnx.load(str(smollm2_export.onnx_path), load_external_data=False).graph
    names = {n.name for n in graph.node}
    assert "/model/layers.29/mlp/down_proj/MatMul" in names
