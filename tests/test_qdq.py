"""Q/DQ and FP16 rewriting: numerics, placement, checker, ONNX Runtime fusion and outputs."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from quantkit.backends.onnxruntime import fp16_unsupported, fusion_report
from quantkit.environment import cpu_isa
from quantkit.errors import QuantkitError
from quantkit.graph_stats import count_qdq, linear_layer_macs
from quantkit.plan import PlanRecipe, PlanRule, Precision, PrecisionPlan, resolve_plan
from quantkit.qdq import QdqOptions, rewrite_model
from quantkit.weight_quant import dequantize, quantize_weight, symmetric_scale, weight_axis
from tests.build_helpers import (
    FP16_LOGIT_TOLERANCE,
    INT8_LOGIT_TOLERANCE,
    MACHINE_WEIGHT_LAYOUT,
    QDQ_REFERENCE_TOLERANCE,
    run_onnx,
)

pytest_plugins = ("tests.fixtures_build",)


def optimized(model, tmp_path, level: str = "ORT_ENABLE_ALL"):
    """ONNX Runtime's optimized form of ``model`` (what its CPU provider runs)."""
    import onnxruntime as ort

    path = tmp_path / f"optimized-{level}.onnx"
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    options.optimized_model_filepath = str(path)
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return onnx.load(str(path))


def relative_error(a, b) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


# -- numerics ---------------------------------------------------------------------------------
def test_symmetric_weight_quantization_and_axes():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(64, 48)).astype(np.float32) * np.linspace(0.01, 3.0, 48, dtype=np.float32)
    q, scale = quantize_weight(w, axis=1)
    assert q.dtype == np.int8 and scale.shape == (48,)
    assert q.min() >= -127 and q.max() <= 127 and np.all(np.abs(q).max(axis=0) == 127)
    np.testing.assert_allclose(scale, np.abs(w).max(axis=0) / 127, rtol=1e-6)
    assert np.all(np.abs(dequantize(q, scale, 1) - w) <= scale / 2 + 1e-7)
    q0, s0 = quantize_weight(w.T.copy(), axis=0)  # Gemm transB=1 layout [N, K]
    np.testing.assert_array_equal(q0, q.T)
    np.testing.assert_array_equal(s0, scale)
    zero = np.zeros((4, 3), np.float32)
    qz, sz = quantize_weight(zero, axis=1)
    assert np.all(qz == 0) and np.all(sz == 1.0)
    assert weight_axis("MatMul", 1, 2, {}) == 1
    assert weight_axis("MatMul", 1, 3, {}) == 2
    assert weight_axis("MatMul", 0, 2, {}) == 0
    assert weight_axis("Gemm", 1, 2, {"transB": 0}) == 1
    assert weight_axis("Gemm", 1, 2, {"transB": 1}) == 0
    assert weight_axis("Gemm", 0, 2, {"transA": 1}) == 1
    with pytest.raises(QuantkitError, match="not finite"):
        symmetric_scale(np.inf)


def test_per_channel_weight_error_below_per_tensor(llama_model, gpt2_model):
    rng = np.random.default_rng(1)
    synthetic = rng.normal(size=(128, 96)).astype(np.float32) * rng.uniform(0.05, 2, 96).astype(
        np.float32)
    weights = [synthetic]
    for model in (llama_model, gpt2_model):
        for init in model.graph.initializer:
            if len(init.dims) == 2 and min(init.dims) > 1:
                weights.append(numpy_helper.to_array(init))
    assert len(weights) > 10
    for w in weights:
        per_channel = np.mean((dequantize(*quantize_weight(w, 1), 1) - w) ** 2)
        per_tensor = np.mean((dequantize(*quantize_weight(w, None), None) - w) ** 2)
        assert per_channel < per_tensor


# -- placement and checker --------------------------------------------------------------------
def mixed_plan(model) -> PrecisionPlan:
    """INT8 everywhere except the LM head and layer 1's k_proj (fp32) and layer 0's MLP (fp16)."""
    return resolve_plan(PlanRecipe(rules=(
        PlanRule(Precision.FP32, node="/lm_head/MatMul"),
        PlanRule(Precision.FP32, node="/model/layers.1/self_attn/k_proj/MatMul"),
        PlanRule(Precision.FP16, node="re:/model/layers\\.0/mlp/"),
    )), model)


