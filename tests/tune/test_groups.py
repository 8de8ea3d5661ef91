"""Grouping of MatMul/Gemm nodes per transformer block x op kind (or per op)."""

from __future__ import annotations

import onnx
import pytest

from quantkit.errors import QuantkitError
from quantkit.tune.groups import block_of, groups_of_model, make_groups, node_kind


@pytest.mark.parametrize(("name", "constant", "kind"), [
    ("/model/layers.3/self_attn/q_proj/MatMul", True, "qkv"),
    ("/model/layers.3/self_attn/MatMul", False, "attn_scores"),
    ("/model/layers.3/self_attn/o_proj/MatMul", True, "attn_out"),
    ("/model/layers.3/mlp/gate_proj/MatMul", True, "mlp_in"),
    ("/model/layers.3/mlp/down_proj/MatMul", True, "mlp_down"),
    ("/transformer/h.0/attn/c_attn/Gemm", True, "qkv"),
    ("/transformer/h.0/attn/c_proj/Gemm", True, "attn_out"),
    ("/transformer/h.0/mlp/c_fc/Gemm", True, "mlp_in"),
    ("/transformer/h.0/mlp/c_proj/Gemm", True, "mlp_down"),
    ("/lm_head/MatMul", True, "lm_head"),
    ("/model/layers.0/odd/thing/MatMul", True, "other"),
])
def test_node_kind(name, constant, kind) -> None:
    assert node_kind(name, constant) == kind


def test_attention_values_are_the_matmul_that_reads_the_softmax() -> None:
    assert node_kind("/model/layers.3/self_attn/MatMul_1", False, True) == "attn_values"
    assert node_kind("/transformer/h.0/attn/MatMul_1", False, True) == "attn_values"


def test_block_of() -> None:
    assert block_of("/model/layers.12/mlp/down_proj/MatMul") == ("layers", 12)
    assert block_of("/transformer/h.3/attn/c_attn/Gemm") == ("h", 3)
    assert block_of("/lm_head/MatMul") is None


def _model(path):
    return onnx.load(str(path), load_external_data=False)


def test_llama_groups_cover_every_matmul_once(tiny_llama_export) -> None:
    model = _model(tiny_llama_export.onnx_path)
    groups = groups_of_model(model)
    names = [g.name for g in groups]
    assert names == [f"layers.{b}.{k}" for b in (0, 1)
                     for k in ("qkv", "attn_scores", "attn_values", "attn_out", "mlp_in",
                               "mlp_down")] + ["lm_head"]
    nodes = [n for g in groups for n in g.nodes]
    matmuls = [n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm")]
    assert sorted(nodes) == sorted(matmuls) and len(set(nodes)) == len(nodes)
    assert len(groups[0].nodes) == 3  # q/k/v
    scores, values = groups[1], groups[2]
    assert scores.nodes == ("/model/layers.0/self_attn/MatMul",)  # Q K^T, then P V
    assert values.nodes == ("/model/layers.0/self_attn/MatMul_1",)


def test_gpt2_groups(tiny_gpt2_export) -> None:
    groups = groups_of_model(_model(tiny_gpt2_export.onnx_path))
    kinds = {g.kind for g in groups}
    assert {"qkv", "attn_scores", "attn_values", "attn_out", "mlp_in", "mlp_down",
            "lm_head"} <= kinds
    assert "other" not in kinds
    values = [g for g in groups if g.kind == "attn_values"]
    assert values and all(len(g.nodes) == 1 for g in values)


def test_op_granularity_is_one_node_each(tiny_llama_export) -> None:
    groups = groups_of_model(_model(tiny_llama_export.onnx_path), "op")
    assert all(len(g.nodes) == 1 and g.name == g.nodes[0] for g in groups)


def test_bad_granularity_and_empty_graph() -> None:
    with pytest.raises(QuantkitError, match="unknown granularity"):
        make_groups([("/a/MatMul", True)], "layer")
    with pytest.raises(QuantkitError, match="no MatMul/Gemm"):
        make_groups([])
