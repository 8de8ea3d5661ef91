"""The backend's decisions before TensorRT is touched, and the one error where it is missing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from quantkit.backends import get_backend
from quantkit.backends.base import BuildRequest, Engine
from quantkit.backends.tensorrt import TensorRTBackend, TensorRTRunner
from quantkit.backends.tensorrt._trt import tensorrt_available
from quantkit.backends.tensorrt.backend import (
    calibration_shape,
    choose_calibrator,
    wanted_precisions,
)
from quantkit.backends.tensorrt.options import CalibratorKind, TensorRTBuildOptions
from quantkit.backends.tensorrt.runner import check_profile_fit
from quantkit.calib.table import CalibrationTable
from quantkit.errors import MissingDependencyError, QuantkitError
from quantkit.plan import Precision, PrecisionPlan

no_tensorrt = pytest.mark.skipif(
    tensorrt_available(), reason="checks the error where TensorRT is not installed"
)


@pytest.fixture
def onnx_file(tmp_path) -> Path:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["input_ids"], ["logits"], name="/Identity")], "g",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.INT64, ["batch", "seq"])])
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph), str(path))
    return path


def request(onnx_path: Path, precision: str = "int8", plan=None, table=None, **options):
    return BuildRequest(onnx_path=onnx_path, precision=precision, plan=plan, table=table,
                        options=options)


# -- decisions ------------------------------------------------------------------------------------

def test_wanted_precisions():
    plan = PrecisionPlan.uniform([("/a/MatMul", "MatMul")], Precision.INT8)
    assert wanted_precisions("fp16", plan) == {Precision.INT8}
    assert wanted_precisions("fp16", None) == {Precision.FP16}
    assert wanted_precisions("fp32", None) == {Precision.FP32}
    with pytest.raises(QuantkitError, match="'mixed' engine needs a precision plan"):
        wanted_precisions("mixed", None)
    with pytest.raises(QuantkitError, match="unknown precision 'int4'"):
        wanted_precisions("int4", None)


@pytest.mark.parametrize(
    ("option", "table_algorithm", "expected"),
    [
        (None, None, CalibratorKind.ENTROPY),
        ("minmax", None, CalibratorKind.MINMAX),
        (None, "MinMaxCalibration", CalibratorKind.MINMAX),
        (None, "EntropyCalibration2", CalibratorKind.ENTROPY),
        ("entropy", "EntropyCalibration2", CalibratorKind.ENTROPY),
    ],
)
def test_choose_calibrator(option, table_algorithm, expected):
    options = TensorRTBuildOptions(calibrator=option)
    assert choose_calibrator(options, table_algorithm) is expected


def test_calibrator_option_must_match_the_table():
    with pytest.raises(QuantkitError, match="goes to TensorRT as a MinMaxCalibration cache"):
        choose_calibrator(TensorRTBuildOptions(calibrator="entropy"), "MinMaxCalibration")


def test_calibration_shape_sources():
    class Blocks(list):
        batch_size, seq_len = 8, 512

    assert calibration_shape(TensorRTBuildOptions(calibration_shape=(2, 128)), Blocks()) == (2, 128)
    assert calibration_shape(TensorRTBuildOptions(), Blocks()) == (8, 512)
    options = TensorRTBuildOptions(profiles=({"min": [1, 1], "opt": [4, 256], "max": [8, 512]},))
    assert calibration_shape(options, None) == (4, 256)


def test_profile_fit():
    profiles = [[[1, 1], [1, 512], [8, 512]]]
    check_profile_fit("input_ids", (8, 512), profiles, 0)
    with pytest.raises(QuantkitError, match="outside the engine's profile 0: min \\[1, 1\\], max "
                                            "\\[8, 512\\]"):
        check_profile_fit("input_ids", (1, 1024), profiles, 0)
    with pytest.raises(QuantkitError, match="has 1 profile\\(s\\), not 2"):
        check_profile_fit("input_ids", (1, 8), profiles, 1)


# -- request checks (before anything is written; no TensorRT needed) ------------------------------

def test_missing_qdq_onnx(onnx_file, tmp_path):
    with pytest.raises(QuantkitError, match="qdq_onnx .*nope.onnx does not exist"):
        TensorRTBackend().build(request(onnx_file, qdq_onnx=str(tmp_path / "nope.onnx")),
                                tmp_path / "engine")
    assert not (tmp_path / "engine").exists()


def test_table_and_cache_together(onnx_file, tmp_path):
    cache = tmp_path / "c.cache"
    cache.write_bytes(b"TRT-101300-EntropyCalibration2\n")
    with pytest.raises(QuantkitError, match="both a calibration table and a calibration cache"):
        TensorRTBackend().build(
            request(onnx_file, table=CalibrationTable("entropy"), calibration_cache=str(cache)),
            tmp_path / "engine",
        )


def test_qdq_onnx_with_the_calibrator(onnx_file, tmp_path):
    with pytest.raises(QuantkitError, match="builds on the explicit path"):
        TensorRTBackend().build(request(onnx_file, mode="implicit", qdq_onnx=str(onnx_file)),
                                tmp_path / "engine")


def test_unknown_option_is_refused_before_building(onnx_file, tmp_path):
    with pytest.raises(QuantkitError, match="unknown TensorRT option\\(s\\): fp16_mode"):
        TensorRTBackend().build(request(onnx_file, fp16_mode=True), tmp_path / "engine")


# -- TensorRT missing: one clear error ------------------------------------------------------------

def test_importing_the_backend_imports_neither_tensorrt_nor_torch():
    code = (
        "import sys\n"
        "import quantkit.backends.tensorrt as t\n"
        "from quantkit.backends import get_backend\n"
        "b = get_backend('tensorrt')\n"
        "assert type(b).__name__ == 'TensorRTBackend', b\n"
        "print(sorted(m for m in ('tensorrt', 'torch', 'onnxruntime') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[3], check=True)
    assert out.stdout.strip() == "[]"


@no_tensorrt
def test_build_without_tensorrt(onnx_file, tmp_path):
    backend = get_backend("tensorrt")
    with pytest.raises(MissingDependencyError) as info:
        backend.build(request(onnx_file, precision="fp16"), tmp_path / "engine")
    assert str(info.value) == ("tensorrt is not installed (install it with: "
                               "pip install 'quantkit[tensorrt]')")
    assert not (tmp_path / "engine").exists()
    assert not list(tmp_path.glob(".engine.*"))  # no half-written engine left behind


@no_tensorrt
def test_runner_without_tensorrt(tmp_path):
    engine = Engine(tmp_path, {"kind": "engine", "backend": "tensorrt", "precision": "fp16",
                               "tensorrt": {"version": "10.13.0.35", "io": [
                                   {"name": "input_ids", "mode": "input", "dtype": "INT64",
                                    "shape": [-1, -1], "profiles": [[[1, 1], [1, 8], [2, 8]]]},
                                   {"name": "logits", "mode": "output", "dtype": "FLOAT",
                                    "shape": [-1, -1, 512]}]}})
    runner = engine.runner()
    assert isinstance(runner, TensorRTRunner)
    assert runner.input_names == ["input_ids"] and runner.output_names == ["logits"]
    with pytest.raises(MissingDependencyError, match="quantkit\\[tensorrt\\]"), runner:
        pass
    assert not runner.is_active


def test_runner_needs_a_tensorrt_manifest(tmp_path):
    engine = Engine(tmp_path, {"kind": "engine", "backend": "tensorrt", "precision": "fp16"})
    with pytest.raises(QuantkitError, match="no TensorRT I/O description"):
        TensorRTRunner(engine)
