"""PlanRecipe / resolve_plan: precedence, recorded rules, error messages, YAML round trip."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from quantkit.errors import QuantkitError
from quantkit.plan import (
    NodeDecision,
    PlanRecipe,
    PlanRule,
    Precision,
    PrecisionPlan,
    available_blocks,
    block_index,
    resolve_plan,
)

pytest_plugins = ("tests.fixtures_build",)

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def graph(nodes: list[tuple[str, str]]):
    """A chain of nodes with the given names and op types (enough for plan resolution)."""
    from onnx import TensorProto, helper

    made, prev = [], "x"
    for i, (name, op) in enumerate(nodes):
        out = f"t{i}"
        made.append(helper.make_node(op, [prev], [out], name=name))
        prev = out
    g = helper.make_graph(made, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info(prev, TensorProto.FLOAT, [1])])
    return helper.make_model(g)


LLAMA_LIKE = graph([
    ("/model/layers.0/input_layernorm/Mul_1", "Mul"),
    ("/model/layers.0/self_attn/q_proj/MatMul", "MatMul"),
    ("/model/layers.0/self_attn/MatMul", "MatMul"),
    ("/model/layers.0/self_attn/Softmax", "Softmax"),
    ("/model/layers.0/mlp/down_proj/MatMul", "MatMul"),
    ("/model/layers.0/Add", "Add"),
    ("/model/layers.1/self_attn/q_proj/MatMul", "MatMul"),
    ("/model/layers.1/mlp/down_proj/MatMul", "MatMul"),
    ("/model/layers.2/mlp/down_proj/MatMul", "MatMul"),
    ("/model/norm/Mul_1", "Mul"),
    ("/lm_head/MatMul", "MatMul"),
])


def rules(*items: dict) -> tuple[PlanRule, ...]:
    return tuple(PlanRule.from_dict(i) for i in items)


def decide(recipe: PlanRecipe, node: str, model=LLAMA_LIKE) -> NodeDecision:
    return resolve_plan(recipe, model).decisions[node]


def test_default_applies_and_non_quantizable_ops_fall_back():
    plan = resolve_plan(PlanRecipe(default=Precision.INT8), LLAMA_LIKE)
    assert plan.decisions["/lm_head/MatMul"] == NodeDecision(
        "/lm_head/MatMul", "MatMul", Precision.INT8, "default")
    softmax = plan.decisions["/model/layers.0/self_attn/Softmax"]
    assert softmax.precision == Precision.FP32
    assert softmax.rule == "default (int8 n/a for Softmax: fp32)"
    fp16_fallback = resolve_plan(PlanRecipe(fallback=Precision.FP16), LLAMA_LIKE)
    assert fp16_fallback.precision_of("/model/layers.0/Add") == Precision.FP16


def test_precedence_exact_over_pattern_over_blocks_over_op_type_over_default():
    node = "/model/layers.1/mlp/down_proj/MatMul"
    layers = [
        {"op_type": "MatMul", "precision": "fp16"},
        {"blocks": "layers.1", "precision": "fp32"},
        {"node": "re:down_proj", "precision": "int8"},
        {"node": node, "precision": "fp16"},
    ]
    expected = [("op_type:MatMul", Precision.FP16), ("blocks:layers.1", Precision.FP32),
                ("re:down_proj", Precision.INT8), (f"exact:{node}", Precision.FP16)]
    for count in range(1, len(layers) + 1):
        # rules listed weakest-first and strongest-first give the same decision
        for ordered in (layers[:count], list(reversed(layers[:count]))):
            recipe = PlanRecipe(default=Precision.INT8, rules=rules(*ordered))
            decision = decide(recipe, node)
            assert (decision.rule, decision.precision) == expected[count - 1], ordered


def test_glob_is_a_pattern_rule_and_later_rule_of_a_tier_wins():
    recipe = PlanRecipe(rules=rules(
        {"node": "*/down_proj/*", "precision": "fp32"},
        {"node": "re:/layers\\.2/", "precision": "fp16"},
        {"blocks": "layers.0-2", "precision": "int8"},
    ))
    plan = resolve_plan(recipe, LLAMA_LIKE)
    assert plan.decisions["/model/layers.0/mlp/down_proj/MatMul"].rule == "glob:*/down_proj/*"
    assert plan.decisions["/model/layers.2/mlp/down_proj/MatMul"].rule == "re:/layers\\.2/"
    assert plan.precision_of("/model/layers.2/mlp/down_proj/MatMul") == Precision.FP16
    assert plan.decisions["/model/layers.1/self_attn/q_proj/MatMul"].rule == "blocks:layers.0-2"


def test_block_ranges_lists_and_prefixes():
    assert block_index("/transformer/h.11/mlp/c_fc/Gemm", "h") == 11
    assert block_index("/model/layers.3/Add", "layers") == 3
    assert block_index("/model/norm/Mul", "layers") is None
    assert block_index("/model/layers.30x/Add", "layers") is None
    recipe = PlanRecipe(default=Precision.FP32,
                        rules=rules({"blocks": "layers.0,2", "precision": "int8"}))
    plan = resolve_plan(recipe, LLAMA_LIKE)
    assert plan.nodes_with(Precision.INT8) == [
        "/model/layers.0/self_attn/q_proj/MatMul", "/model/layers.0/self_attn/MatMul",
        "/model/layers.0/mlp/down_proj/MatMul", "/model/layers.2/mlp/down_proj/MatMul"]
    assert available_blocks(plan.decisions) == ["layers.0-2"]


def test_rule_matching_nothing_lists_closest_names():
    recipe = PlanRecipe(rules=rules({"node": "/lm_head/Matmul", "precision": "fp32"}))
    with pytest.raises(QuantkitError) as err:
        resolve_plan(recipe, LLAMA_LIKE)
    assert "'exact:/lm_head/Matmul' matches no node" in err.value.message
    assert err.value.hint is not None and err.value.hint.startswith(
        "closest node names: /lm_head/MatMul")


def test_regex_and_op_type_and_blocks_that_match_nothing():
    for rule, hint in [
        ({"node": "re:gate_proj", "precision": "fp32"}, "closest node names"),
        ({"op_type": "Gemm", "precision": "fp32"}, "closest op types in this graph"),
        ({"blocks": "h.0-3", "precision": "fp32"}, "blocks in this graph: layers.0-2"),
    ]:
        with pytest.raises(QuantkitError, match="matches no node") as err:
            resolve_plan(PlanRecipe(rules=rules(rule)), LLAMA_LIKE)
        assert hint in str(err.value)
    with pytest.raises(QuantkitError, match="names blocks this graph lacks: layers.3, layers.4"):
        resolve_plan(PlanRecipe(rules=rules({"blocks": "layers.1-4", "precision": "fp32"})),
                     LLAMA_LIKE)


def test_unknown_precision_op_type_and_malformed_rules():
    with pytest.raises(QuantkitError, match="unknown precision 'int4'"):
        PlanRecipe.from_yaml("default: int4\n")
    with pytest.raises(QuantkitError, match="unknown precision 'bf16'"):
        PlanRule.from_dict({"op_type": "MatMul", "precision": "bf16"})
    with pytest.raises(QuantkitError, match="unknown op type 'Matmul'") as err:
        PlanRule.from_dict({"op_type": "Matmul", "precision": "fp32"})
    assert "MatMul" in str(err.value.hint)
    with pytest.raises(QuantkitError, match="exactly one of node, blocks, op_type"):
        PlanRule.from_dict({"node": "a", "op_type": "MatMul", "precision": "fp32"})
    with pytest.raises(QuantkitError, match="unknown keys: nodes"):
        PlanRule.from_dict({"nodes": "a", "precision": "fp32"})
    with pytest.raises(QuantkitError, match="not a valid regex"):
        PlanRule.from_dict({"node": "re:(unclosed", "precision": "fp32"})
    with pytest.raises(QuantkitError, match="runs backwards"):
        PlanRule.from_dict({"blocks": "layers.3-1", "precision": "fp32"})
    with pytest.raises(QuantkitError, match="block range 'layers' is not understood"):
        PlanRule.from_dict({"blocks": "layers", "precision": "fp32"})
    with pytest.raises(QuantkitError, match="fallback must be a float precision"):
        PlanRecipe(fallback=Precision.INT8)
    with pytest.raises(QuantkitError, match="unknown keys: defaults"):
        PlanRecipe.from_yaml("defaults: int8\n")


def test_explicit_int8_on_a_non_quantizable_node_is_an_error():
    for rule in ({"node": "/model/layers.0/self_attn/Softmax", "precision": "int8"},
                 {"op_type": "Softmax", "precision": "int8"}):
        with pytest.raises(QuantkitError, match="which has no INT8 form"):
            resolve_plan(PlanRecipe(default=Precision.FP32, rules=rules(rule)), LLAMA_LIKE)
    # a broad rule saying int8 gives non-quantizable nodes the fallback instead
    recipe = PlanRecipe(default=Precision.FP32, rules=rules({"blocks": "layers.0",
                                                             "precision": "int8"}))
    decision = decide(recipe, "/model/layers.0/self_attn/Softmax")
    assert decision.precision == Precision.FP32
    assert decision.rule == "blocks:layers.0 (int8 n/a for Softmax: fp32)"


def test_yaml_round_trip_and_plan_dict_round_trip(tmp_path):
    recipe = PlanRecipe(
        default=Precision.INT8, fallback=Precision.FP16, name="x", description="d",
        rules=rules({"node": "/lm_head/MatMul", "precision": "fp32"},
                    {"node": "re:/self_attn/", "precision": "fp16"},
                    {"blocks": "layers.0-1,2", "precision": "fp32"},
                    {"op_type": "Softmax", "precision": "fp16"}))
    assert PlanRecipe.from_yaml(recipe.to_yaml()) == recipe
    path = tmp_path / "r.yaml"
    recipe.save(path)
    assert PlanRecipe.load(path) == recipe
    plan = resolve_plan(recipe, LLAMA_LIKE)
    again = PrecisionPlan.from_dict(plan.to_dict())
    assert again.decisions == plan.decisions
    assert again.source["recipe"] == recipe.to_dict()
    unnamed = tmp_path / "my-recipe.yaml"
    unnamed.write_text("default: fp16\n")
    assert PlanRecipe.load(unnamed).name == "my-recipe"
    with pytest.raises(QuantkitError, match="does not exist"):
        PlanRecipe.load(tmp_path / "missing.yaml")


def test_duplicate_or_unnamed_nodes_are_refused():
    with pytest.raises(QuantkitError, match="duplicate node names: /a"):
        resolve_plan(PlanRecipe(), graph([("/a", "Relu"), ("/a", "Relu")]))
    with pytest.raises(QuantkitError, match="unnamed nodes"):
        resolve_plan(PlanRecipe(), graph([("", "Relu")]))


def test_ready_recipes_resolve_on_exported_llama_and_gpt2(llama_model, gpt2_model):
    for model in (llama_model, gpt2_model):
        int8 = resolve_plan(PlanRecipe.load(CONFIGS / "int8.yaml"), model)
        linear = [d for d in int8.decisions.values() if d.op_type in ("MatMul", "Gemm")]
        assert linear and all(d.precision == Precision.INT8 for d in linear)
        assert {d.precision for d in int8.decisions.values()} == {Precision.INT8, Precision.FP32}

        safe = resolve_plan(PlanRecipe.load(CONFIGS / "mixed-safe.yaml"), model)
        assert safe.decisions["/lm_head/MatMul"].precision == Precision.FP32
        assert safe.decisions["/lm_head/MatMul"].rule == "exact:/lm_head/MatMul"
        softmaxes = [d for d in safe.decisions.values() if d.op_type == "Softmax"]
        assert softmaxes and all(d.rule == "op_type:Softmax" for d in softmaxes)
        norms = [d for d in safe.decisions.values() if "norm" in d.node or "/ln_" in d.node]
        assert norms and all(d.precision == Precision.FP32 and d.rule.startswith("re:")
                             for d in norms)
        residual = [d for d in safe.decisions.values()
                    if re.fullmatch(r"/(model/layers|transformer/h)\.\d+/Add(_1)?", d.node)]
        assert residual and all(d.rule.startswith("re:/(layers|h)") for d in residual)
        assert [d.node for d in safe.decisions.values()
                if d.precision == Precision.INT8] == [
            d.node for d in linear if d.node != "/lm_head/MatMul"]
    smol = resolve_plan(PlanRecipe.load(CONFIGS / "smollm2-135m.yaml"), llama_model)
    assert smol.precision_of("/model/layers.1/self_attn/MatMul_1") == Precision.INT8
    assert smol.precision_of("/model/layers.1/mlp/down_proj/MatMul") == Precision.FP32
    assert smol.precision_of("/model/layers.1/mlp/up_proj/MatMul") == Precision.INT8


def test_gpt2_example_recipe_on_a_12_block_graph():
    names = []
    for i in range(12):
        names += [(f"/transformer/h.{i}/attn/c_attn/Gemm", "Gemm"),
                  (f"/transformer/h.{i}/attn/MatMul", "MatMul"),
                  (f"/transformer/h.{i}/attn/Softmax", "Softmax"),
                  (f"/transformer/h.{i}/attn/MatMul_1", "MatMul"),
                  (f"/transformer/h.{i}/mlp/c_fc/Gemm", "Gemm")]
    plan = resolve_plan(PlanRecipe.load(CONFIGS / "gpt2-example.yaml"),
                        graph(names + [("/lm_head/MatMul", "MatMul")]))
    assert plan.precision_of("/transformer/h.0/attn/c_attn/Gemm") == Precision.FP32
    assert plan.precision_of("/transformer/h.5/attn/c_attn/Gemm") == Precision.INT8
    assert plan.precision_of("/transformer/h.11/mlp/c_fc/Gemm") == Precision.INT8
    assert plan.precision_of("/transformer/h.5/attn/MatMul_1") == Precision.FP32
    assert plan.decisions["/transformer/h.11/attn/Softmax"].rule == "blocks:h.0,11"
    assert plan.precision_of("/lm_head/MatMul") == Precision.FP32


@pytest.mark.parametrize("fixture", ["tiny_llama_export", "tiny_gpt2_export"])
def test_linear_int8_recipe_keeps_only_attention_matmuls_fp32(request, fixture):
    """configs/linear-int8.yaml on both families: attention MatMuls (two activations) FP32,
    every other MatMul/Gemm INT8."""
    import onnx

    export = request.getfixturevalue(fixture)
    model = onnx.load(str(export.onnx_path))
    text = (Path(__file__).resolve().parent.parent / "configs" / "linear-int8.yaml").read_text()
    plan = resolve_plan(PlanRecipe.from_yaml(text), model)
    linear = {n.name: plan.decisions[n.name].precision for n in model.graph.node
              if n.op_type in ("MatMul", "Gemm")}
    attention = {name for name in linear if re.search(r"attn/MatMul(_1)?$", name)}
    assert len(attention) == 4  # 2 layers x (scores, values)
    assert all(linear[name] == Precision.FP32 for name in attention)
    assert all(p == Precision.INT8 for name, p in linear.items() if name not in attention)
    assert len(linear) > len(attention)
