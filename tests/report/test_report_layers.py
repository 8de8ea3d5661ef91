"""Per-layer precision map from a PrecisionPlan: blocks × linear ops, over real export names."""

from __future__ import annotations

import json

from quantkit.report.layers import precision_map, split_node
from tests.report.helpers import DATA

LLAMA_COLUMNS = ["q", "k", "v", "attn MatMul", "attn MatMul_1", "o", "gate", "up", "down",
                 "lm_head"]


def plan_of(engine_dir: str) -> dict:
    manifest = json.loads((DATA / "engines" / engine_dir / "manifest.json").read_text())
    return manifest["inputs"]["plan"]


def test_split_node_finds_the_block():
    assert split_node("/model/layers.3/mlp/down_proj/MatMul") == (3, "mlp/down_proj/MatMul")
    assert split_node("/transformer/h.11/attn/c_attn/Gemm") == (11, "attn/c_attn/Gemm")
    assert split_node("/lm_head/MatMul") == (None, "lm_head/MatMul")
    assert split_node("/model/layers.3") == (None, "model/layers.3")


def test_mixed_llama_plan_map():
    pmap = precision_map(plan_of("trt-mixed"))
    assert pmap["rows"] == [str(i) for i in range(30)] + ["other"]
    assert [c["name"] for c in pmap["columns"]] == LLAMA_COLUMNS
    col = {c["name"]: i for i, c in enumerate(pmap["columns"])}
    grid = pmap["grid"]
    for block in range(30):
        row = grid[block]
        assert row[col["attn MatMul"]] == row[col["attn MatMul_1"]] == "fp16"
        assert row[col["down"]] == ("fp16" if block in (0, 1, 29) else "int8")
        for name in ("q", "k", "v", "o", "gate", "up"):
            assert row[col[name]] == "int8"
        assert row[col["lm_head"]] is None
    assert grid[30] == [None] * 9 + ["fp16"]
    assert pmap["linear_counts"] == {"int8": 207, "fp16": 64}  # 30 x 2 attention + 3 down + lm_head
    assert pmap["uniform"] is None
    assert pmap["other_ops"]["Softmax"] == {"fp32": 30}
    assert pmap["other_ops"]["Add"] == {"fp16": 211}


def test_uniform_int8_plan():
    pmap = precision_map(plan_of("trt-int8"))
    assert pmap["uniform"] == "int8"
    assert pmap["linear_counts"] == {"int8": 271}


def test_gpt2_names_get_qualified_where_ambiguous():
    # Linear node names of quantkit.export's ONNX of a 2-block GPT-2 (GPT2LMHeadModel).
    names = []
    for b in range(2):
        names += [(f"/transformer/h.{b}/attn/c_attn/Gemm", "Gemm"),
                  (f"/transformer/h.{b}/attn/MatMul", "MatMul"),
                  (f"/transformer/h.{b}/attn/MatMul_1", "MatMul"),
                  (f"/transformer/h.{b}/attn/c_proj/Gemm", "Gemm"),
                  (f"/transformer/h.{b}/mlp/c_fc/Gemm", "Gemm"),
                  (f"/transformer/h.{b}/mlp/c_proj/Gemm", "Gemm")]
    names.append(("/lm_head/MatMul", "MatMul"))
    plan = {"default": "int8", "decisions": [
        {"node": n, "op_type": op, "rule": "r",
         "precision": "fp32" if n.endswith("mlp/c_proj/Gemm") and "h.1/" in n else "int8"}
        for n, op in names] + [{"node": "/transformer/h.0/ln_1/Add", "op_type": "Add",
                                "precision": "fp16", "rule": "r"}]}
    pmap = precision_map(plan)
    assert [c["name"] for c in pmap["columns"]] == [
        "c_attn", "attn MatMul", "attn MatMul_1", "attn.c_proj", "c_fc", "mlp.c_proj", "lm_head"]
    assert pmap["rows"] == ["0", "1", "other"]
    assert pmap["grid"][1] == ["int8"] * 5 + ["fp32", None]
    assert pmap["grid"][0][5] == "int8"
    assert pmap["other_ops"] == {"Add": {"fp16": 1}}


def test_plan_without_linear_ops_has_no_columns():
    pmap = precision_map({"default": "fp16", "decisions": [
        {"node": "/model/layers.0/Add", "op_type": "Add", "precision": "fp16", "rule": "r"}]})
    assert pmap["columns"] == [] and pmap["rows"] == [] and pmap["uniform"] is None
