"""The TensorRT 10 INT8 calibrators: ``EntropyCalibrator`` (``trt.IInt8EntropyCalibrator2``) and
``MinMaxCalibrator`` (``trt.IInt8MinMaxCalibrator``).

Their base classes live in TensorRT, so the classes are made on first use (:func:`calibrator_class`
or the module attributes ``EntropyCalibrator`` / ``MinMaxCalibrator``). Each is a thin shell that
calls the base ``__init__`` and delegates to a :class:`CalibrationSession`, which holds the logic
in plain Python:

* ``get_batch(names)`` -> the device addresses of the next batch in the order of ``names``
  (a :class:`~quantkit.backends.tensorrt.buffers.DeviceBatchFeeder`), ``None`` at the end;
* ``read_calibration_cache()`` -> the bytes of a TensorRT calibration cache made from a quantkit
  CalibrationTable or cache file (TensorRT then skips calibration), else ``None``;
* ``write_calibration_cache(cache)`` -> kept, and turned into a CalibrationTable after the build.

TensorRT calls these from C++: an exception raised there cannot reach the caller intact, so the
session records it, ends the data (``None``) and :meth:`CalibrationSession.check_after_build`
raises it once the builder returns. A calibration that saw zero batches (and used no cache) is an
error there too: the engine is discarded rather than shipped with meaningless scales.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from quantkit.backends.tensorrt._trt import require_tensorrt
from quantkit.backends.tensorrt.options import CalibratorKind
from quantkit.backends.tensorrt.version import TrtVersion, implicit_unavailable_error
from quantkit.errors import QuantkitError

if TYPE_CHECKING:
    import tensorrt as trt
    from typing_extensions import Buffer

    from quantkit.backends.tensorrt.buffers import DeviceBatchFeeder

CalibratorFactory = Callable[["CalibrationSession"], "trt.IInt8Calibrator"]

# the algorithm names TensorRT writes in a calibration cache's header line
TRT_ALGORITHM_NAMES = {
    CalibratorKind.ENTROPY: "EntropyCalibration2",
    CalibratorKind.MINMAX: "MinMaxCalibration",
}


class CalibrationSession:
    """Everything a calibrator does, without TensorRT: see the module docstring.

    ``feeder`` may be None when a cache is given and no data is at hand; ``batch_size`` is the
    calibration batch (TensorRT 10 ignores it for explicit-batch networks but asks for it).
    """

    def __init__(
        self,
        kind: CalibratorKind | str,
        feeder: DeviceBatchFeeder | None,
        *,
        batch_size: int,
        cache: bytes | None = None,
    ) -> None:
        self.kind = CalibratorKind.parse(kind)
        self.feeder = feeder
        self.batch_size = int(batch_size)
        self.cache = cache
        self.written: bytes | None = None
        self.errors: list[BaseException] = []
        self.get_batch_calls = 0
        self.cache_reads = 0

    # -- the calibrator interface -----------------------------------------------------------------
    def get_batch_size(self) -> int:
        return self.batch_size

    def get_batch(self, names: Sequence[str]) -> list[int] | None:
        self.get_batch_calls += 1
        if self.errors or self.feeder is None:
            return None
        try:
            return self.feeder.get_batch(list(names))
        except Exception as exc:  # noqa: BLE001 - reported by check_after_build
            self.errors.append(exc)
            return None

    def read_calibration_cache(self) -> bytes | None:
        self.cache_reads += 1
        return self.cache

    def write_calibration_cache(self, cache: Buffer) -> None:
        try:
            self.written = bytes(memoryview(cache))
        except Exception as exc:  # noqa: BLE001 - reported by check_after_build
            self.errors.append(exc)

    # -- around a build ---------------------------------------------------------------------------
    def reset(self) -> None:
        """Ready for another build: rewind the data and forget the last run's outcome."""
        if self.feeder is not None:
            self.feeder.reset()
        self.written = None
        self.errors = []
        self.get_batch_calls = 0
        self.cache_reads = 0

    @property
    def batches_fed(self) -> int:
        return self.feeder.batches_fed if self.feeder is not None else 0

    @property
    def used_cache(self) -> bool:
        """TensorRT read our cache and never asked for data: it took the scales from the cache."""
        return self.cache is not None and self.cache_reads > 0 and self.get_batch_calls == 0

    def raise_callback_errors(self) -> None:
        """Raise the first exception caught inside a TensorRT callback, if any."""
        if self.errors:
            first = self.errors[0]
            if isinstance(first, QuantkitError):
                raise first
            raise QuantkitError(
                f"INT8 calibration failed while feeding TensorRT: {type(first).__name__}: {first}"
            ) from first

    def check_after_build(self) -> None:
        """Raise what went wrong inside the callbacks, or a calibration that saw no data."""
        self.raise_callback_errors()
        if self.used_cache:
            return
        if self.batches_fed == 0:
            if self.cache is not None:
                raise QuantkitError(
                    "TensorRT did not accept the calibration cache (its header names another "
                    "TensorRT version or algorithm) and there is no calibration data to fall "
                    "back on; the engine was discarded",
                    "give calibration data, or a cache/table for this TensorRT version and the "
                    f"{self.kind.value} calibrator",
                )
            raise QuantkitError(
                "INT8 calibration received zero batches; the engine was discarded",
                "give calibration data with at least one full batch of the calibration shape "
                f"(batch {self.batch_size}), or a calibration table/cache",
            )

    def describe(self) -> dict[str, Any]:
        return {
            "calibrator": self.kind.value,
            "algorithm": TRT_ALGORITHM_NAMES[self.kind],
            "batch_size": self.batch_size,
            "used_cache": self.used_cache,
            "batches_fed": self.batches_fed,
            "feeder": self.feeder.describe() if self.feeder is not None else None,
        }


