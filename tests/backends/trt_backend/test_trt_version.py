"""Version detection and the choice of quantization path (no TensorRT needed)."""

from __future__ import annotations

import pytest

from quantkit.backends.tensorrt.version import (
    BuildMode,
    QuantPath,
    TrtVersion,
    check_supported,
    select_path,
)
from quantkit.errors import QuantkitError


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.13.0.35", TrtVersion(10, 13, 0, 35)),
        ("10.8.0.43+cuda12.8", TrtVersion(10, 8, 0, 43)),
        ("11.0.0", TrtVersion(11, 0, 0, 0)),
        ("11.4", TrtVersion(11, 4, 0, 0)),
        (" 10.0.1.6 ", TrtVersion(10, 0, 1, 6)),
    ],
)
def test_parse_version(text, expected):
    assert TrtVersion.parse(text) == expected


def test_parse_rejects_garbage():
    with pytest.raises(QuantkitError, match="cannot read a TensorRT version"):
        TrtVersion.parse("tensorrt")


def test_versions_order_numerically():
    assert TrtVersion.parse("10.13.0.35") > TrtVersion.parse("10.9.0.34")
    assert TrtVersion.parse("11.0.0") > TrtVersion.parse("10.13.3.9")


def test_implicit_quantization_exists_on_10_only():
    assert TrtVersion.parse("10.0.1").has_implicit_quantization
    assert TrtVersion.parse("10.13.0.35").has_implicit_quantization
    assert not TrtVersion.parse("11.0.0").has_implicit_quantization
    assert not TrtVersion.parse("11.4.1").has_implicit_quantization


@pytest.mark.parametrize("text", ["8.6.1", "9.3.0"])
def test_too_old_is_refused(text):
    with pytest.raises(QuantkitError, match="too old") as info:
        check_supported(TrtVersion.parse(text))
    assert "quantkit[tensorrt]" in str(info.value)


def test_too_new_is_refused():
    with pytest.raises(QuantkitError, match="newer than the versions quantkit supports"):
        check_supported(TrtVersion.parse("12.0.0"))


@pytest.mark.parametrize(
    ("version", "mode", "qdq", "expected"),
    [
        ("10.13.0.35", "auto", False, QuantPath.IMPLICIT),
        ("10.13.0.35", "auto", True, QuantPath.EXPLICIT),
        ("10.13.0.35", "implicit", False, QuantPath.IMPLICIT),
        ("10.13.0.35", "explicit", False, QuantPath.EXPLICIT),
        ("10.13.0.35", "explicit", True, QuantPath.EXPLICIT),
        ("11.0.0", "auto", False, QuantPath.EXPLICIT),
        ("11.0.0", "auto", True, QuantPath.EXPLICIT),
        ("11.2.1", "explicit", True, QuantPath.EXPLICIT),
    ],
)
def test_select_path(version, mode, qdq, expected):
    assert select_path(TrtVersion.parse(version), mode, has_qdq_onnx=qdq) is expected


def test_calibrator_on_tensorrt_11_says_why_and_what_to_use():
    with pytest.raises(QuantkitError) as info:
        select_path(TrtVersion.parse("11.0.0"), "implicit", has_qdq_onnx=False)
    text = str(info.value)
    assert "TensorRT 11 removed IInt8Calibrator" in text
    assert "INT8/FP16 builder flags" in text
    assert "explicit" in text and "Q/DQ" in text


def test_select_path_checks_the_version_first():
    with pytest.raises(QuantkitError, match="too old"):
        select_path(TrtVersion.parse("8.6.1"), "explicit", has_qdq_onnx=True)


def test_unknown_mode():
    with pytest.raises(QuantkitError, match="unknown TensorRT build mode 'calibrate'"):
        BuildMode.parse("calibrate")
    assert BuildMode.parse("EXPLICIT") is BuildMode.EXPLICIT
