"""The calibrator's cache, through quantkit's TensorRT cache I/O (:mod:`quantkit.calib.trt_cache`).

* into TensorRT (``read_calibration_cache``): a CalibrationTable computed anywhere (a CPU box
  included) or a TensorRT cache file, checked against the calibrator's algorithm, the running
  TensorRT version and the model's tensors, with the header rewritten to the running version
  when a version mismatch is explicitly accepted (TensorRT itself ignores such a cache);
* out of TensorRT (``write_calibration_cache``): the bytes TensorRT wrote, parsed and turned into
  a CalibrationTable beside the engine.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from quantkit.calib.table import CalibrationTable
from quantkit.calib.trt_cache import (
    TrtCache,
    algorithm_for_method,
    check_trt_cache,
    table_from_trt_cache,
    table_to_trt_cache,
    trt_version_number,
    trt_version_string,
)
from quantkit.errors import QuantkitError

# CalibrationTable.params["source"] of a table made from a TensorRT cache (quantkit.calib)
TRT_CACHE_SOURCE = "tensorrt-calibration-cache"


def calibrator_algorithm_for_table(table: CalibrationTable) -> str:
    """The TensorRT algorithm whose calibrator hands ``table``'s scales to TensorRT."""
    return algorithm_for_method(table.method)


def onnx_tensor_names(onnx_path: Path) -> set[str]:
    """Every tensor a calibration cache may name: graph inputs and node outputs."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    names = {v.name for v in model.graph.input}
    for node in model.graph.node:
        names.update(o for o in node.output if o)
    return names


def cache_bytes_from_table(
    table: CalibrationTable,
    algorithm: str,
    trt_version: str,
    *,
    model_hash: str | None = None,
    tensor_names: Iterable[str] | None = None,
) -> bytes:
    """A cache TensorRT accepts (header: the running version, the calibrator's algorithm).

    A table quantkit computed names ONNX tensors only, and every name must be in the model; a
    table made from TensorRT's own cache also names tensors the ONNX parser made up (layers a
    node became), so there only a table naming none of the model's tensors is refused.
    """
    table.check_model(model_hash)
    cache = table_to_trt_cache(table, trt_version, algorithm)
    check_trt_cache(
        cache, algorithm=algorithm, trt_version=trt_version, tensor_names=tensor_names,
        allow_unknown_tensors=table.params.get("source") == TRT_CACHE_SOURCE,
        source="calibration table",
    )
    return cache.to_bytes()


def cache_bytes_from_file(
    path: Path,
    algorithm: str,
    trt_version: str,
    *,
    accept_version_mismatch: bool = False,
    tensor_names: Iterable[str] | None = None,
) -> bytes:
    """A TensorRT cache file, checked; re-headed for this TensorRT if a mismatch is accepted."""
    cache = TrtCache.read(Path(path))
    want = trt_version_number(trt_version)
    if cache.version != want and not accept_version_mismatch:
        theirs, ours = trt_version_string(cache.version), trt_version_string(want)
        same_major = theirs.split(".")[0] == ours.split(".")[0]
        raise QuantkitError(
            f"calibration cache {path} is from TensorRT {theirs} (header TRT-{cache.version}-"
            f"{cache.algorithm}), this is TensorRT {ours}"
            + ("" if same_major else ", another major version")
            + "; TensorRT would ignore it and recalibrate",
            "recalibrate with this TensorRT, or pass --option accept_cache_version_mismatch=true "
            "to use its scales anyway (the header is rewritten for this version)",
        )
    check_trt_cache(
        cache,
        algorithm=algorithm,
        trt_version=trt_version,
        allow_version_mismatch=accept_version_mismatch,
        tensor_names=tensor_names,
        allow_unknown_tensors=True,  # TensorRT names tensors of its own (see above)
        source=f"calibration cache {path}",
    )
    cache.version = trt_version_number(trt_version)
    return cache.to_bytes()


def table_from_cache_bytes(
    data: bytes,
    algorithm: str,
    trt_version: str,
    *,
    model_hash: str | None = None,
    data_description: dict[str, Any] | None = None,
    num_samples: int = 0,
    num_tokens: int = 0,
) -> CalibrationTable:
    """The CalibrationTable of the cache TensorRT wrote in this build."""
    cache = TrtCache.parse(data, source="the calibration cache TensorRT wrote")
    check_trt_cache(cache, algorithm=algorithm, trt_version=trt_version,
                    source="the calibration cache TensorRT wrote")
    table = table_from_trt_cache(cache, model_hash=model_hash, data=data_description)
    table.num_samples = num_samples
    table.num_tokens = num_tokens
    return table
