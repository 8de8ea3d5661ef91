"""Calibration summary for the report, from a directory written by ``quantkit calibrate``.

``table.json`` (a ``CalibrationTable``) gives the method, its parameters, the number of samples and
tokens, amax per tensor and the skipped tensors. The histogram of one tensor, with the chosen
threshold marked, comes from the activation statistics (``ActivationStats``, an ``.npz``) saved in
the same directory; without one the report says so.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from quantkit.artifacts import MANIFEST_NAME, read_json
from quantkit.errors import QuantkitError

TABLE_NAME = "table.json"
TOP_K = 10


def read_table(directory: Path) -> Any:
    """The directory's CalibrationTable, checked by its own loader."""
    from quantkit.calib.table import CalibrationTable

    directory = Path(directory)
    if not directory.is_dir():
        raise QuantkitError(f"calibration directory {directory} does not exist",
                            "pass a directory written by 'quantkit calibrate'")
    path = directory / TABLE_NAME
    if not path.is_file():
        raise QuantkitError(f"{directory} holds no {TABLE_NAME}",
                            "pass a directory written by 'quantkit calibrate'")
    return CalibrationTable.load(path)


def summarise(table: Any, directory: Path, top_k: int = TOP_K) -> dict[str, Any]:
    """Method, parameters, samples, tokens, tensor count, skipped tensors, the largest amax."""
    largest = sorted(table.amax.items(), key=lambda kv: (-kv[1], kv[0]))[:top_k]
    return {
        "directory": str(directory),
        "method": table.method,
        "params": dict(table.params),
        "num_samples": table.num_samples,
        "num_tokens": table.num_tokens,
        "num_tensors": len(table.amax),
        "skipped": dict(table.skipped),
        "largest_amax": [{"tensor": t, "amax": float(v)} for t, v in largest],
    }


def stats_files(directory: Path) -> list[Path]:
    """Candidate activation-stats files: those the manifest names first, then every ``.npz``."""
    directory = Path(directory)
    named: list[Path] = []
    manifest = directory / MANIFEST_NAME
    if manifest.is_file():
        try:
            data = read_json(manifest)
        except QuantkitError:
            data = {}
        named = [directory / v for v in _strings(data) if v.endswith(".npz")]
    others = sorted(p for p in directory.glob("*.npz") if p not in named)
    return [p for p in named if p.is_file()] + others


def _strings(obj: Any) -> list[str]:
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, Mapping):
        return [s for v in obj.values() for s in _strings(v)]
    if isinstance(obj, list):
        return [s for v in obj for s in _strings(v)]
    return []


def load_histogram(directory: Path, tensor: str) -> tuple[dict[str, Any] | None, str | None]:
    """``({"edges", "counts", "amax", "total", "source"}, None)`` for ``tensor``, or
    ``(None, why not)``."""
    from quantkit.calib.stats import ActivationStats

    candidates = stats_files(directory)
    if not candidates:
        return None, f"{directory} holds no activation statistics (.npz) to draw it from"
    problems = []
    for path in candidates:
        try:
            stats = ActivationStats.load(path)
        except QuantkitError as exc:
            problems.append(str(exc))
            continue
        hist = stats.histograms.get(tensor)
        if hist is None:
            problems.append(f"{path.name} has no histogram of this tensor")
            continue
        if hist.bin_width is None:
            problems.append(f"{path.name}: its histogram of this tensor saw no nonzero value")
            continue
        return {
            "edges": hist.edges.tolist(),
            "counts": hist.counts.tolist(),
            "amax": float(hist.amax),
            "total": int(hist.total),
            "source": path.name,
        }, None
    return None, "; ".join(problems)