@pytest.mark.parametrize("mode", ["dedicated", "fuse"])
def test_qdq_exactly_where_the_plan_says(llama_model, llama_table, mode):
    plan = mixed_plan(llama_model)
    result = rewrite_model(llama_model, plan, llama_table.amax, QdqOptions(shared_inputs=mode))
    onnx.checker.check_model(result.model, full_check=True)
    counts = count_qdq(result.model)
    int8 = plan.nodes_with(Precision.INT8)
    assert set(result.qdq) == set(int8)
    attention = {n for n in int8 if n.endswith(("/self_attn/MatMul", "/self_attn/MatMul_1"))}
    for name in int8:
        expected = {"activation": 2, "weight": 0} if name in attention else {
            "activation": 1, "weight": 1}
        assert result.qdq[name] == expected, name
        assert result.as_built[name] == "int8"
    fused = {m: f["node"] for f in result.fused for m in f["members"]}
    if mode == "dedicated":
        assert not result.fused
        assert {n: dict(c) for n, c in counts.items()} == {
            n: {k: v for k, v in result.qdq[n].items() if v} for n in int8}
    else:
        # q/k/v of layer 0 share an input and all are INT8: one MatMul; layer 1's k_proj is
        # FP32, so only its q and v merge; gate/up of layer 0 are FP16 and stay apart
        assert sorted(f["node"] for f in result.fused) == [
            "/model/layers.0/self_attn/q_proj+k_proj+v_proj/MatMul",
            "/model/layers.1/mlp/gate_proj+up_proj/MatMul",
            "/model/layers.1/self_attn/q_proj+v_proj/MatMul",
        ]
        node_counts = {fused.get(n, n) for n in int8}
        assert set(counts) == node_counts
        assert all(dict(counts[n]) == {"activation": 1, "weight": 1} for n in set(fused.values()))
    for name in ("/lm_head/MatMul", "/model/layers.1/self_attn/k_proj/MatMul",
                 "/model/layers.0/mlp/down_proj/MatMul"):
        assert name not in counts
    q_nodes = [n for n in result.model.graph.node if n.op_type == "QuantizeLinear"]
    assert len(q_nodes) == sum(c["activation"] for c in counts.values())
    for node in result.model.graph.node:
        if node.op_type == "DequantizeLinear":
            zero_point = next(t for t in result.model.graph.initializer if t.name == node.input[2])
            assert zero_point.data_type == onnx.TensorProto.INT8
            assert not numpy_helper.to_array(zero_point).any()  # symmetric: zero point 0
    assert result.as_built["/model/layers.0/mlp/down_proj/MatMul"] == "fp16"
    assert result.as_built["/lm_head/MatMul"] == "fp32"
    feed = {"input_ids": np.arange(40, dtype=np.int64).reshape(2, 20),
            "attention_mask": np.ones((2, 20), np.int64)}
    assert relative_error(run_onnx(result.model, feed), run_onnx(llama_model, feed)) < (
        INT8_LOGIT_TOLERANCE)


