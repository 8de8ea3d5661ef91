"""TensorRT INT8 calibration cache I/O, and conversion to and from CalibrationTable.

The format TensorRT's calibrators write and read (``writeCalibrationCache`` /
``readCalibrationCache``)::

    TRT-100300-EntropyCalibration2
    input_ids: 3c008912
    /model/layers.0/mlp/act_fn/Mul_output_0: 3d8b4e7c
    (Unnamed Layer* 8) [Constant]_output: 39137939

The header carries TensorRT's version number and the calibrator's algorithm; TensorRT ignores a
cache whose header differs from what the running version and calibrator would write, and
recalibrates. The version number is ``NV_TENSORRT_VERSION``: ``major*10000 + minor*100 + patch``
from TensorRT 10 on (10.3.0 -> ``100300``), ``major*1000 + minor*100 + patch`` before (8.6.1 ->
``8601``). Each further line is ``<tensor name>: <hex>``, the hex being the IEEE-754 bit pattern
of the float32 *scale* (amax / 127) written big-endian: ``3c008912`` is 0.0078452 (amax 0.99634).
Names may contain spaces, brackets and colons, so a line is split on its last ``": "``.
"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from quantkit.artifacts import atomic_write_bytes
from quantkit.calib.table import INT8_MAX, CalibrationTable
from quantkit.errors import QuantkitError

ENTROPY2 = "EntropyCalibration2"
MINMAX = "MinMaxCalibration"
ALGORITHMS = (ENTROPY2, MINMAX, "EntropyCalibration", "LegacyCalibration")
# quantkit method -> the calibrator whose cache TensorRT should accept. Every histogram method
# other than minmax is read through IInt8EntropyCalibrator2 (the scales are used as given).
_ALGORITHM_FOR_METHOD = {"minmax": MINMAX}
_METHOD_FOR_ALGORITHM = {ENTROPY2: "entropy", MINMAX: "minmax",
                         "EntropyCalibration": "entropy-legacy", "LegacyCalibration": "legacy"}
_HEADER = re.compile(r"^TRT-(\d+)-([A-Za-z0-9]+)$")
_HEX = re.compile(r"^[0-9a-fA-F]{1,8}$")
# Tensors TensorRT makes up itself (constants, reformats): never in the ONNX graph.
_TRT_INTERNAL = re.compile(r"^\(Unnamed Layer\* \d+\)")


def trt_version_number(version: str | tuple[int, ...]) -> int:
    """``"10.13.0.35"`` -> 101300, ``"8.6.1"`` -> 8601: the number in the cache header."""
    if isinstance(version, str):
        try:
            parts = tuple(int(p) for p in version.split(".")[:3])
        except ValueError:
            raise QuantkitError(f"not a TensorRT version: {version!r}") from None
    else:
        parts = tuple(int(p) for p in version[:3])
    major, minor, patch = (parts + (0, 0, 0))[:3]
    if major >= 10:
        return major * 10000 + minor * 100 + patch
    return major * 1000 + minor * 100 + patch


def trt_version_string(number: int) -> str:
    """The inverse of :func:`trt_version_number`, for messages: 100300 -> ``"10.3.0"``."""
    if number >= 100000:
        return f"{number // 10000}.{number // 100 % 100}.{number % 100}"
    return f"{number // 1000}.{number // 100 % 10}.{number % 100}"


def scale_to_hex(scale: float) -> str:
    return struct.pack(">f", scale).hex()


def hex_to_scale(text: str) -> float:
    value: float = struct.unpack(">f", int(text, 16).to_bytes(4, "big"))[0]
    return value


@dataclass
class TrtCache:
    """A parsed calibration cache: header fields and float32 scales by tensor name (in order)."""

    version: int
    algorithm: str = ENTROPY2
    scales: dict[str, float] = field(default_factory=dict)

    @classmethod
    def parse(cls, data: bytes, source: str = "calibration cache") -> TrtCache:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise QuantkitError(f"{source} is not a TensorRT calibration cache (not text)"
                                ) from None
        lines = [line.rstrip("\r") for line in text.split("\n")]
        while lines and not lines[-1].strip():
            lines.pop()
        if not lines:
            raise QuantkitError(f"{source} is empty")
        match = _HEADER.match(lines[0].strip())
        if not match:
            raise QuantkitError(
                f"{source} is not a TensorRT calibration cache: first line is {lines[0][:60]!r}",
                "expected a header like TRT-100300-EntropyCalibration2",
            )
        version, algorithm = int(match.group(1)), match.group(2)
        scales: dict[str, float] = {}
        for lineno, line in enumerate(lines[1:], 2):
            if not line.strip():
                continue
            name, sep, value = line.rpartition(": ")
            value = value.strip()
            if not sep or not name or not _HEX.match(value):
                raise QuantkitError(f"{source}:{lineno}: expected '<tensor>: <hex scale>', "
                                    f"got {line[:80]!r}")
            if name in scales:
                raise QuantkitError(f"{source}:{lineno}: tensor {name!r} appears twice")
            scale = hex_to_scale(value)
            if not (math.isfinite(scale) and scale >= 0):
                raise QuantkitError(f"{source}:{lineno}: scale of {name!r} is {scale}")
            scales[name] = scale
        return cls(version, algorithm, scales)

    def to_bytes(self) -> bytes:
        if not _HEADER.match(f"TRT-{self.version}-{self.algorithm}"):
            raise QuantkitError(f"cannot write a cache header for version {self.version!r}, "
                                f"algorithm {self.algorithm!r}")
        lines = [f"TRT-{self.version}-{self.algorithm}"]
        for name, scale in self.scales.items():
            if "\n" in name:
                raise QuantkitError(f"tensor name {name!r} cannot be written to a TensorRT cache")
            lines.append(f"{name}: {scale_to_hex(scale)}")
        return ("\n".join(lines) + "\n").encode("utf-8")

    @property
    def header(self) -> str:
        return f"TRT-{self.version}-{self.algorithm}"

    def with_version(self, trt_version: int | str) -> TrtCache:
        """The same scales under another TensorRT version's header (after a deliberate
        ``allow_version_mismatch``: TensorRT ignores a cache whose header is not its own)."""
        version = trt_version if isinstance(trt_version, int) else trt_version_number(trt_version)
        return TrtCache(version, self.algorithm, dict(self.scales))

    @classmethod
    def read(cls, path: Path) -> TrtCache:
        path = Path(path)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise QuantkitError(f"calibration cache {path} does not exist") from None
        return cls.parse(data, source=str(path))

    def write(self, path: Path) -> None:
        atomic_write_bytes(Path(path), self.to_bytes())


def algorithm_for_method(method: str) -> str:
    """The TensorRT calibrator a table computed by ``method`` is handed to."""
    return _ALGORITHM_FOR_METHOD.get(method, ENTROPY2)


def table_to_trt_cache(table: CalibrationTable, trt_version: int | str,
                       algorithm: str | None = None) -> TrtCache:
    """Scales ``float32(amax / 127)`` in a cache for ``trt_version`` (number or "10.3.0")."""
    version = trt_version if isinstance(trt_version, int) else trt_version_number(trt_version)
    algorithm = algorithm or algorithm_for_method(table.method)
    if algorithm not in ALGORITHMS:
        raise QuantkitError(f"unknown TensorRT calibration algorithm {algorithm!r}",
                            f"one of: {', '.join(ALGORITHMS)}")
    scales = {name: float(np.float32(amax / INT8_MAX)) for name, amax in table.amax.items()}
    return TrtCache(version, algorithm, scales)


def table_from_trt_cache(cache: TrtCache, *, model_hash: str | None = None,
                         data: dict[str, Any] | None = None) -> CalibrationTable:
    """amax = scale * 127 (exact in float64, so converting back gives the same bits)."""
    amax: dict[str, float] = {}
    skipped: dict[str, str] = {}
    for name, scale in cache.scales.items():
        if scale > 0:
            amax[name] = scale * INT8_MAX
        else:
            skipped[name] = "scale 0 in the TensorRT calibration cache"
    return CalibrationTable(
        method=_METHOD_FOR_ALGORITHM.get(cache.algorithm, cache.algorithm),
        params={"source": "tensorrt-calibration-cache", "trt_version": cache.version,
                "trt_algorithm": cache.algorithm},
        amax=amax, model_hash=model_hash, data=dict(data or {}), skipped=skipped,
    )


def check_trt_cache(
    cache: TrtCache,
    *,
    algorithm: str | None = None,
    trt_version: int | str | None = None,
    allow_version_mismatch: bool = False,
    tensor_names: Iterable[str] | None = None,
    allow_unknown_tensors: bool = False,
    source: str = "calibration cache",
) -> None:
    """Raise a QuantkitError if the cache does not fit the calibrator, version or model.

    * ``algorithm``: the calibrator that will read it (``EntropyCalibration2``, ...);
    * ``trt_version``: the running TensorRT; a different version is an error unless
      ``allow_version_mismatch`` (the scales do not depend on the version, but TensorRT itself
      refuses such a cache, so the header is rewritten when it is handed over);
    * ``tensor_names``: the model's tensors; cache entries for other tensors (TensorRT's own
      ``(Unnamed Layer* N)`` tensors excepted) mean a cache of another model.
    """
    if algorithm is not None and cache.algorithm != algorithm:
        raise QuantkitError(
            f"{source} was written by TensorRT's {cache.algorithm}, not {algorithm}",
            "recalibrate, or choose the calibrator/method that wrote it",
        )
    if trt_version is not None:
        want = trt_version if isinstance(trt_version, int) else trt_version_number(trt_version)
        if cache.version != want and not allow_version_mismatch:
            raise QuantkitError(
                f"{source} is from TensorRT {trt_version_string(cache.version)} "
                f"(TRT-{cache.version}), this is TensorRT {trt_version_string(want)}",
                "pass allow_version_mismatch / --allow-version-mismatch to use its scales anyway",
            )
    if tensor_names is not None:
        known = set(tensor_names)
        named = [n for n in cache.scales if not _TRT_INTERNAL.match(n)]
        unknown = [n for n in named if n not in known]
        if named and len(unknown) == len(named):
            raise QuantkitError(
                f"{source} is for another model: none of its {len(named)} tensors is in this "
                f"model (first: {unknown[0]!r})", "recalibrate for this model")
        if unknown and not allow_unknown_tensors:
            shown = ", ".join(repr(n) for n in unknown[:5])
            more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
            raise QuantkitError(
                f"{source} has {len(unknown)} tensor(s) this model does not have: {shown}{more}",
                "it was computed for another export of the model; recalibrate",
            )
