"""Build options of the TensorRT backend: a frozen dataclass that round-trips through a dict
(``BuildRequest.options`` and the engine manifest), and the optimization-profile shapes it implies.

quantkit's engines take ``[batch, seq]`` token inputs (``input_ids``, ``attention_mask``), so an
optimization profile is a min/opt/max of (batch, seq), applied to every dynamic input. A KV-cache
export (``quantkit export --with-cache``) also takes the past: ``past_key_values.<i>.key|value``
``[batch, kv_heads, past, head_dim]``, and its attention mask covers ``past + seq`` positions, so
its profiles add a min/opt/max of the past length. By default such a graph gets two profiles, the
shapes generation runs: a prefill (a prompt of up to 512 tokens, empty past) and a decode step
(one new token against a past of 1 up to the model's positions, at most 2,047), batch 1 to 8;
the runner switches to the profile that fits each run's shapes.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from quantkit.backends.tensorrt.version import BuildMode
from quantkit.errors import QuantkitError

Shape2 = tuple[int, int]  # (batch, seq)
Past3 = tuple[int, int, int]  # (min, opt, max) past tokens of a KV-cache profile
MASK_INPUT = "attention_mask"  # in a cache graph: [batch, past + seq]
PAST_PREFIX = "past_key_values."  # [batch, kv_heads, past, head_dim]
DEFAULT_DECODE_PAST = 2047  # the longest past a default decode profile covers


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


def _past3(value: Any) -> Past3:
    try:
        low, opt, high = (int(v) for v in value)
    except (TypeError, ValueError):
        raise QuantkitError(f"a profile's past must be [min, opt, max] tokens, got {value!r}",
                            "e.g. past: [1, 512, 2047]") from None
    if not 0 <= low <= opt <= high:
        raise QuantkitError(f"a profile's past must satisfy 0 <= min <= opt <= max, got "
                            f"{low} / {opt} / {high}")
    return (low, opt, high)


@dataclass(frozen=True)
class ShapeRange:
    """One optimization profile: min <= opt <= max, each (batch, seq); for a KV-cache graph also
    the past length's (min, opt, max) (``seq`` is then the new tokens of a run)."""

    min: Shape2
    opt: Shape2
    max: Shape2
    past: Past3 | None = None

    def __post_init__(self) -> None:
        for name in ("min", "opt", "max"):
            object.__setattr__(self, name, _shape2(getattr(self, name), f"profile '{name}'"))
        for i, axis in enumerate(("batch", "seq")):
            if not self.min[i] <= self.opt[i] <= self.max[i]:
                raise QuantkitError(
                    f"profile {axis} must satisfy min <= opt <= max, got "
                    f"{self.min[i]} / {self.opt[i]} / {self.max[i]}"
                )
        if self.past is not None:
            object.__setattr__(self, "past", _past3(self.past))

    @classmethod
    def fixed(cls, shape: Shape2) -> ShapeRange:
        return cls(shape, shape, shape)

    def contains(self, shape: Shape2) -> bool:
        return all(self.min[i] <= shape[i] <= self.max[i] for i in range(2))

    def to_dict(self) -> dict[str, list[int]]:
        out = {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}
        if self.past is not None:
            out["past"] = list(self.past)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | ShapeRange) -> ShapeRange:
        if isinstance(data, ShapeRange):
            return data
        if not isinstance(data, Mapping) or not (
                {"min", "opt", "max"} <= set(data) <= {"min", "opt", "max", "past"}):
            raise QuantkitError(
                f"a profile is {{min: [batch, seq], opt: [batch, seq], max: [batch, seq]}} "
                f"(and past: [min, opt, max] for a KV-cache graph), got {data!r}"
            )
        return cls(data["min"], data["opt"], data["max"], data.get("past"))


DEFAULT_PROFILE = ShapeRange((1, 1), (1, 512), (8, 512))


def default_cache_profiles(max_positions: int | None) -> tuple[ShapeRange, ShapeRange]:
    """Prefill (up to 512 prompt tokens, empty past) and decode (one token, past 1 up to the
    model's positions less one, at most ``DEFAULT_DECODE_PAST``), batch 1 to 8."""
    prompt = min(512, max_positions) if max_positions else 512
    longest = min(DEFAULT_DECODE_PAST, max_positions - 1) if max_positions else (
        DEFAULT_DECODE_PAST)
    longest = max(longest, 1)
    return (ShapeRange((1, 1), (1, prompt), (8, prompt), past=(0, 0, 0)),
            ShapeRange((1, 1), (1, 1), (8, 1), past=(1, min(512, longest), longest)))


