"""Build options of the TensorRT backend: a frozen dataclass that round-trips through a dict
(``BuildRequest.options`` and the engine manifest), and the optimization-profile shapes it implies.

quantkit's engines take ``[batch, seq]`` token inputs (``input_ids``, ``attention_mask``), so an
optimization profile is a min/opt/max of (batch, seq), applied to every dynamic input.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from quantkit.backends.tensorrt.version import BuildMode
from quantkit.errors import QuantkitError

Shape2 = tuple[int, int]  # (batch, seq)


class Constraints(str, enum.Enum):
    """How TensorRT treats per-layer precisions on the implicit path."""

    OBEY = "obey"  # BuilderFlag.OBEY_PRECISION_CONSTRAINTS: fail if a layer cannot run as asked
    PREFER = "prefer"  # BuilderFlag.PREFER_PRECISION_CONSTRAINTS: fall back with a warning

    @classmethod
    def parse(cls, value: str | Constraints) -> Constraints:
        if isinstance(value, Constraints):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            raise QuantkitError(
                f"unknown precision constraints '{value}'", "use 'obey' or 'prefer'"
            ) from None


class CalibratorKind(str, enum.Enum):
    ENTROPY = "entropy"  # trt.IInt8EntropyCalibrator2
    MINMAX = "minmax"  # trt.IInt8MinMaxCalibrator

    @classmethod
    def parse(cls, value: str | CalibratorKind) -> CalibratorKind:
        if isinstance(value, CalibratorKind):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            raise QuantkitError(
                f"TensorRT has no '{value}' calibrator",
                "use 'entropy' (IInt8EntropyCalibrator2) or 'minmax' (IInt8MinMaxCalibrator); "
                "for other methods build the Q/DQ ONNX and use mode 'explicit'",
            ) from None


def _shape2(value: Any, what: str) -> Shape2:
    try:
        batch, seq = (int(v) for v in value)
    except (TypeError, ValueError):
        raise QuantkitError(f"{what} must be [batch, seq], got {value!r}") from None
    if batch < 1 or seq < 1:
        raise QuantkitError(f"{what} must be positive, got [{batch}, {seq}]")
    return (batch, seq)


@dataclass(frozen=True)
class ShapeRange:
    """One optimization profile: min <= opt <= max, each (batch, seq)."""

    min: Shape2
    opt: Shape2
    max: Shape2

    def __post_init__(self) -> None:
        for name in ("min", "opt", "max"):
            object.__setattr__(self, name, _shape2(getattr(self, name), f"profile '{name}'"))
        for i, axis in enumerate(("batch", "seq")):
            if not self.min[i] <= self.opt[i] <= self.max[i]:
                raise QuantkitError(
                    f"profile {axis} must satisfy min <= opt <= max, got "
                    f"{self.min[i]} / {self.opt[i]} / {self.max[i]}"
                )

    @classmethod
    def fixed(cls, shape: Shape2) -> ShapeRange:
        return cls(shape, shape, shape)

    def contains(self, shape: Shape2) -> bool:
        return all(self.min[i] <= shape[i] <= self.max[i] for i in range(2))

    def to_dict(self) -> dict[str, list[int]]:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | ShapeRange) -> ShapeRange:
        if isinstance(data, ShapeRange):
            return data
        if not isinstance(data, Mapping) or set(data) != {"min", "opt", "max"}:
            raise QuantkitError(
                f"a profile is {{min: [batch, seq], opt: [batch, seq], max: [batch, seq]}}, "
                f"got {data!r}"
            )
        return cls(data["min"], data["opt"], data["max"])


DEFAULT_PROFILE = ShapeRange((1, 1), (1, 512), (8, 512))


@dataclass(frozen=True)
class TensorRTBuildOptions:
    """Everything the TensorRT backend reads from ``BuildRequest.options``."""

    mode: BuildMode = BuildMode.AUTO
    profiles: tuple[ShapeRange, ...] = (DEFAULT_PROFILE,)
    # (batch, seq) of the calibration profile and of every calibration batch; default: the
    # calibration data's own batch size and sequence length
    calibration_shape: Shape2 | None = None
    calibrator: CalibratorKind | None = None  # default: the table's method, else entropy
    constraints: Constraints = Constraints.OBEY
    timing_cache: str | None = None  # a file reused (read, extended, written back) across builds
    workspace_mib: int | None = None  # MemoryPoolType.WORKSPACE limit; None: TensorRT's default
    qdq_onnx: str | None = None  # the Q/DQ / FP16 ONNX of the plan, for the explicit path
    calibration_cache: str | None = None  # a TensorRT calibration cache file to reuse
    accept_cache_version_mismatch: bool = False
    tf32: bool = True  # TensorRT's default; False clears BuilderFlag.TF32 for strict FP32 layers
    optimization_level: int | None = None  # builder_optimization_level 0..5; None: default (3)

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", BuildMode.parse(self.mode))
        object.__setattr__(self, "constraints", Constraints.parse(self.constraints))
        if self.calibrator is not None:
            object.__setattr__(self, "calibrator", CalibratorKind.parse(self.calibrator))
        profiles = tuple(ShapeRange.from_dict(p) for p in self.profiles)
        if not profiles:
            raise QuantkitError("at least one optimization profile is needed")
        object.__setattr__(self, "profiles", profiles)
        if self.calibration_shape is not None:
            object.__setattr__(
                self, "calibration_shape", _shape2(self.calibration_shape, "calibration_shape")
            )
        if self.workspace_mib is not None and int(self.workspace_mib) < 1:
            raise QuantkitError(f"workspace_mib must be at least 1, got {self.workspace_mib}")
        if self.optimization_level is not None and not 0 <= int(self.optimization_level) <= 5:
            raise QuantkitError(
                f"optimization_level must be 0..5, got {self.optimization_level}"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode.value,
            "profiles": [p.to_dict() for p in self.profiles],
            "calibration_shape": list(self.calibration_shape) if self.calibration_shape else None,
            "calibrator": self.calibrator.value if self.calibrator else None,
            "constraints": self.constraints.value,
            "timing_cache": self.timing_cache,
            "workspace_mib": self.workspace_mib,
            "qdq_onnx": self.qdq_onnx,
            "calibration_cache": self.calibration_cache,
            "accept_cache_version_mismatch": self.accept_cache_version_mismatch,
            "tf32": self.tf32,
            "optimization_level": self.optimization_level,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> TensorRTBuildOptions:
        data = dict(data or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(k for k in data if k not in known)
        if unknown:
            raise QuantkitError(
                f"unknown TensorRT option(s): {', '.join(unknown)}",
                f"known options: {', '.join(sorted(known))}",
            )
        for key in ("timing_cache", "qdq_onnx", "calibration_cache"):
            if data.get(key) is not None:
                data[key] = str(data[key])
        for key in ("accept_cache_version_mismatch", "tf32"):
            if key in data and not isinstance(data[key], bool):
                raise QuantkitError(f"option {key} must be true or false, got {data[key]!r}")
        if data.get("profiles") is not None:
            if isinstance(data["profiles"], Mapping):
                data["profiles"] = [data["profiles"]]
            data["profiles"] = tuple(data["profiles"])
        else:
            data.pop("profiles", None)
        for key in ("workspace_mib", "optimization_level"):
            if data.get(key) is not None:
                data[key] = int(data[key])
        return cls(**data)


@dataclass(frozen=True)
class InputSpec:
    """A network input as the parsed network declares it; -1 marks a dynamic dimension."""

    name: str
    dtype: str  # TensorRT DataType name: INT64, INT32, FLOAT, ...
    shape: tuple[int, ...]

    @property
    def is_dynamic(self) -> bool:
        return any(d < 0 for d in self.shape)


ProfileShapes = dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]


def profile_shapes(inputs: Sequence[InputSpec], shape_range: ShapeRange) -> ProfileShapes:
    """min/opt/max shapes of every input for one profile.

    Every input must be ``[batch, seq]``; a static dimension must equal what the profile asks for
    at min, opt and max (a model exported with a fixed batch of 1 cannot take a profile up to 8).
    """
    out: ProfileShapes = {}
    problems: list[str] = []
    for spec in inputs:
        if len(spec.shape) != 2:
            problems.append(
                f"input '{spec.name}' has shape {list(spec.shape)}; quantkit's TensorRT profiles "
                "cover [batch, seq] inputs only"
            )
            continue
        picks: list[tuple[int, ...]] = []
        for which, wanted in (("min", shape_range.min), ("opt", shape_range.opt),
                              ("max", shape_range.max)):
            dims = []
            for axis, (declared, value) in enumerate(zip(spec.shape, wanted, strict=True)):
                if declared >= 0 and declared != value:
                    axis_name = ("batch", "seq")[axis]
                    problems.append(
                        f"input '{spec.name}' has a static {axis_name} of {declared}, the profile "
                        f"asks for {value} at {which}"
                    )
                dims.append(value)
            picks.append(tuple(dims))
        out[spec.name] = (picks[0], picks[1], picks[2])
    if problems:
        raise QuantkitError(
            "the optimization profile does not fit the model's inputs: " + "; ".join(problems),
            "set profiles within the model's static dimensions, or export with dynamic axes",
        )
    return out


def calibration_profile_shapes(inputs: Sequence[InputSpec], shape: Shape2) -> ProfileShapes:
    """The calibration profile: min = opt = max = the calibration shape (TensorRT calibrates at
    the profile's OPT dimensions and overwrites MIN and MAX with them)."""
    return profile_shapes(inputs, ShapeRange.fixed(shape))
