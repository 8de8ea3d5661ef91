"""TensorRT ``DataType`` names <-> numpy / torch dtypes (by name, so no TensorRT import)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from quantkit.errors import QuantkitError

if TYPE_CHECKING:
    import torch

# DataType.name -> numpy dtype; TensorRT's own trt.nptype() does the same for these types
_NUMPY: dict[str, np.dtype] = {
    "FLOAT": np.dtype(np.float32),
    "HALF": np.dtype(np.float16),
    "INT8": np.dtype(np.int8),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
}

# the precision a DataType stands for in quantkit's reports
PRECISION_OF = {
    "FLOAT": "fp32",
    "HALF": "fp16",
    "BF16": "bf16",
    "INT8": "int8",
    "FP8": "fp8",
    "INT4": "int4",
    "FP4": "fp4",
}

FLOAT_TYPES = frozenset({"FLOAT", "HALF", "BF16"})


def numpy_dtype(trt_name: str) -> np.dtype:
    try:
        return _NUMPY[trt_name]
    except KeyError:
        raise QuantkitError(
            f"TensorRT data type {trt_name} has no numpy equivalent in quantkit's runner"
        ) from None


def torch_dtype(trt_name: str) -> torch.dtype:
    import torch

    table = {
        "FLOAT": torch.float32,
        "HALF": torch.float16,
        "BF16": torch.bfloat16,
        "INT8": torch.int8,
        "INT32": torch.int32,
        "INT64": torch.int64,
        "BOOL": torch.bool,
        "UINT8": torch.uint8,
    }
    try:
        return table[trt_name]
    except KeyError:
        raise QuantkitError(
            f"TensorRT data type {trt_name} has no torch equivalent in quantkit's runner"
        ) from None


def cast_tokens(array: np.ndarray, dtype: np.dtype, name: str) -> np.ndarray:
    """Cast an integer token array to the engine's input type, refusing values that would wrap."""
    array = np.asarray(array)
    if array.dtype == dtype:
        return array
    if np.issubdtype(dtype, np.integer) and array.size:
        info = np.iinfo(dtype)
        low, high = int(array.min()), int(array.max())
        if low < info.min or high > info.max:
            raise QuantkitError(
                f"input '{name}' holds values in [{low}, {high}], outside {dtype.name}"
            )
    return array.astype(dtype)