def test_gemm_with_transposed_weight_and_scaled_bias(tmp_path):
    """Gemm(A, B[N, K], C, alpha, beta, transB=1): weight scales along axis 0, the bias
    (times beta) moves to an Add, and ONNX Runtime runs it as QGemm."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    k, n = 32, 24
    weight = rng.normal(size=(n, k)).astype(np.float32)
    bias = rng.normal(size=(n,)).astype(np.float32)
    gemm = helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="/fc/Gemm", transB=1,
                            alpha=0.5, beta=2.0)
    graph = helper.make_graph(
        [gemm], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", n])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    x = rng.normal(size=(5, k)).astype(np.float32)
    plan = resolve_plan(PlanRecipe(), model)
    result = rewrite_model(model, plan, {"x": float(np.abs(x).max())})
    onnx.checker.check_model(result.model, full_check=True)
    dq = next(n for n in result.model.graph.node if n.name == "/fc/Gemm/input_1/DequantizeLinear")
    assert next(a.i for a in dq.attribute if a.name == "axis") == 0
    add = next(n for n in result.model.graph.node if n.op_type == "Add")
    folded = next(t for t in result.model.graph.initializer if t.name == add.input[1])
    np.testing.assert_allclose(numpy_helper.to_array(folded), 2.0 * bias)
    ref = 0.5 * x @ weight.T + 2.0 * bias
    out = run_onnx(result.model, {"x": x}, output="y")
    assert 0 < relative_error(out, ref) < 0.02
    assert fusion_report(optimized(result.model, tmp_path))["integer_ops"] == {"QGemm": 1}


def test_weights_stored_int8_per_output_channel(llama_model, gpt2_model, llama_table, gpt2_table):
    for model, table in ((llama_model, llama_table), (gpt2_model, gpt2_table)):
        plan = resolve_plan(PlanRecipe(), model)
        result = rewrite_model(model, plan, table.amax, QdqOptions(shared_inputs="dedicated"))
        inits = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
        original = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        producers = {o: n for n in result.model.graph.node for o in n.output}
        checked = 0
        for node in result.model.graph.node:
            if node.op_type not in ("MatMul", "Gemm"):
                continue
            dq = producers[node.input[1]]
            assert dq.op_type == "DequantizeLinear"
            if dq.input[0] not in inits:  # an activation (attention batched MatMul)
                continue
            q, scale = inits[dq.input[0]], inits[dq.input[1]]
            axis = next(a.i for a in dq.attribute if a.name == "axis")
            assert q.dtype == np.int8 and axis == 1 and scale.shape == (q.shape[1],)
            source = next((w for w in original.values() if w.shape == q.shape and np.allclose(
                dequantize(q, scale, 1), w, atol=float(scale.max()) / 2 + 1e-6)), None)
            if source is None:  # the tied LM head: folded Transpose of the embedding
                assert node.name == "/lm_head/MatMul"
                assert result.as_built["/lm_head/Transpose"] == "folded"
            checked += 1
        assert checked >= 7
        # the FP32 weights of quantized layers are gone (the tied embedding stays for its
        # Gather), replaced by int8 copies of a quarter of their size
        still_read = {t for n in result.model.graph.node for t in n.input}
        replaced = [w for name, w in original.items() if w.ndim == 2 and min(w.shape) > 1
                    and name not in still_read]
        int8_bytes = sum(w.nbytes for w in inits.values() if w.dtype == np.int8 and w.ndim == 2)
        tied = [w for name, w in original.items() if name in still_read and w.ndim == 2
                and w.shape[0] == 512]
        assert replaced and int8_bytes == (sum(w.size for w in replaced)
                                           + sum(w.size for w in tied[:1]))


def test_all_fp32_plan_reproduces_fp32_outputs_exactly(llama_model, eval_feed):
    plan = resolve_plan(PlanRecipe(default=Precision.FP32), llama_model)
    result = rewrite_model(llama_model, plan, None)
    onnx.checker.check_model(result.model, full_check=True)
    for output in ("logits", "nll"):
        np.testing.assert_array_equal(run_onnx(result.model, eval_feed, output),
                                      run_onnx(llama_model, eval_feed, output))
    assert not result.qdq and not result.fused
    assert set(result.as_built.values()) <= {"fp32", "none"}


@pytest.mark.parametrize("which", ["llama", "gpt2"])
@pytest.mark.parametrize("mode", ["fuse", "dedicated"])
def test_int8_logits_within_tolerance_and_fully_fused(which, mode, request, eval_feed, tmp_path):
    model = request.getfixturevalue(f"{which}_model")
    table = request.getfixturevalue(f"{which}_table")
    plan = resolve_plan(PlanRecipe(), model)
    # the layout ONNX Runtime engines get on this CPU: the same tolerance holds with or without
    # VNNI (with s8 weights on AVX2 without VNNI the saturating kernels gave 0.106 here)
    options = QdqOptions(shared_inputs=mode, weight_layout=MACHINE_WEIGHT_LAYOUT)
    result = rewrite_model(model, plan, table.amax, options)
    onnx.checker.check_model(result.model, full_check=True)
    ref = run_onnx(model, eval_feed)
    out = run_onnx(result.model, eval_feed)
    error = relative_error(out, ref)
    assert 0 < error < INT8_LOGIT_TOLERANCE, error
    # every Q/DQ became an integer kernel in ONNX Runtime: no float MatMul/Gemm on DQ outputs
    report = fusion_report(optimized(result.model, tmp_path))
    assert report["unfused_dequantized_matmuls"] == []
    linear = sum(1 for n in model.graph.node if n.op_type in ("MatMul", "Gemm"))
    merged = sum(len(f["members"]) - 1 for f in result.fused)
    assert sum(report["integer_ops"].values()) == linear - merged
    # the Q/DQ fusions are ONNX Runtime's "extended" optimizations: basic leaves them undone
    extended = fusion_report(optimized(result.model, tmp_path, "ORT_ENABLE_EXTENDED"))
    assert extended["integer_ops"] == report["integer_ops"]
    basic = fusion_report(optimized(result.model, tmp_path, "ORT_ENABLE_BASIC"))
    assert not basic["integer_ops"] and len(basic["unfused_dequantized_matmuls"]) == linear - merged
    if which == "gpt2":  # Gemm biases moved to an Add so that ONNX Runtime can use QGemm
        assert report["integer_ops"].get("QGemm") == 8
        assert sum(1 for n in result.model.graph.node if n.name.endswith("/bias/Add")) == 8


def literal_graph(model, tmp_path):
    """What ONNX Runtime runs with ORT_DISABLE_ALL: the Q/DQ reference."""
    return optimized(model, tmp_path, "ORT_DISABLE_ALL")


@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_fused_engine_matches_its_qdq_reference_on_this_machine(which, request, eval_feed,
                                                                 tmp_path):
    """The integer kernels ONNX Runtime fuses on this CPU compute what the Q/DQ graph says: the
    same graph with every DequantizeLinear executed and float MatMuls (ORT_DISABLE_ALL)."""
    model = request.getfixturevalue(f"{which}_model")
    table = request.getfixturevalue(f"{which}_table")
    plan = resolve_plan(PlanRecipe(), model)
    result = rewrite_model(model, plan, table.amax,
                           QdqOptions(weight_layout=MACHINE_WEIGHT_LAYOUT))
    # the reference really is literal: DequantizeLinear feeds float MatMul/Gemm, no integer op
    literal = literal_graph(result.model, tmp_path)
    report = fusion_report(literal)
    linear = sum(1 for n in result.model.graph.node if n.op_type in ("MatMul", "Gemm"))
    assert not report["integer_ops"]
    assert len(report["unfused_dequantized_matmuls"]) == linear
    fused = run_onnx(result.model, eval_feed)
    reference = run_onnx(result.model, eval_feed, optimization="ORT_DISABLE_ALL")
    assert relative_error(fused, reference) < QDQ_REFERENCE_TOLERANCE
    assert sum(fusion_report(optimized(result.model, tmp_path))["integer_ops"].values()) == linear


def test_u8_weights_are_the_s8_values_on_exact_kernels(llama_model, llama_table, eval_feed,
                                                      tmp_path):
    plan = resolve_plan(PlanRecipe(), llama_model)
    s8 = rewrite_model(llama_model, plan, llama_table.amax, QdqOptions(weight_layout="s8")).model
    u8 = rewrite_model(llama_model, plan, llama_table.amax, QdqOptions(weight_layout="u8")).model
    inits_s8 = {t.name: numpy_helper.to_array(t) for t in s8.graph.initializer}
    inits_u8 = {t.name: numpy_helper.to_array(t) for t in u8.graph.initializer}
    weights = [(n.input[0], n.input[2]) for n in u8.graph.node
               if n.op_type == "DequantizeLinear" and n.input[0] in inits_u8]
    assert weights
    for q_name, zp_name in weights:
        q, zp = inits_u8[q_name], inits_u8[zp_name]
        assert q.dtype == np.uint8 and zp.dtype == np.uint8 and np.all(zp == 128)
        twin = q_name.replace("_uint8", "_int8")
        np.testing.assert_array_equal(q.astype(np.int16) - 128, inits_s8[twin])
    # activations keep int8 pairs (ONNX Runtime makes them uint8 itself on x86)
    act_zps = [inits_u8[n.input[2]] for n in u8.graph.node if n.op_type == "QuantizeLinear"]
    assert act_zps and all(z.dtype == np.int8 and not z.any() for z in act_zps)
    # DequantizeLinear gives the very same values: the Q/DQ references are bit for bit equal
    np.testing.assert_array_equal(run_onnx(u8, eval_feed, optimization="ORT_DISABLE_ALL"),
                                  run_onnx(s8, eval_feed, optimization="ORT_DISABLE_ALL"))
    # and ONNX Runtime still fuses every u8 MatMul into an integer kernel
    report = fusion_report(optimized(u8, tmp_path))
    assert report["unfused_dequantized_matmuls"] == []
    assert report["integer_ops"] == fusion_report(optimized(s8, tmp_path))["integer_ops"]
    assert relative_error(run_onnx(u8, eval_feed),
                          run_onnx(u8, eval_feed, optimization="ORT_DISABLE_ALL")) < (
        QDQ_REFERENCE_TOLERANCE)


@pytest.mark.skipif(not cpu_isa().u8s8_saturates,
                    reason=f"this CPU ({cpu_isa().name}) has exact u8 x s8 kernels")
def test_s8_weights_saturate_on_this_cpu(llama_model, llama_table, eval_feed):
    """Why the layout exists: on x86 without VNNI the u8 x s8 kernels are far from the Q/DQ
    reference (measured 0.10 of max |logit| on this model, AVX2), u8 weights are not."""
    plan = resolve_plan(PlanRecipe(), llama_model)
    s8 = rewrite_model(llama_model, plan, llama_table.amax, QdqOptions(weight_layout="s8")).model
    error = relative_error(run_onnx(s8, eval_feed),
                           run_onnx(s8, eval_feed, optimization="ORT_DISABLE_ALL"))
    assert error > 100 * QDQ_REFERENCE_TOLERANCE


def test_s7_weights_are_7_bit(llama_model, llama_table, eval_feed):
    plan = resolve_plan(PlanRecipe(), llama_model)
    s7 = rewrite_model(llama_model, plan, llama_table.amax, QdqOptions(weight_layout="s7")).model
    inits = {t.name: numpy_helper.to_array(t) for t in s7.graph.initializer}
    source = {t.name: numpy_helper.to_array(t) for t in llama_model.graph.initializer}
    checked = 0
    for node in s7.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits:
            continue
        q, scale = inits[node.input[0]], inits[node.input[1]]
        assert q.dtype == np.int8 and np.abs(q).max() == 63
        name = node.input[0].removesuffix("_int7")
        if name in source and source[name].ndim == 2:  # MatMul B[K, N]: scale per column
            np.testing.assert_allclose(scale, np.abs(source[name]).max(axis=0) / 63, rtol=1e-6)
            checked += 1
    assert checked
    error = relative_error(run_onnx(s7, eval_feed),
                           run_onnx(s7, eval_feed, optimization="ORT_DISABLE_ALL"))
    assert error < QDQ_REFERENCE_TOLERANCE
    with pytest.raises(QuantkitError, match="unknown weight layout"):
        QdqOptions(weight_layout="s4")


def test_quantize_static_leaves_shared_input_matmuls_unfused(tiny_llama_export, calib_feeds,
                                                             tmp_path):
    """The trap this rewrite avoids: ONNX Runtime's own QDQ model, whose q/k/v and gate/up
    projections read one shared DequantizeLinear, keeps them as float MatMuls."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(calib_feeds)

        def get_next(self):
            return next(self.items, None)

    out = tmp_path / "ort_qdq.onnx"
    quantize_static(str(tiny_llama_export.onnx_path), str(out), Reader(),
                    quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul"],
                    per_channel=True, activation_type=QuantType.QInt8,
                    weight_type=QuantType.QInt8, extra_options={"DedicatedQDQPair": True})
    report = fusion_report(optimized(onnx.load(str(out)), tmp_path))
    unfused = Counter(n.rsplit("/", 2)[-2] for n in report["unfused_dequantized_matmuls"])
    for projection in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
        assert unfused[projection] == 2  # in both layers


