"""The calibrator's cache through quantkit's TensorRT cache I/O: tables in, TensorRT's cache out."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from quantkit.backends.tensorrt import cache_io
from quantkit.backends.tensorrt.calibrator import CalibrationSession
from quantkit.calib.table import CalibrationTable
from quantkit.calib.trt_cache import TrtCache
from quantkit.errors import QuantkitError

TRT = "10.13.0.35"
ENTROPY2 = "EntropyCalibration2"
MINMAX = "MinMaxCalibration"
AMAX = {
    "input_ids": 50256.0,
    "/model/layers.0/input_layernorm/Mul_1_output_0": 3.25,
    "/model/layers.0/mlp/act_fn/Mul_output_0": 0.9963,
    "/model/layers.0/mlp/down_proj/MatMul_output_0": 17.5,
}


def table(method: str = "entropy", **kw) -> CalibrationTable:
    return CalibrationTable(method=method, params={"num_bins": 2048}, amax=dict(AMAX),
                            model_hash=kw.pop("model_hash", "a" * 64), **kw)


@pytest.fixture
def onnx_names(tmp_path):
    """A small ONNX graph whose tensor names are AMAX's (plus one more)."""
    import onnx
    from onnx import TensorProto, helper

    names = list(AMAX)[1:]
    nodes = [helper.make_node("Identity", ["input_ids"], [names[0]], name="/n0"),
             helper.make_node("Identity", [names[0]], [names[1]], name="/n1"),
             helper.make_node("Identity", [names[1]], [names[2]], name="/n2"),
             helper.make_node("Identity", [names[2]], ["logits"], name="/n3")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("input_ids", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4])])
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph), str(path))
    return path


def test_onnx_tensor_names(onnx_names):
    assert cache_io.onnx_tensor_names(onnx_names) == set(AMAX) | {"logits"}


def test_table_goes_to_tensorrt_as_a_cache_of_this_version(onnx_names):
    data = cache_io.cache_bytes_from_table(
        table(), ENTROPY2, TRT, model_hash="a" * 64,
        tensor_names=cache_io.onnx_tensor_names(onnx_names),
    )
    text = data.decode()
    assert text.splitlines()[0] == "TRT-101300-EntropyCalibration2"
    cache = TrtCache.parse(data)
    for name, amax in AMAX.items():
        assert cache.scales[name] == float(np.float32(amax / 127.0))


def test_minmax_tables_go_out_as_minmax_caches_and_other_methods_as_entropy2():
    assert cache_io.calibrator_algorithm_for_table(table("minmax")) == MINMAX
    assert cache_io.calibrator_algorithm_for_table(table("entropy")) == ENTROPY2
    assert cache_io.calibrator_algorithm_for_table(table("percentile")) == ENTROPY2
    data = cache_io.cache_bytes_from_table(table("minmax"), MINMAX, "10.3.0")
    assert data.startswith(b"TRT-100300-MinMaxCalibration\n")


def test_table_of_another_model_is_refused():
    with pytest.raises(QuantkitError, match="computed for a different model"):
        cache_io.cache_bytes_from_table(table(), ENTROPY2, TRT, model_hash="b" * 64)


def test_a_table_from_tensorrt_may_name_parser_tensors(onnx_names):
    from_trt = cache_io.table_from_cache_bytes(
        b"TRT-101300-EntropyCalibration2\ninput_ids: 4c400000\n"
        b"/model/layers.0/mlp/act_fn/Mul_output_0'_5: 3c010a14\n", ENTROPY2, TRT)
    names = cache_io.onnx_tensor_names(onnx_names)
    data = cache_io.cache_bytes_from_table(from_trt, ENTROPY2, TRT, tensor_names=names)
    assert data.count(b"\n") == 3
    # a table quantkit computed must name the model's tensors only
    computed = CalibrationTable("entropy", amax={"input_ids": 1.0, "/not/in/model": 2.0})
    with pytest.raises(QuantkitError, match="1 tensor\\(s\\) this model does not have"):
        cache_io.cache_bytes_from_table(computed, ENTROPY2, TRT, tensor_names=names)


def test_table_of_another_graph_is_refused(onnx_names):
    other = CalibrationTable(method="entropy", amax={"/other/MatMul_output_0": 1.0})
    with pytest.raises(QuantkitError, match="for another model"):
        cache_io.cache_bytes_from_table(
            other, ENTROPY2, TRT, tensor_names=cache_io.onnx_tensor_names(onnx_names)
        )


