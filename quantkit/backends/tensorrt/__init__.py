"""TensorRT backend (TensorRT 10.x and 11.x).

Importing this package does not import TensorRT (nor torch): TensorRT is imported inside the
functions that need it, and a missing installation raises one
``MissingDependencyError("tensorrt", "tensorrt")`` naming ``pip install 'quantkit[tensorrt]'``.

* implicit quantization (TensorRT 10): ``EntropyCalibrator`` / ``MinMaxCalibrator`` fed by a
  :class:`DeviceBatchFeeder`, builder flags and per-layer precisions from a PrecisionPlan;
* explicit quantization (TensorRT 10 and 11): a Q/DQ / FP16 ONNX as a strongly typed network;
* runtime: :class:`TensorRTRunner` (``execute_async_v3`` on a CUDA stream, CUDA-event timing).
"""

from __future__ import annotations

from quantkit.backends.tensorrt._trt import (
    require_tensorrt,
    require_tensorrt_gpu,
    tensorrt_available,
)
from quantkit.backends.tensorrt.backend import TensorRTBackend, wanted_precisions
from quantkit.backends.tensorrt.buffers import DeviceBatchFeeder
from quantkit.backends.tensorrt.calibrator import (
    CalibrationSession,
    CalibrationSource,
    calibrator_class,
    make_calibrator,
)
from quantkit.backends.tensorrt.options import (
    CalibratorKind,
    Constraints,
    ShapeRange,
    TensorRTBuildOptions,
)
from quantkit.backends.tensorrt.runner import TensorRTRunner
from quantkit.backends.tensorrt.version import BuildMode, QuantPath, TrtVersion, select_path

__all__ = [
    "BuildMode",
    "CalibrationSession",
    "CalibrationSource",
    "CalibratorKind",
    "Constraints",
    "DeviceBatchFeeder",
    "QuantPath",
    "ShapeRange",
    "TensorRTBackend",
    "TensorRTBuildOptions",
    "TensorRTRunner",
    "TrtVersion",
    "calibrator_class",
    "make_calibrator",
    "require_tensorrt",
    "require_tensorrt_gpu",
    "select_path",
    "tensorrt_available",
    "wanted_precisions",
]