def test_shared_weights_and_alias_ranges(llama_model, llama_table):
    """A tensor missing from the table is found through Reshape/Transpose views; tensors with
    no range at all are listed."""
    plan = resolve_plan(PlanRecipe(), llama_model)
    producers = {o: n for n in llama_model.graph.node for o in n.output}
    o_proj_input = "/model/layers.0/self_attn/Reshape_7_output_0"
    assert producers[o_proj_input].op_type == "Reshape"
    root = producers[producers[o_proj_input].input[0]].input[0]  # Reshape <- Transpose <- MatMul
    amax = {k: v for k, v in llama_table.amax.items() if k != o_proj_input}
    amax[root] = llama_table.amax[o_proj_input]
    rewrite_model(llama_model, plan, amax)  # resolved through the view
    missing = {k: v for k, v in amax.items() if "layers.1" not in k}
    with pytest.raises(QuantkitError, match="no range for 8 tensor") as err:
        rewrite_model(llama_model, plan, missing, skipped={
            "/model/layers.1/input_layernorm/Mul_1_output_0": "constant"})
    assert "/model/layers.1/input_layernorm/Mul_1_output_0 (skipped: constant)" in str(err.value)
    with pytest.raises(QuantkitError, match="needs a calibration table"):
        rewrite_model(llama_model, plan, None)
    with pytest.raises(QuantkitError, match="made for another graph"):
        rewrite_model(llama_model, resolve_plan(PlanRecipe(), _renamed(llama_model)), amax)