def test_cache_file_checked_and_reheaded(tmp_path, onnx_names):
    path = tmp_path / "old.cache"
    path.write_bytes(TrtCache(100300, ENTROPY2, {"input_ids": 0.5}).to_bytes())
    with pytest.raises(QuantkitError, match="from TensorRT 10.3.0") as info:
        cache_io.cache_bytes_from_file(path, ENTROPY2, TRT)
    assert "mismatch" in info.value.hint
    data = cache_io.cache_bytes_from_file(path, ENTROPY2, TRT, accept_version_mismatch=True,
                                          tensor_names=cache_io.onnx_tensor_names(onnx_names))
    # the header is rewritten for the running TensorRT, which would ignore the old one
    assert data == b"TRT-101300-EntropyCalibration2\ninput_ids: 3f000000\n"


def test_cache_file_of_another_algorithm_is_refused(tmp_path):
    path = tmp_path / "minmax.cache"
    path.write_bytes(TrtCache(101300, MINMAX, {"x": 0.5}).to_bytes())
    with pytest.raises(QuantkitError, match="written by TensorRT's MinMaxCalibration, not "
                                            "EntropyCalibration2"):
        cache_io.cache_bytes_from_file(path, ENTROPY2, TRT)


def test_cache_file_that_is_not_a_cache(tmp_path):
    path = tmp_path / "engine.plan"
    path.write_bytes(b"\x00\x01binary")
    with pytest.raises(QuantkitError, match="not a TensorRT calibration cache"):
        cache_io.cache_bytes_from_file(path, ENTROPY2, TRT)


WRITTEN_BY_TENSORRT = (
    b"TRT-101300-EntropyCalibration2\n"
    b"input_ids: 4c400000\n"
    b"/model/layers.0/input_layernorm/Mul_1_output_0: 3cd1a5e3\n"
    b"(Unnamed Layer* 8) [Constant]_output: 3c010a14\n"
    b"/model/layers.0/self_attn/Softmax_output_0: 0\n"
)


def test_tensorrts_cache_becomes_a_calibration_table(tmp_path):
    out = cache_io.table_from_cache_bytes(
        WRITTEN_BY_TENSORRT, ENTROPY2, TRT, model_hash="c" * 64,
        data_description={"source": "sample"}, num_samples=6, num_tokens=96,
    )
    assert out.method == "entropy"
    assert out.model_hash == "c" * 64 and out.num_samples == 6 and out.num_tokens == 96
    assert out.params["trt_version"] == 101300
    # 4c400000 is float32 50331648.0, 3c010a14 is 0.0078747...: amax = scale * 127
    assert out.amax["input_ids"] == 50331648.0 * 127
    unnamed = struct.unpack(">f", bytes.fromhex("3c010a14"))[0]
    assert out.scale("(Unnamed Layer* 8) [Constant]_output") == pytest.approx(unnamed, rel=1e-12)
    assert "/model/layers.0/self_attn/Softmax_output_0" in out.skipped
    path = tmp_path / "calibration_table.json"
    out.save(path)
    back = CalibrationTable.load(path)
    assert back.amax == out.amax and back.skipped == out.skipped


def test_round_trip_table_to_calibrator_to_table():
    """A table read by the calibrator comes back, written by TensorRT in the same format,
    as the same amax (float32 scales)."""
    sent = cache_io.cache_bytes_from_table(table(), ENTROPY2, TRT)
    session = CalibrationSession("entropy", None, batch_size=4, cache=sent)
    assert session.read_calibration_cache() == sent
    session.write_calibration_cache(sent)  # TensorRT writes back the scales it used
    back = cache_io.table_from_cache_bytes(session.written, ENTROPY2, TRT)
    for name, amax in AMAX.items():
        assert back.amax[name] == pytest.approx(amax, rel=1e-6)
        assert np.float32(back.scale(name)) == np.float32(amax / 127.0)


def test_the_written_cache_must_come_from_this_version_and_calibrator():
    with pytest.raises(QuantkitError, match="MinMaxCalibration"):
        cache_io.table_from_cache_bytes(WRITTEN_BY_TENSORRT, MINMAX, TRT)


def test_cache_file_of_another_major_version_says_so(tmp_path):
    path = tmp_path / "trt8.cache"
    path.write_bytes(TrtCache(8601, ENTROPY2, {"input_ids": 0.5}).to_bytes())
    with pytest.raises(QuantkitError) as info:
        cache_io.cache_bytes_from_file(path, ENTROPY2, TRT)
    assert str(info.value).startswith(
        f"calibration cache {path} is from TensorRT 8.6.1 (header TRT-8601-EntropyCalibration2), "
        "this is TensorRT 10.13.0, another major version; TensorRT would ignore it")
    assert "--option accept_cache_version_mismatch=true" in info.value.hint