@functools.cache
def _calibrator_classes() -> dict[CalibratorKind, CalibratorFactory]:
    import tensorrt as trt

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        """``trt.IInt8EntropyCalibrator2`` fed by a CalibrationSession."""

        def __init__(self, session: CalibrationSession) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.session = session

        def get_batch_size(self) -> int:
            return self.session.get_batch_size()

        # The stubs type get_batch as returning list[int], but the documented contract (the
        # stub's own docstring: "return either [] or None") allows None at the end of the data.
        def get_batch(self, names: list[str]) -> list[int] | None:  # type: ignore[override]
            return self.session.get_batch(names)

        def read_calibration_cache(self) -> bytes | None:
            return self.session.read_calibration_cache()

        def write_calibration_cache(self, cache: Buffer) -> None:
            self.session.write_calibration_cache(cache)

    class MinMaxCalibrator(trt.IInt8MinMaxCalibrator):
        """``trt.IInt8MinMaxCalibrator`` fed by a CalibrationSession."""

        def __init__(self, session: CalibrationSession) -> None:
            trt.IInt8MinMaxCalibrator.__init__(self)
            self.session = session

        def get_batch_size(self) -> int:
            return self.session.get_batch_size()

        # See EntropyCalibrator: None is the documented end-of-data value.
        def get_batch(self, names: list[str]) -> list[int] | None:  # type: ignore[override]
            return self.session.get_batch(names)

        def read_calibration_cache(self) -> bytes | None:
            return self.session.read_calibration_cache()

        def write_calibration_cache(self, cache: Buffer) -> None:
            self.session.write_calibration_cache(cache)

    return {CalibratorKind.ENTROPY: EntropyCalibrator, CalibratorKind.MINMAX: MinMaxCalibrator}


def calibrator_class(kind: CalibratorKind | str) -> CalibratorFactory:
    """The calibrator class for ``kind``; a clear error where TensorRT has no calibrators (11+)."""
    trt_module = require_tensorrt()
    version = TrtVersion.parse(trt_module.__version__)
    if not version.has_implicit_quantization or not hasattr(trt_module, "IInt8Calibrator"):
        raise implicit_unavailable_error(version)
    return _calibrator_classes()[CalibratorKind.parse(kind)]


def make_calibrator(session: CalibrationSession) -> trt.IInt8Calibrator:
    return calibrator_class(session.kind)(session)


def __getattr__(name: str) -> Any:
    """``calibrator.EntropyCalibrator`` / ``calibrator.MinMaxCalibrator``, made on first use."""
    kinds = {"EntropyCalibrator": CalibratorKind.ENTROPY, "MinMaxCalibrator": CalibratorKind.MINMAX}
    if name in kinds:
        return calibrator_class(kinds[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class CalibrationSource:
    """What a build calibrates from: data and/or cache bytes, a calibrator kind and a shape.

    The feeder (device buffers) is made at the first build, once the network's inputs are known,
    and kept: a second build (or a rebuild after a failure) with the same inputs reuses the
    buffers and rewinds the data (:meth:`CalibrationSession.reset`).
    """

    def __init__(
        self,
        kind: CalibratorKind | str,
        shape: tuple[int, int],
        *,
        data: Any = None,
        cache: bytes | None = None,
        device: str = "cuda",
    ) -> None:
        self.kind = CalibratorKind.parse(kind)
        self.shape = (int(shape[0]), int(shape[1]))
        self.data = data
        self.cache = cache
        self.device = device
        self._session: CalibrationSession | None = None
        self._inputs: dict[str, Any] | None = None

    def session_for(self, inputs: Mapping[str, Any]) -> CalibrationSession:
        """The session for a network with ``inputs`` (name -> numpy dtype)."""
        from quantkit.backends.tensorrt.buffers import DeviceBatchFeeder

        wanted = dict(inputs)
        if self._session is not None and self._inputs == wanted:
            self._session.reset()
            return self._session
        if self._session is not None and self._session.feeder is not None:
            self._session.feeder.close()
        feeder = None
        if self.data is not None:
            feeder = DeviceBatchFeeder(self.data, wanted, self.shape, device=self.device)
        self._session = CalibrationSession(
            self.kind, feeder, batch_size=self.shape[0], cache=self.cache
        )
        self._inputs = wanted
        return self._session