def _renamed(model):
    other = onnx.ModelProto()
    other.CopyFrom(model)
    other.graph.node[0].name = "/renamed"
    return other


# -- FP16 -------------------------------------------------------------------------------------
def test_fp16_rewrite_casts_at_region_boundaries(llama_model, eval_feed, tmp_path):
    plan = resolve_plan(PlanRecipe(rules=(
        PlanRule(Precision.FP16, blocks="layers.1"),
        PlanRule(Precision.FP32, node="/lm_head/MatMul"),
    ), default=Precision.FP32), llama_model)
    result = rewrite_model(llama_model, plan, None)
    model = result.model
    onnx.checker.check_model(model, full_check=True)
    assert [(i.name, i.type.tensor_type.elem_type) for i in model.graph.input] == [
        (i.name, i.type.tensor_type.elem_type) for i in llama_model.graph.input]
    assert [(o.name, o.type.tensor_type.elem_type) for o in model.graph.output] == [
        (o.name, o.type.tensor_type.elem_type) for o in llama_model.graph.output]
    fp16 = [n for n, v in result.as_built.items() if v == "fp16"]
    assert fp16 and all("/layers.1/" in n for n in fp16)
    assert all(result.as_built[n] in ("fp32", "none") for n in result.as_built
               if "/layers.1/" not in n)
    casts = Counter(next(a.i for a in n.attribute if a.name == "to")
                    for n in model.graph.node if n.op_type == "Cast"
                    and n.name.endswith(("/Cast_to_fp16", "/Cast_to_fp32")))
    assert casts[onnx.TensorProto.FLOAT16] >= 1 and casts[onnx.TensorProto.FLOAT] >= 1
    weights = {t.name: t.data_type for t in model.graph.initializer}
    by_name = {n.name: n for n in model.graph.node}
    q_proj = by_name["/model/layers.1/self_attn/q_proj/MatMul"]
    assert weights[q_proj.input[1]] == onnx.TensorProto.FLOAT16
    out = run_onnx(model, eval_feed)
    ref = run_onnx(llama_model, eval_feed)
    assert 0 < relative_error(out, ref) < FP16_LOGIT_TOLERANCE


