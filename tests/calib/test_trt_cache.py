from __future__ import annotations

import struct

import numpy as np
import pytest

from quantkit.calib.table import CalibrationTable
from quantkit.calib.trt_cache import (
    TrtCache,
    check_trt_cache,
    hex_to_scale,
    scale_to_hex,
    table_from_trt_cache,
    table_to_trt_cache,
    trt_version_number,
    trt_version_string,
)
from quantkit.errors import QuantkitError

CACHE = (b"TRT-100300-EntropyCalibration2\n"
         b"input_ids: 3c008912\n"
         b"/model/layers.0/mlp/act_fn/Mul_output_0: 4000889d\n"
         b"(Unnamed Layer* 8) [Constant]_output: 39137939\n"
         b"weird: name: with colons: 3d8b4e7c\n")


def test_known_pairs_decode():
    assert hex_to_scale("3c008912") == pytest.approx(0.0078452, rel=1e-5)
    assert hex_to_scale("3c008912") * 127 == pytest.approx(0.99634, rel=1e-5)
    assert hex_to_scale("4000889d") == pytest.approx(2.00834, rel=1e-5)
    assert hex_to_scale("4000889d") * 127 == pytest.approx(255.059, rel=1e-5)
    assert scale_to_hex(hex_to_scale("3c008912")) == "3c008912"


def test_parse_splits_on_the_last_colon_space():
    cache = TrtCache.parse(CACHE)
    assert cache.version == 100300 and cache.algorithm == "EntropyCalibration2"
    assert list(cache.scales) == ["input_ids", "/model/layers.0/mlp/act_fn/Mul_output_0",
                                  "(Unnamed Layer* 8) [Constant]_output",
                                  "weird: name: with colons"]


def test_round_trip_is_bit_exact():
    cache = TrtCache.parse(CACHE)
    assert cache.to_bytes() == CACHE
    # and through a CalibrationTable (amax = scale * 127) and back
    table = table_from_trt_cache(cache, model_hash="h")
    assert table.method == "entropy" and table.model_hash == "h"
    back = table_to_trt_cache(table, 100300)
    assert back.to_bytes() == CACHE
    for name, scale in cache.scales.items():
        assert struct.pack(">f", back.scales[name]) == struct.pack(">f", scale)


def test_table_to_cache_uses_float32_scales_and_the_method_header():
    table = CalibrationTable(method="minmax", amax={"x": 1.0, "y": 3.5})
    cache = table_to_trt_cache(table, "8.6.1")
    assert cache.header == "TRT-8601-MinMaxCalibration"
    assert cache.scales["x"] == float(np.float32(1.0 / 127))
    text = cache.to_bytes().decode()
    assert text.splitlines()[1] == f"x: {struct.pack('>f', np.float32(1 / 127)).hex()}"
    entropy = table_to_trt_cache(CalibrationTable(method="percentile", amax={"x": 1.0}), 100300)
    assert entropy.algorithm == "EntropyCalibration2"


def test_version_numbers():
    assert trt_version_number("10.3.0") == 100300
    assert trt_version_number("10.13.0.35") == 101300
    assert trt_version_number("8.6.1") == 8601
    assert trt_version_number((7, 1, 3)) == 7103
    assert trt_version_string(101300) == "10.13.0" and trt_version_string(8601) == "8.6.1"


def test_check_algorithm_version_and_names():
    cache = TrtCache.parse(CACHE)
    names = ["input_ids", "/model/layers.0/mlp/act_fn/Mul_output_0", "weird: name: with colons"]
    check_trt_cache(cache, algorithm="EntropyCalibration2", trt_version="10.3.0",
                    tensor_names=names)
    with pytest.raises(QuantkitError, match="written by TensorRT's EntropyCalibration2, not "
                                            "MinMaxCalibration"):
        check_trt_cache(cache, algorithm="MinMaxCalibration")
    with pytest.raises(QuantkitError, match=r"TensorRT 10.3.0 \(TRT-100300\), this is "
                                            r"TensorRT 10.13.0"):
        check_trt_cache(cache, trt_version="10.13.0")
    check_trt_cache(cache, trt_version="10.13.0", allow_version_mismatch=True)
    moved = cache.with_version("10.13.0")
    assert moved.header == "TRT-101300-EntropyCalibration2" and moved.scales == cache.scales
    check_trt_cache(moved, trt_version="10.13.0")
    with pytest.raises(QuantkitError, match="1 tensor.* this model does not have: 'input_ids'"):
        check_trt_cache(cache, tensor_names=names[1:])
    check_trt_cache(cache, tensor_names=names[1:], allow_unknown_tensors=True)
    with pytest.raises(QuantkitError, match="for another model"):
        check_trt_cache(cache, tensor_names=["something/else"])


@pytest.mark.parametrize("data,match", [
    (b"", "empty"),
    (b"\xff\xfe", "not text"),
    (b"calibration\nx: 3c008912\n", "first line"),
    (b"TRT-100300-EntropyCalibration2\nx 3c008912\n", ":2: expected"),
    (b"TRT-100300-EntropyCalibration2\nx: zz\n", ":2: expected"),
    (b"TRT-100300-EntropyCalibration2\nx: 3c008912\nx: 3c008912\n", "appears twice"),
    (b"TRT-100300-EntropyCalibration2\nx: 7fc00000\n", "scale of 'x' is nan"),
])
def test_malformed_caches(data, match):
    with pytest.raises(QuantkitError, match=match):
        TrtCache.parse(data)


def test_file_io(tmp_path):
    cache = TrtCache.parse(CACHE)
    cache.write(tmp_path / "calibration.cache")
    assert (tmp_path / "calibration.cache").read_bytes() == CACHE
    assert TrtCache.read(tmp_path / "calibration.cache") == cache
    with pytest.raises(QuantkitError, match="does not exist"):
        TrtCache.read(tmp_path / "missing.cache")


def test_windows_line_ends_and_short_hex_are_read():
    cache = TrtCache.parse(b"TRT-8601-EntropyCalibration2\r\na: 3c008912\r\nb: 1\r\n")
    assert cache.scales["a"] == hex_to_scale("3c008912")
    assert cache.scales["b"] == struct.unpack(">f", (1).to_bytes(4, "big"))[0]
