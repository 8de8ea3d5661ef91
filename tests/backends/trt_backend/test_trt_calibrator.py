"""The calibrator's logic (CalibrationSession, CalibrationSource) on the CPU, and the classes that
need TensorRT."""

from __future__ import annotations

import numpy as np
import pytest

from quantkit.backends.tensorrt._trt import tensorrt_available
from quantkit.backends.tensorrt.buffers import DeviceBatchFeeder
from quantkit.backends.tensorrt.calibrator import (
    TRT_ALGORITHM_NAMES,
    CalibrationSession,
    CalibrationSource,
    calibrator_class,
)
from quantkit.backends.tensorrt.options import CalibratorKind
from quantkit.errors import MissingDependencyError, QuantkitError

NAMES = ["input_ids", "attention_mask"]
DTYPES = {"input_ids": np.int64, "attention_mask": np.int64}


def data(rows: int = 6, seq: int = 8, per_batch: int = 2) -> list[dict[str, np.ndarray]]:
    ids = np.arange(rows * seq, dtype=np.int64).reshape(rows, seq)
    return [
        {"input_ids": ids[i:i + per_batch], "attention_mask": np.ones_like(ids[i:i + per_batch])}
        for i in range(0, rows, per_batch)
    ]


def session(batches=None, cache=None, kind="entropy") -> CalibrationSession:
    feeder = None
    if batches is not None:
        feeder = DeviceBatchFeeder(batches, DTYPES, (2, 8), device="cpu")
    return CalibrationSession(kind, feeder, batch_size=2, cache=cache)


def test_batches_then_none_then_check_passes():
    s = session(data())
    assert s.get_batch_size() == 2
    for k in range(3):
        pointers = s.get_batch(NAMES)
        assert pointers == s.feeder.pointers(NAMES)
        assert s.feeder.buffer("input_ids").numpy()[0, 0] == 16 * k
    assert s.get_batch(NAMES) is None
    assert s.batches_fed == 3 and s.get_batch_calls == 4
    s.check_after_build()
    assert s.describe()["algorithm"] == "EntropyCalibration2"


def test_zero_batches_is_an_error_never_an_engine():
    s = session([])
    assert s.get_batch(NAMES) is None
    with pytest.raises(QuantkitError, match="received zero batches; the engine was discarded"):
        s.check_after_build()


def test_no_data_at_all_is_zero_batches():
    s = session(None)
    assert s.get_batch(NAMES) is None
    with pytest.raises(QuantkitError, match="zero batches"):
        s.check_after_build()


def test_errors_inside_callbacks_end_the_data_and_surface_after_the_build():
    s = session(data())
    assert s.get_batch(["input_ids", "position_ids"]) is None  # raised inside: captured
    assert s.get_batch(NAMES) is None  # and calibration stays ended
    with pytest.raises(QuantkitError, match="position_ids"):
        s.check_after_build()


def test_non_quantkit_errors_are_wrapped():
    class Exploding:
        def __iter__(self):
            raise RuntimeError("disk on fire")

    s = CalibrationSession(
        "minmax", DeviceBatchFeeder(Exploding(), DTYPES, (2, 8), device="cpu"), batch_size=2
    )
    assert s.get_batch(NAMES) is None
    with pytest.raises(QuantkitError, match="RuntimeError: disk on fire"):
        s.raise_callback_errors()


def test_cache_read_without_data_requests_means_tensorrt_used_it():
    s = session(None, cache=b"TRT-100130-EntropyCalibration2\ninput_ids: 3c010a14\n")
    assert s.read_calibration_cache().startswith(b"TRT-100130")
    assert s.used_cache
    s.check_after_build()  # zero batches are fine: the scales came from the cache
    assert s.describe()["used_cache"] is True


def test_cache_rejected_by_tensorrt_and_no_data():
    s = session(None, cache=b"TRT-8601-EntropyCalibration2\n")
    s.read_calibration_cache()
    assert s.get_batch(NAMES) is None  # TensorRT ignored the cache and asked for data
    assert not s.used_cache
    with pytest.raises(QuantkitError, match="did not accept the calibration cache"):
        s.check_after_build()