def test_fp16_kernel_probe_agrees_with_what_onnx_runtime_runs(llama_model, tmp_path):
    """fp16_unsupported names exactly the FP16 nodes ONNX Runtime's CPU provider wraps in
    Casts (InsertCastTransformer), i.e. runs in float32."""
    plan = resolve_plan(PlanRecipe(default=Precision.FP16), llama_model)
    result = rewrite_model(llama_model, plan, None)
    fp16 = [n for n, v in result.as_built.items() if v == "fp16"]
    unsupported = set(fp16_unsupported(result.model, fp16, "CPUExecutionProvider"))
    assert unsupported and unsupported < set(fp16)
    import onnxruntime as ort

    path = tmp_path / "basic.onnx"
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.optimized_model_filepath = str(path)
    ort.InferenceSession(result.model.SerializeToString(), options,
                         providers=["CPUExecutionProvider"])
    ran = onnx.load(str(path))
    producers = {o: n for n in ran.graph.node for o in n.output}

    def reads_inserted_cast(node) -> bool:
        return any(t.startswith("InsertedPrecisionFreeCast") or (
            t in producers and producers[t].name.startswith("InsertedPrecisionFreeCast"))
            for t in node.input)

    moves_only = {"Transpose", "Reshape", "Concat", "Slice", "Gather", "Expand", "Unsqueeze",
                  "Squeeze", "Split", "Identity", "Flatten", "GatherElements", "GatherND",
                  "IsNaN"}  # exact whatever the float type: ONNX Runtime may run them in fp32
    fp16_set = set(fp16)
    wrapped = {n.name for n in ran.graph.node if n.name in fp16_set and reads_inserted_cast(n)
               and n.op_type not in moves_only}
    named = {n.name for n in ran.graph.node}
    assert wrapped == {n for n in unsupported if n in named}
    # (Log)Softmax is expanded into a function body by ONNX Runtime: no node left to check
    assert {plan.decisions[n].op_type for n in unsupported - named} <= {"Softmax", "LogSoftmax"}


