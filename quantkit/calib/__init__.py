"""Calibration: streaming |x| histograms of activations, range algorithms (entropy, minmax,
percentile, mse), CalibrationTable and TensorRT calibration-cache I/O.

Importing this package needs only numpy; ONNX and ONNX Runtime are imported when activations are
collected.
"""

from quantkit.calib.algorithms import (
    available_algorithms,
    compute_amax,
    get_algorithm,
    register,
)
from quantkit.calib.histogram import StreamingHistogram
from quantkit.calib.stats import ActivationStats, calibrate
from quantkit.calib.table import CalibrationTable
from quantkit.calib.trt_cache import (
    TrtCache,
    check_trt_cache,
    table_from_trt_cache,
    table_to_trt_cache,
    trt_version_number,
)

__all__ = [
    "ActivationStats",
    "CalibrationTable",
    "StreamingHistogram",
    "TrtCache",
    "available_algorithms",
    "calibrate",
    "check_trt_cache",
    "collect_activation_stats",
    "compute_amax",
    "get_algorithm",
    "register",
    "table_from_trt_cache",
    "table_to_trt_cache",
    "trt_version_number",
]


def __getattr__(name: str):  # collect_activation_stats pulls in the ONNX graph tooling lazily
    if name == "collect_activation_stats":
        from quantkit.calib.collect import collect_activation_stats

        return collect_activation_stats
    raise AttributeError(name)