def test_cache_rejected_but_data_calibrates():
    s = session(data(), cache=b"TRT-8601-EntropyCalibration2\n")
    s.read_calibration_cache()
    while s.get_batch(NAMES) is not None:
        pass
    assert not s.used_cache and s.batches_fed == 3
    s.check_after_build()


def test_write_calibration_cache_keeps_bytes():
    s = session(data())
    s.write_calibration_cache(bytearray(b"TRT-100130-MinMaxCalibration\nx: 3c000000\n"))
    assert s.written == b"TRT-100130-MinMaxCalibration\nx: 3c000000\n"
    s.write_calibration_cache(memoryview(b"abc"))
    assert s.written == b"abc"


def test_reset_for_a_second_build():
    s = session(data())
    while s.get_batch(NAMES) is not None:
        pass
    s.write_calibration_cache(b"x")
    s.reset()
    assert s.batches_fed == 0 and s.written is None and s.get_batch_calls == 0
    assert s.get_batch(NAMES) is not None
    assert s.feeder.buffer("input_ids").numpy()[0, 0] == 0


def test_source_reuses_its_session_and_rewinds_it():
    source = CalibrationSource("minmax", (2, 8), data=data(), device="cpu")
    first = source.session_for(DTYPES)
    while first.get_batch(NAMES) is not None:
        pass
    assert first.batches_fed == 3
    again = source.session_for(dict(DTYPES))
    assert again is first and again.batches_fed == 0
    buffers = first.feeder.pointers(NAMES)
    assert again.get_batch(NAMES) == buffers
    other = source.session_for({"input_ids": np.int32})
    assert other is not first and other.kind is CalibratorKind.MINMAX
    assert other.feeder.buffer("input_ids").dtype.itemsize == 4


def test_source_without_data_has_no_feeder():
    source = CalibrationSource("entropy", (4, 64), cache=b"TRT-100130-EntropyCalibration2\n")
    s = source.session_for(DTYPES)
    assert s.feeder is None and s.cache is not None and s.batch_size == 4


def test_algorithm_names_match_tensorrt_cache_headers():
    assert TRT_ALGORITHM_NAMES == {CalibratorKind.ENTROPY: "EntropyCalibration2",
                                   CalibratorKind.MINMAX: "MinMaxCalibration"}


@pytest.mark.skipif(tensorrt_available(), reason="checks the error where TensorRT is missing")
def test_calibrator_classes_need_tensorrt():
    from quantkit.backends.tensorrt import calibrator

    with pytest.raises(MissingDependencyError, match="pip install 'quantkit\\[tensorrt\\]'"):
        calibrator_class("entropy")
    with pytest.raises(MissingDependencyError):
        calibrator.EntropyCalibrator  # noqa: B018 - made on first access
    with pytest.raises(AttributeError):
        calibrator.NoSuchCalibrator  # noqa: B018


@pytest.mark.tensorrt
def test_calibrator_classes_subclass_tensorrt():
    trt = pytest.importorskip("tensorrt", reason="needs TensorRT")
    from quantkit.backends.tensorrt import calibrator
    from quantkit.backends.tensorrt.version import TrtVersion

    if not TrtVersion.parse(trt.__version__).has_implicit_quantization:
        with pytest.raises(QuantkitError, match="TensorRT 11 removed IInt8Calibrator"):
            calibrator_class("entropy")
        return
    entropy, minmax = calibrator.EntropyCalibrator, calibrator.MinMaxCalibrator
    assert issubclass(entropy, trt.IInt8EntropyCalibrator2)
    assert issubclass(minmax, trt.IInt8MinMaxCalibrator)
    s = session(data())
    cal = entropy(s)
    assert cal.get_algorithm() == trt.CalibrationAlgoType.ENTROPY_CALIBRATION_2
    assert minmax(s).get_algorithm() == trt.CalibrationAlgoType.MINMAX_CALIBRATION
    assert cal.get_batch_size() == 2
    assert cal.get_batch(NAMES) == s.feeder.pointers(NAMES)
    assert cal.read_calibration_cache() is None