def test_linear_layer_macs(tiny_llama_export):
    macs = linear_layer_macs(tiny_llama_export.onnx_path, seq_len=16)
    hidden, inter, kv, vocab, heads, head_dim = 64, 128, 32, 512, 4, 16
    assert macs["/model/layers.0/self_attn/q_proj/MatMul"] == 16 * hidden * hidden
    assert macs["/model/layers.0/self_attn/k_proj/MatMul"] == 16 * hidden * kv
    assert macs["/model/layers.0/mlp/down_proj/MatMul"] == 16 * inter * hidden
    assert macs["/model/layers.1/self_attn/MatMul"] == heads * 16 * head_dim * 16
    assert macs["/lm_head/MatMul"] == 16 * hidden * vocab
    assert len(macs) == 19


def test_zero_weights_are_made_just_before_their_first_reader(tiny_llama_export):
    """What bounds the memory of the MAC count: each float weight becomes a ConstantOfShape of
    its shape and type, placed right before the node that reads it first; small initializers
    (shape constants) stay."""
    import onnx

    from quantkit.graph_edit import zeros_for_float_weights

    model = onnx.load(str(tiny_llama_export.onnx_path))
    before = {t.name: t for t in model.graph.initializer}
    count = zeros_for_float_weights(model.graph)
    big = [n for n, t in before.items() if t.data_type == 1 and len(t.raw_data) >= 1024]
    assert count == len(big) > 10
    nodes = list(model.graph.node)
    kept = {t.name for t in model.graph.initializer}
    assert not kept & set(big) and {n for n in before if n not in big} <= kept
    for i, node in enumerate(nodes):
        if node.op_type != "ConstantOfShape" or not node.name.endswith("/__zeros"):
            continue
        weight = node.output[0]
        first = next(j for j, n in enumerate(nodes) if weight in n.input)
        assert nodes[first - 1] is node or nodes[first - 1].op_type == "ConstantOfShape", weight
        assert first > i
        dims = [int(d) for d in before[weight].dims]
        shape = onnx.numpy_helper.to_array(
            next(t for t in model.graph.initializer if t.name == node.input[0]))
        assert shape.tolist() == dims


def test_fp16_emulation_rounds_every_value_a_float16_engine_stores() -> None:
    """MatMul then Add in fp16, emulated: the graph computes in float32 on values rounded to
    float16 at the input, the weights, the MatMul's output and the Add's output."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from quantkit.plan import PlanRecipe, resolve_plan
    from quantkit.qdq import QdqOptions, rewrite_model

    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 4)).astype(np.float32)
    b = (rng.standard_normal(4) * 1e-3 + 1.0).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["m"], name="mm"),
         helper.make_node("Add", ["m", "b"], ["y"], name="add")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    plan = resolve_plan(PlanRecipe.uniform("fp16"), model)
    result = rewrite_model(model, plan, None, QdqOptions(fp16="emulate"))
    onnx.checker.check_model(result.model)
    assert result.as_built == {"mm": "fp16", "add": "fp16"}
    assert {i.type.tensor_type.elem_type for i in result.model.graph.output} == {1}
    x = (rng.standard_normal((2, 8)) * 3).astype(np.float32)

    def half(a: np.ndarray) -> np.ndarray:
        return a.astype(np.float16).astype(np.float32)

    expected = half(half(half(x) @ half(w)) + half(b))
    import onnxruntime as ort

    session = ort.InferenceSession(result.model.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": x})[0]
    # float16 values (the output is stored in float16), equal to the rounded computation up to
    # one float16 step where float32 accumulation order tips a rounding
    np.testing.assert_array_equal(half(got), got)
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=0)
    assert np.mean(got == expected) > 0.8
    assert not np.array_equal(got, x @ w + b)  # the rounding is there
    with pytest.raises(QuantkitError, match="fp16 mode"):
        QdqOptions(fp16="half")
