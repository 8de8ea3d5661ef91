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

pytest_plugins = ("tests.fixtures_build",)

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


# -- INT8 sources, checked before TensorRT is needed ----------------------------------------------

class Blocks(list):
    """Token blocks as the backend sees them: batches plus num_samples / seq_len / batch_size."""

    def __init__(self, num_samples: int, batch_size: int, seq_len: int = 16) -> None:
        import numpy as np

        ids = np.zeros((num_samples, seq_len), dtype=np.int64)
        super().__init__({"input_ids": ids[i:i + batch_size]}
                         for i in range(0, num_samples, batch_size))
        self.num_samples, self.batch_size, self.seq_len = num_samples, batch_size, seq_len


def test_zero_calibration_batches_are_refused_before_building(onnx_file, tmp_path):
    backend = TensorRTBackend(calibration_data=Blocks(num_samples=3, batch_size=3))
    with pytest.raises(QuantkitError, match="would receive zero batches: 3 token block\\(s\\), "
                                            "fewer than one calibration batch of 4"):
        backend.build(request(onnx_file, calibration_shape=[4, 16]), tmp_path / "engine")
    assert not (tmp_path / "engine").exists()


def test_int8_without_any_scales(onnx_file, tmp_path):
    with pytest.raises(QuantkitError, match="an INT8 TensorRT build needs scales"):
        TensorRTBackend().build(request(onnx_file), tmp_path / "engine")


def test_explicit_path_does_not_take_calibration_data(onnx_file, tmp_path):
    backend = TensorRTBackend(calibration_data=Blocks(num_samples=8, batch_size=4))
    with pytest.raises(QuantkitError, match="takes its scales from a calibration table"):
        backend.build(request(onnx_file, mode="explicit"), tmp_path / "engine")


def test_check_int8_sources_accepts_what_makes_a_batch():
    from quantkit.backends.tensorrt.backend import check_int8_sources
    from quantkit.build import CalibrationData

    options = TensorRTBuildOptions()
    check_int8_sources(options, table_given=False,
                       data=CalibrationData("sample", num_samples=8, seq_len=16, batch_size=8))
    check_int8_sources(options, table_given=True, data=None)
    check_int8_sources(TensorRTBuildOptions(qdq_onnx="x.onnx"), table_given=False, data=None)
    with pytest.raises(QuantkitError, match="zero batches: 7 token block"):
        check_int8_sources(options, table_given=False,
                           data=CalibrationData("sample", num_samples=7, seq_len=16,
                                                batch_size=8))


# -- the explicit path's Q/DQ ONNX, written from the plan when none is given ----------------------

def test_explicit_path_writes_the_plans_qdq_onnx(tiny_llama_export, llama_table, tmp_path):
    import onnx
    from onnx import numpy_helper

    from quantkit.backends.tensorrt.backend import write_qdq_onnx
    from quantkit.backends.tensorrt.version import TrtVersion
    from quantkit.build import plan_for

    plan = plan_for(tiny_llama_export.onnx_path, "int8", None)
    req = request(tiny_llama_export.onnx_path, "int8", plan, llama_table)
    summary = write_qdq_onnx(req, tmp_path / "model.qdq.onnx", TrtVersion(11, 0))
    model = onnx.load(str(tmp_path / "model.qdq.onnx"))
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    names = {n.name for n in model.graph.node}
    # dedicated pairs: every planned MatMul keeps its name, so the inspector maps back to the plan
    assert set(plan.nodes_with(Precision.INT8)) <= names
    # TensorRT reads symmetric int8 weights whatever CPU built the ONNX (no ISA-specific layout)
    assert summary["options"] == {"per_channel": True, "shared_inputs": "dedicated",
                                  "weight_layout": "s8", "fp16": "native"}
    inits = {t.name: t for t in model.graph.initializer}
    weight_dqs = [n for n in model.graph.node
                  if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert weight_dqs and all(inits[n.input[0]].data_type == onnx.TensorProto.INT8 and
                              not numpy_helper.to_array(inits[n.input[2]]).any()
                              for n in weight_dqs)
    assert summary["qdq_pairs"] > 0 and summary["file"] == "model.qdq.onnx"

    fp16 = plan_for(tiny_llama_export.onnx_path, "fp16", None)
    write_qdq_onnx(request(tiny_llama_export.onnx_path, "fp16", fp16, None),
                   tmp_path / "fp16.onnx", TrtVersion(11, 0))
    half = onnx.load(str(tmp_path / "fp16.onnx"))
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in half.graph.initializer)


def test_explicit_int8_without_a_table_says_why(tiny_llama_export, tmp_path):
    from quantkit.backends.tensorrt.backend import write_qdq_onnx
    from quantkit.backends.tensorrt.version import TrtVersion
    from quantkit.build import plan_for

    plan = plan_for(tiny_llama_export.onnx_path, "int8", None)
    with pytest.raises(QuantkitError, match="TensorRT 11 has no INT8 calibrator: an explicit "
                                            "INT8 build takes its scales from a calibration"):
        write_qdq_onnx(request(tiny_llama_export.onnx_path, "int8", plan, None),
                       tmp_path / "q.onnx", TrtVersion(11, 0))
    assert not (tmp_path / "q.onnx").exists()


def test_explicit_int8_refuses_a_table_of_another_model(tiny_llama_export, llama_table, tmp_path):
    from dataclasses import replace

    from quantkit.backends.tensorrt.backend import write_qdq_onnx
    from quantkit.backends.tensorrt.version import TrtVersion
    from quantkit.build import plan_for

    plan = plan_for(tiny_llama_export.onnx_path, "int8", None)
    other = replace(llama_table, model_hash="0" * 64)
    with pytest.raises(QuantkitError, match="made for another model"):
        write_qdq_onnx(request(tiny_llama_export.onnx_path, "int8", plan, other),
                       tmp_path / "q.onnx", TrtVersion(10, 13))
