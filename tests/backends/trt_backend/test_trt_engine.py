"""End to end on real TensorRT and a CUDA GPU: build tiny engines on both paths, run them, and
compare with ONNX Runtime on the same ONNX. Skipped where TensorRT or a GPU is missing."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
trt = pytest.importorskip("tensorrt", reason="needs TensorRT (pip install 'quantkit[tensorrt]')")

from quantkit.backends.base import BuildRequest, Engine  # noqa: E402
from quantkit.backends.tensorrt import TensorRTBackend  # noqa: E402
from quantkit.backends.tensorrt.version import TrtVersion  # noqa: E402
from quantkit.calib.table import CalibrationTable  # noqa: E402
from quantkit.calib.trt_cache import trt_version_number  # noqa: E402
from quantkit.data import TokenBlocks, resolve_text_source  # noqa: E402
from quantkit.errors import QuantkitError  # noqa: E402
from quantkit.plan import NodeDecision, Precision, PrecisionPlan  # noqa: E402

pytest_plugins = ("tests.fixtures_build",)

pytestmark = [
    pytest.mark.tensorrt,
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

VERSION = TrtVersion.parse(trt.__version__)
trt10 = pytest.mark.skipif(not VERSION.has_implicit_quantization,
                           reason="the calibrator path exists on TensorRT 10 only")
PROFILE = {"min": [1, 1], "opt": [2, 16], "max": [2, 32]}
INT8_OPTIONS = {"profiles": [{"min": [1, 1], "opt": [4, 16], "max": [4, 32]}],
                "constraints": "prefer", "calibration_shape": [4, 16]}


def ort_run(onnx_path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


def token_feeds(vocab: int, batch: int = 2, seq: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=(batch, seq), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[-1, seq - 3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def plan_for(onnx_path, int8_ops=("MatMul", "Gemm"), rest=Precision.FP32) -> PrecisionPlan:
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    decisions = {}
    for node in graph.node:
        precision = Precision.INT8 if node.op_type in int8_ops else rest
        decisions[node.name] = NodeDecision(node.name, node.op_type, precision, "test")
    return PrecisionPlan(default=rest, decisions=decisions)


def layers_json(engine: Engine) -> dict:
    return json.loads((engine.path / engine.manifest["layers_file"]).read_text())


@pytest.fixture(scope="module")
def export(tiny_llama_export):
    return tiny_llama_export


@pytest.fixture
def blocks(tiny_tokenizer):
    return TokenBlocks(resolve_text_source("sample"), tiny_tokenizer, seq_len=16, num_samples=8,
                       batch_size=4, seed=0)


# -- FP32 / FP16 ----------------------------------------------------------------------------------

def test_fp32_engine_matches_onnxruntime(export, tmp_path):
    timing = tmp_path / "timing.cache"
    req = BuildRequest(export.onnx_path, "fp32", None, None,
                       {"profiles": [PROFILE], "tf32": False, "timing_cache": str(timing)})
    engine = TensorRTBackend().build(req, tmp_path / "fp32")
    info = engine.manifest["tensorrt"]
    assert info["version"] == trt.__version__
    assert info["path"] == ("implicit" if VERSION.has_implicit_quantization else "explicit")
    assert [t["name"] for t in info["io"]] == ["input_ids", "attention_mask", "logits", "nll"]
    assert (engine.path / "engine.plan").stat().st_size == engine.manifest["size_bytes"]
    assert timing.is_file() and info["timing_cache"]["bytes"] == timing.stat().st_size
    summary = layers_json(engine)["summary"]
    assert summary["engine_layers"] > 0
    assert not {"int8", "fp16", "bf16", "fp8"} & set(summary["by_precision"])

    feeds = token_feeds(512)
    expected = ort_run(export.onnx_path, feeds)
    with engine.runner() as runner:
        got = runner.run(feeds)
        only_nll = runner.run(feeds, ["nll"])
        on_device = runner.run_device(feeds)
        times = runner.benchmark(feeds, warmup=2, iterations=5)
        described = runner.describe()
    valid = feeds["attention_mask"].astype(bool)
    scale = np.abs(expected["logits"][valid]).max()
    np.testing.assert_allclose(got["logits"][valid], expected["logits"][valid],
                               atol=1e-3 * scale, rtol=0)
    both = valid[:, 1:] & valid[:, :-1]  # nll[t] scores token t+1 from positions <= t
    np.testing.assert_allclose(got["nll"][both], expected["nll"][both], atol=1e-3, rtol=1e-3)
    assert list(only_nll) == ["nll"]
    assert on_device["logits"].is_cuda and tuple(on_device["logits"].shape) == (2, 16, 512)
    assert len(times) == 5 and all(t > 0 for t in times)
    assert described["backend"] == "tensorrt" and "device" in described

    # a second build reads the timing cache the first one wrote
    again = TensorRTBackend().build(req, tmp_path / "fp32-again")
    assert again.manifest["tensorrt"]["timing_cache"]["bytes"] >= info["timing_cache"]["bytes"]


def test_outside_the_profile_is_a_clear_error(export, tmp_path):
    req = BuildRequest(export.onnx_path, "fp32", None, None, {"profiles": [PROFILE]})
    engine = TensorRTBackend().build(req, tmp_path / "e")
    with engine.runner() as runner, pytest.raises(QuantkitError, match="outside the engine's"):
        runner.run(token_feeds(512, batch=3))


@trt10
def test_fp16_implicit_engine(export, tmp_path):
    plan = plan_for(export.onnx_path, int8_ops=(), rest=Precision.FP16)
    req = BuildRequest(export.onnx_path, "fp16", plan, None,
                       {"profiles": [PROFILE], "constraints": "prefer"})
    engine = TensorRTBackend().build(req, tmp_path / "fp16")
    assert engine.manifest["tensorrt"]["flags"] == ["FP16", "PREFER_PRECISION_CONSTRAINTS"]
    layers = layers_json(engine)
    assert layers["plan_mapping"]["summary"]["by_precision"] == {
        "fp16": layers["plan_mapping"]["summary"]["constrained_layers"]}
    assert layers["summary"]["by_precision"].get("fp16", 0) > 0
    feeds = token_feeds(512)
    expected = ort_run(export.onnx_path, feeds)["logits"]
    with engine.runner() as runner:
        got = runner.run(feeds)["logits"]
    valid = feeds["attention_mask"].astype(bool)
    scale = np.abs(expected[valid]).max()
    np.testing.assert_allclose(got[valid], expected[valid], atol=3e-2 * scale, rtol=0)


# -- implicit INT8 (TensorRT 10) ------------------------------------------------------------------

@trt10
def test_int8_calibration_then_table_reuse(export, blocks, tmp_path):
    plan = plan_for(export.onnx_path)
    options = INT8_OPTIONS
    backend = TensorRTBackend(calibration_data=blocks)
    first = backend.build(BuildRequest(export.onnx_path, "int8", plan, None, options),
                          tmp_path / "int8")
    info = first.manifest["tensorrt"]
    calibration = info["calibration"]
    assert "INT8" in info["flags"] and "PREFER_PRECISION_CONSTRAINTS" in info["flags"]
    assert calibration["batches_fed"] == 2 and not calibration["used_cache"]
    assert calibration["feeder"]["shape"] == [4, 16]
    cache = (first.path / "calibration.cache").read_bytes()
    header = f"TRT-{trt_version_number(trt.__version__)}-EntropyCalibration2\n"
    assert cache.startswith(header.encode())
    table = CalibrationTable.load(first.path / calibration["table_file"])
    assert table.method == "entropy" and len(table) > 0 and table.num_samples == 8
    layers = layers_json(first)
    assert layers["plan_mapping"]["summary"]["constrained_layers"] > 0
    assert layers["plan_comparison"]["planned_int8"] > 0
    assert first.manifest["int8_coverage"] is not None

    feeds = token_feeds(512, batch=2)
    expected = ort_run(export.onnx_path, feeds)["logits"]
    with first.runner() as runner:
        got = runner.run(feeds)["logits"]
    assert np.isfinite(got).all()
    valid = feeds["attention_mask"].astype(bool)
    assert np.corrcoef(got[valid].ravel(), expected[valid].ravel())[0, 1] > 0.8

    # the table TensorRT's calibration produced skips calibration in the next build
    second = TensorRTBackend().build(BuildRequest(export.onnx_path, "int8", plan, table, options),
                                     tmp_path / "int8-from-table")
    reused = second.manifest["tensorrt"]["calibration"]
    assert reused["used_cache"] is True and reused["batches_fed"] == 0
    assert not (second.path / "calibration.cache").exists()


@trt10
def test_rebuild_with_the_same_backend_replays_the_data(export, blocks, tmp_path):
    plan = plan_for(export.onnx_path)
    backend = TensorRTBackend(calibration_data=blocks)
    for name in ("a", "b"):
        engine = backend.build(BuildRequest(export.onnx_path, "int8", plan, None, INT8_OPTIONS),
                               tmp_path / name)
        calibration = engine.manifest["tensorrt"]["calibration"]
        assert calibration["batches_fed"] == 2 and calibration["feeder"]["dropped_rows"] == 0
    assert len(backend._sources) == 1  # one set of device buffers, rewound for the rebuild


@trt10
def test_zero_calibration_batches_never_makes_an_engine(export, tiny_tokenizer, tmp_path):
    one_row = TokenBlocks(resolve_text_source("sample"), tiny_tokenizer, seq_len=16,
                          num_samples=1, batch_size=1)
    with pytest.raises(QuantkitError, match="zero batches"):
        TensorRTBackend(calibration_data=one_row).build(
            BuildRequest(export.onnx_path, "int8", plan_for(export.onnx_path), None,
                         INT8_OPTIONS),
            tmp_path / "never",
        )
    assert not (tmp_path / "never").exists()


@trt10
def test_plan_for_another_graph_is_refused(export, blocks, tmp_path):
    plan = PrecisionPlan.uniform([("/model/layers.9/mlp/down_proj/MatMul", "MatMul")],
                                 Precision.INT8)
    with pytest.raises(QuantkitError, match="the TensorRT network does not have"):
        TensorRTBackend(calibration_data=blocks).build(
            BuildRequest(export.onnx_path, "int8", plan, None, {"profiles": [PROFILE]}),
            tmp_path / "e",
        )


@pytest.mark.skipif(VERSION.has_implicit_quantization, reason="TensorRT 11 behaviour")
def test_calibrator_on_tensorrt_11(export, blocks, tmp_path):
    with pytest.raises(QuantkitError, match="TensorRT 11 removed IInt8Calibrator"):
        TensorRTBackend(calibration_data=blocks).build(
            BuildRequest(export.onnx_path, "int8", None, None,
                         {"mode": "implicit", "profiles": [PROFILE]}),
            tmp_path / "e",
        )


# -- explicit Q/DQ (TensorRT 10 and 11) -----------------------------------------------------------

def qdq_matmul_onnx(path, k: int = 64, n: int = 32, seed: int = 0):
    """x [batch, k] -> Q/DQ (per-tensor) -> MatMul with DQ(int8 W [k, n], per-column scales)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = rng.integers(-127, 128, size=(k, n), dtype=np.int8)
    w_scale = (rng.random(n).astype(np.float32) + 0.5) * 0.01
    inits = [
        numpy_helper.from_array(np.array(0.05, np.float32), "x_scale"),
        numpy_helper.from_array(np.array(0, np.int8), "x_zero"),
        numpy_helper.from_array(w, "w_q"),
        numpy_helper.from_array(w_scale, "w_scale"),
        numpy_helper.from_array(np.zeros(n, np.int8), "w_zero"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["x_q"], name="/x/Q"),
        helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zero"], ["x_dq"],
                         name="/x/DQ"),
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero"], ["w_dq"], name="/w/DQ",
                         axis=1),
        helper.make_node("MatMul", ["x_dq", "w_dq"], ["y"], name="/fc/MatMul"),
    ]
    graph = helper.make_graph(
        nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def test_explicit_qdq_engine_runs_int8_and_matches_onnxruntime(tmp_path):
    onnx_path = qdq_matmul_onnx(tmp_path / "qdq.onnx")
    options = {"mode": "explicit", "qdq_onnx": str(onnx_path),
               "profiles": [{"min": [1, 64], "opt": [4, 64], "max": [8, 64]}]}
    engine = TensorRTBackend().build(BuildRequest(onnx_path, "int8", None, None, options),
                                     tmp_path / "explicit")
    info = engine.manifest["tensorrt"]
    assert info["path"] == "explicit" and info["strongly_typed"] is True
    assert info["flags"] == [] and info["calibration"] is None
    assert layers_json(engine)["summary"]["by_precision"].get("int8", 0) >= 1

    x = np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32)
    expected = ort_run(onnx_path, {"x": x})["y"]
    with engine.runner() as runner:
        got = runner.run({"x": x})["y"]
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max())


