"""Paths to the report fixtures and a helper to write altered copies of them."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

DATA = Path(__file__).resolve().parent / "data"
TRT = DATA / "results-trt-h100.json"  # 5 TensorRT engines on one GPU (invented numbers)
ORT = DATA / "results-ort-cpu.json"  # 2 ONNX Runtime engines on a CPU (invented numbers)
CALIB = DATA / "calib"


def altered(source: Path, target: Path, change: Callable[[dict[str, Any]], None]) -> Path:
    """Copy a results file to ``target`` after ``change`` edits its JSON in place."""
    data = json.loads(source.read_text())
    change(data)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(data))
    return target


def engine(data: dict[str, Any], name: str) -> dict[str, Any]:
    return next(e for e in data["engines"] if e["name"] == name)
