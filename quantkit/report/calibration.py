"""Calibration summary for the report, read from a directory written by ``quantkit calibrate``.

``table.json`` (the CalibrationTable) gives the method, its parameters, the number of samples and
tokens, and amax per tensor. The histogram of one tensor, with the chosen threshold marked, comes
from the activation statistics saved beside it when there are any.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from quantkit.artifacts import read_json
from quantkit.errors import QuantkitError

TABLE_NAME = "table.json"
TOP_K = 10


def read_table(directory: Path) -> dict[str, Any]:
    directory = Path(directory)
    if not directory.is_dir():
        raise QuantkitError(f"calibration directory {directory} does not exist")
    path = directory / TABLE_NAME
    if not path.is_file():
        raise QuantkitError(
            f"{directory} holds no {TABLE_NAME}",
            "pass a directory written by 'quantkit calibrate'",
        )
    table = read_json(path)
    if not isinstance(table, dict):
        raise QuantkitError(f"{path} is not a calibration table (not a JSON object)")
    for key in ("method", "amax"):
        if key not in table:
            raise QuantkitError(f"{path} lacks the field '{key}'")
    if not isinstance(table["amax"], dict) or not table["amax"]:
        raise QuantkitError(f"{path} has no amax values")
    for tensor, value in table["amax"].items():
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise QuantkitError(f"{path}: amax of '{tensor}' is {value!r}, not a finite number ≥ 0")
    return table


def summarise(table: Mapping[str, Any], directory: Path, top_k: int = TOP_K) -> dict[str, Any]:
    """Method, parameters, samples, tokens, tensor count, skipped tensors, the largest amax."""
    amax = {str(k): float(v) for k, v in table["amax"].items()}
    largest = sorted(amax.items(), key=lambda kv: (-kv[1], kv[0]))[:top_k]
    skipped = table.get("skipped") or []
    return {
        "directory": str(directory),
        "method": str(table["method"]),
        "params": dict(table.get("params") or {}),
        "num_samples": table.get("num_samples"),
        "num_tokens": table.get("num_tokens"),
        "num_tensors": len(amax),
        "skipped": list(skipped) if isinstance(skipped, (list, tuple)) else skipped,
        "largest_amax": [{"tensor": t, "amax": v} for t, v in largest],
    }