def test_explicit_path_refuses_a_float_onnx_labelled_int8(export, tmp_path):
    with pytest.raises(QuantkitError, match="no QuantizeLinear/DequantizeLinear nodes"):
        TensorRTBackend().build(
            BuildRequest(export.onnx_path, "int8", None, None,
                         {"mode": "explicit", "profiles": [PROFILE],
                          "qdq_onnx": str(export.onnx_path)}),
            tmp_path / "e",
        )


def test_explicit_int8_from_a_table_writes_and_builds_the_qdq_onnx(export, llama_table,
                                                                   tmp_path):
    plan = plan_for(export.onnx_path)
    req = BuildRequest(export.onnx_path, "int8", plan, llama_table,
                       {"mode": "explicit", "profiles": [PROFILE]})
    engine = TensorRTBackend().build(req, tmp_path / "explicit-int8")
    info = engine.manifest["tensorrt"]
    assert info["path"] == "explicit" and info["onnx_built"] == "model.qdq.onnx"
    assert info["qdq_rewrite"]["qdq_pairs"] > 0
    assert layers_json(engine)["summary"]["by_precision"].get("int8", 0) > 0
    feeds = token_feeds(512)
    expected = ort_run(engine.path / "model.qdq.onnx", feeds)["logits"]
    with engine.runner() as runner:
        got = runner.run(feeds)["logits"]
    valid = feeds["attention_mask"].astype(bool)
    assert np.corrcoef(got[valid].ravel(), expected[valid].ravel())[0, 1] > 0.95


