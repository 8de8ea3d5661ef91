"""TensorRT version detection and the choice between implicit and explicit quantization.

Pure functions over a version string, so every rule here is unit-tested without TensorRT:

* TensorRT 10.x supports both paths: *implicit* (an ``IInt8Calibrator`` subclass, ``INT8``/``FP16``
  builder flags, per-layer precision constraints) and *explicit* (a Q/DQ / FP16 ONNX parsed into a
  strongly typed network).
* TensorRT 11.x removed ``IInt8Calibrator``, ``IBuilderConfig.int8_calibrator``, the precision
  builder flags and the precision-constraint flags: explicit is the only path.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from quantkit.errors import QuantkitError

SUPPORTED_MAJORS = (10, 11)


class QuantPath(str, enum.Enum):
    IMPLICIT = "implicit"  # TensorRT 10 calibrator + builder flags + layer precisions
    EXPLICIT = "explicit"  # strongly typed network from a Q/DQ (and FP16-cast) ONNX


class BuildMode(str, enum.Enum):
    AUTO = "auto"
    IMPLICIT = "implicit"
    EXPLICIT = "explicit"

    @classmethod
    def parse(cls, value: str | BuildMode) -> BuildMode:
        if isinstance(value, BuildMode):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            choices = ", ".join(m.value for m in cls)
            raise QuantkitError(
                f"unknown TensorRT build mode '{value}'", f"use one of: {choices}"
            ) from None


@dataclass(frozen=True, order=True)
class TrtVersion:
    major: int
    minor: int
    patch: int = 0
    build: int = 0

    @classmethod
    def parse(cls, text: str) -> TrtVersion:
        """``"10.13.0.35"``, ``"11.0.0"``, ``"10.8.0.43+cuda12"`` -> TrtVersion."""
        match = re.match(r"^\s*(\d+)\.(\d+)(?:\.(\d+))?(?:\.(\d+))?", str(text))
        if not match:
            raise QuantkitError(f"cannot read a TensorRT version from '{text}'")
        parts = [int(p) if p is not None else 0 for p in match.groups()]
        return cls(*parts)

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}.{self.build}"

    @property
    def has_implicit_quantization(self) -> bool:
        """IInt8Calibrator, the INT8/FP16 flags and precision constraints exist (TensorRT 10)."""
        return self.major < 11


def check_supported(version: TrtVersion) -> None:
    """Refuse TensorRT versions whose Python API this backend is not written against."""
    if version.major < SUPPORTED_MAJORS[0]:
        raise QuantkitError(
            f"TensorRT {version} is too old: quantkit uses the TensorRT 10 API "
            "(build_serialized_network, named I/O tensors, execute_async_v3)",
            "install TensorRT 10.x or 11.x: pip install 'quantkit[tensorrt]'",
        )
    if version.major > SUPPORTED_MAJORS[-1]:
        raise QuantkitError(
            f"TensorRT {version} is newer than the versions quantkit supports (10.x and 11.x)",
            "install TensorRT 10.x or 11.x: pip install 'quantkit[tensorrt]'",
        )


def implicit_unavailable_error(version: TrtVersion) -> QuantkitError:
    return QuantkitError(
        f"TensorRT {version.major} has no INT8 calibrator: TensorRT 11 removed IInt8Calibrator, "
        "IBuilderConfig.int8_calibrator and the INT8/FP16 builder flags (implicit quantization)",
        "use explicit quantization: build the Q/DQ ONNX of the plan (quantkit writes the "
        "calibrated scales into QuantizeLinear/DequantizeLinear nodes) with mode 'explicit'; "
        "a TensorRT 10 calibration cache converts to a CalibrationTable for that",
    )


def select_path(version: TrtVersion, mode: BuildMode | str, *, has_qdq_onnx: bool) -> QuantPath:
    """Which quantization path a build takes.

    ``auto`` takes the explicit path whenever a Q/DQ ONNX is given and always on TensorRT 11;
    otherwise (TensorRT 10, plain FP32 ONNX) the implicit calibrator path.
    """
    check_supported(version)
    mode = BuildMode.parse(mode)
    if mode is BuildMode.IMPLICIT:
        if not version.has_implicit_quantization:
            raise implicit_unavailable_error(version)
        return QuantPath.IMPLICIT
    if mode is BuildMode.EXPLICIT:
        return QuantPath.EXPLICIT
    if has_qdq_onnx or not version.has_implicit_quantization:
        return QuantPath.EXPLICIT
    return QuantPath.IMPLICIT