def resolve_cache_profiles(options: TensorRTBuildOptions, cache: bool,
                           max_positions: int | None) -> TensorRTBuildOptions:
    """``options`` with the profiles a graph of this kind needs: a KV-cache graph left at the
    default profile gets ``default_cache_profiles``, a plain graph the default cut to the model's
    positions; a cache graph's profile without a past, a plain graph's profile with one, or a
    given profile past the model's positions is refused."""
    from dataclasses import replace

    profiles = options.profiles
    if cache and profiles == (DEFAULT_PROFILE,):
        return replace(options, profiles=default_cache_profiles(max_positions))
    if profiles == (DEFAULT_PROFILE,):  # the default, within a short model's positions
        seq = min(DEFAULT_PROFILE.max[1], max_positions or DEFAULT_PROFILE.max[1])
        return replace(options, profiles=(ShapeRange((1, 1), (1, seq), (8, seq)),))
    for p in profiles:
        if cache and p.past is None:
            raise QuantkitError(
                f"the profile {p.to_dict()} has no past length, and this is a KV-cache graph",
                "give every profile past MIN:OPT:MAX tokens (e.g. --profile "
                "1x1:1x1:8x1,past=1:512:2047), or leave --profile out for the prefill and "
                "decode defaults")
        if not cache and p.past is not None:
            raise QuantkitError(
                f"the profile {p.to_dict()} has a past length, and this graph has no KV cache",
                "past= is for a 'quantkit export --with-cache' graph; drop it here")
        longest = p.max[1] + (p.past[2] if p.past else 0)
        if max_positions and longest > max_positions:
            raise QuantkitError(
                f"the profile {p.to_dict()} reaches {longest} positions; the model has "
                f"{max_positions}", "lower the profile's max seq (and past)")
    return options


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

    Token inputs are ``[batch, seq]``; with a past length (a KV-cache graph), the attention mask
    is ``[batch, past + seq]`` and every ``past_key_values.*`` input ``[batch, kv_heads, past,
    head_dim]`` with static heads and head size. A static dimension must equal what the profile
    asks for at min, opt and max (a model exported with a fixed batch of 1 cannot take a profile
    up to 8).
    """
    out: ProfileShapes = {}
    problems: list[str] = []
    past = shape_range.past
    for spec in inputs:
        is_past = spec.name.startswith(PAST_PREFIX)
        if is_past and past is None:
            problems.append(f"input '{spec.name}' is a KV-cache input and the profile has no "
                            "past length")
            continue
        if len(spec.shape) != (4 if is_past else 2):
            problems.append(
                f"input '{spec.name}' has shape {list(spec.shape)}; quantkit's TensorRT profiles "
                "cover [batch, seq] inputs (and [batch, heads, past, head_dim] cache inputs) only"
            )
            continue
        picks: list[tuple[int, ...]] = []
        for k, (which, wanted) in enumerate((("min", shape_range.min), ("opt", shape_range.opt),
                                             ("max", shape_range.max))):
            names: tuple[str, ...]
            if is_past:
                assert past is not None
                names = ("batch", "heads", "past", "head_dim")
                values: tuple[int, ...] = (wanted[0], spec.shape[1], past[k], spec.shape[3])
                for axis in (1, 3):
                    if spec.shape[axis] < 0:
                        problems.append(f"input '{spec.name}' has a dynamic {names[axis]}; a "
                                        "KV-cache input needs static heads and head size")
            else:
                names = ("batch", "seq")
                extra = past[k] if past is not None and spec.name == MASK_INPUT else 0
                values = (wanted[0], wanted[1] + extra)
            for axis, (declared, value) in enumerate(zip(spec.shape, values, strict=True)):
                if declared >= 0 and declared != value:
                    problems.append(
                        f"input '{spec.name}' has a static {names[axis]} of {declared}, the "
                        f"profile asks for {value} at {which}"
                    )
            picks.append(tuple(values))
        out[spec.name] = (picks[0], picks[1], picks[2])
    if problems:
        raise QuantkitError(
            "the optimization profile does not fit the model's inputs: "
            + "; ".join(dict.fromkeys(problems)),
            "set profiles within the model's static dimensions, or export with dynamic axes",
        )
    return out


def pick_profile(shapes: Mapping[str, Sequence[int]],
                 profiles: Mapping[str, Sequence[Sequence[Sequence[int]]]],
                 current: int = 0) -> int | None:
    """The optimization profile whose min..max covers every input shape of a run: ``current``
    if it does, else the first that does; None if none does. ``profiles[name][p]`` is input
    ``name``'s [min, opt, max] in profile p (as the engine reports it)."""
    count = min((len(p) for p in profiles.values()), default=0)

    def fits(p: int) -> bool:
        for name, shape in shapes.items():
            if name not in profiles:
                continue
            low, _, high = profiles[name][p]
            if len(low) != len(shape) or not all(
                    lo <= d <= hi for lo, d, hi in zip(low, shape, high, strict=True)):
                return False
        return True

    order = [current, *(p for p in range(count) if p != current)] if current < count else []
    return next((p for p in order if fits(p)), None)


def calibration_profile_shapes(inputs: Sequence[InputSpec], shape: Shape2) -> ProfileShapes:
    """The calibration profile: min = opt = max = the calibration shape (TensorRT calibrates at
    the profile's OPT dimensions and overwrites MIN and MAX with them); a KV-cache graph is
    calibrated on prefills, with an empty past."""
    cache = any(spec.name.startswith(PAST_PREFIX) for spec in inputs)
    return profile_shapes(inputs, ShapeRange(shape, shape, shape,
                                             past=(0, 0, 0) if cache else None))