def test_torch_inputs_written_on_another_stream_are_waited_for(export, tmp_path):
    req = BuildRequest(export.onnx_path, "fp32", None, None, {"profiles": [PROFILE]})
    engine = TensorRTBackend().build(req, tmp_path / "fp32")
    feeds = token_feeds(512)
    with engine.runner() as runner:
        expected = runner.run(feeds)["logits"]
        on_gpu = {k: torch.from_numpy(v).cuda() for k, v in feeds.items()}
        torch.cuda._sleep(10_000_000)  # keep the caller's stream busy, then write the inputs
        for tensor in on_gpu.values():
            tensor.add_(0)
        got = runner.run_device(on_gpu)["logits"].cpu().numpy()
    np.testing.assert_array_equal(got, expected)


@trt10
def test_cli_build_with_calibration_text_then_eval(export, tmp_path):
    from click.testing import CliRunner

    from quantkit.cli.main import cli

    out = tmp_path / "trt-int8"
    result = CliRunner().invoke(cli, [
        "build", "--backend", "tensorrt", "--onnx", str(export.directory), "--precision", "int8",
        "--dataset", "sample", "--num-samples", "8", "--seq-len", "16", "--batch-size", "4",
        "--profile", "1x1:1x16:2x64", "--constraints", "prefer", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "Calibration: 2 batches through TensorRT's EntropyCalibration2" in result.output
    results = tmp_path / "results.json"
    result = CliRunner().invoke(cli, [
        "eval", "--engine", str(out), "--dataset", "sample", "--split", "test", "--max-length",
        "64", "--limit-tokens", "300", "--batch-size", "2", "--latency-grid", "1x16",
        "--warmup", "1", "--iterations", "3", "--out", str(results)])
    assert result.exit_code == 0, result.output
    data = json.loads(results.read_text())
    (engine_result,) = data["engines"]
    assert engine_result["backend"] == "tensorrt" and np.isfinite(engine_result["perplexity"])
