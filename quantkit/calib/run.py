"""The whole calibration step as one library call (``quantkit calibrate`` is a thin wrapper):
model or ONNX + text -> token blocks -> activation stats -> CalibrationTable, written atomically
into an output directory:

* ``table.json``        the CalibrationTable (amax per tensor, skipped tensors and why)
* ``calibration.cache`` the same scales as a TensorRT calibration cache
* ``stats.npz``         the histograms, to recompute the ranges with another method for free
* ``summary.json``      largest ranges and clipped share per tensor
* ``manifest.json``     what made it (model hash, data, method, versions)
* ``export/``           the FP32 ONNX export, when a model (not an ONNX) was given
"""

from __future__ import annotations

import gc
import math
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from quantkit.artifacts import (
    atomic_output_dir,
    atomic_write_json,
    check_can_write,
    make_manifest,
    write_manifest,
)
from quantkit.calib.algorithms import get_algorithm
from quantkit.calib.collect import release_freed_memory
from quantkit.calib.histogram import DEFAULT_NUM_BINS
from quantkit.calib.stats import ActivationStats, calibrate
from quantkit.calib.table import WEIGHTS_FILE, CalibrationTable
from quantkit.calib.trt_cache import table_to_trt_cache, trt_version_number
from quantkit.errors import QuantkitError

CALIBRATION_KIND = "calibration"
TABLE_NAME = "table.json"
CACHE_NAME = "calibration.cache"
STATS_NAME = "stats.npz"
SUMMARY_NAME = "summary.json"
EXPORT_DIR = "export"
SMOOTHED_DIR = "smoothed"  # the SmoothQuant-rewritten export that the table belongs to
WEIGHT_METHODS = ("rtn", "gptq")
# The TensorRT version a cache is written for when TensorRT is not installed here (the version
# the project's type stubs describe). Pass trt_version to match the machine that builds.
DEFAULT_TRT_VERSION = "10.13.0"


@dataclass(frozen=True)
class CalibrationRequest:
    """What to calibrate, on what data, how. Exactly one of ``model`` / ``onnx`` is set."""

    model: str | None = None
    onnx: Path | None = None
    dataset: str = "wikitext"
    dataset_config: str | None = None
    split: str = "train"
    text_column: str = "text"
    num_samples: int = 512
    seq_len: int = 512
    batch_size: int = 8
    seed: int = 0
    method: str = "entropy"
    params: dict[str, Any] = field(default_factory=dict)
    tensors: str = "all"
    num_bins: int = DEFAULT_NUM_BINS
    trt_version: str | None = None
    trust_remote_code: bool = False
    smoothquant: float | str | None = None  # SmoothQuant alpha (0..1 or "auto"): smooth first
    weights: str = "rtn"  # rtn: engines round weights to nearest; gptq: weights.npz (GPTQ)
    gptq_samples: int = 64  # calibration blocks GPTQ's activation statistics are taken from
    gptq_memory: int | None = None  # bytes of Hessians held at once (None: gptq.hessian_budget)

    def validate(self) -> None:
        if (self.model is None) == (self.onnx is None):
            raise QuantkitError("give either a model or an ONNX file",
                                "--model M exports M first; --onnx X uses an existing export")
        get_algorithm(self.method).resolve_params(self.params)
        from quantkit.smoothquant import parse_alpha

        object.__setattr__(self, "smoothquant", parse_alpha(self.smoothquant))
        if self.tensors not in ("all", "quantizable"):
            raise QuantkitError(f"unknown tensor selection '{self.tensors}'",
                                "use 'all' or 'quantizable'")
        check_weights_option(self.weights, self.gptq_samples)


def check_weights_option(weights: str, gptq_samples: int) -> None:
    if weights not in WEIGHT_METHODS:
        raise QuantkitError(f"unknown weight rounding '{weights}'",
                            f"use one of: {', '.join(WEIGHT_METHODS)}")
    if gptq_samples < 1:
        raise QuantkitError("gptq-samples must be at least 1")


LAYER_BY_LAYER_FROM = 2 << 30  # FP32 weights from which statistics go layer by layer
LAYER_SEGMENT_BYTES = 512 << 20  # weights of one segment then (3 TinyLlama-1.1B layers)


def layer_segment_bytes(onnx_path: Path) -> int | None:
    """Layer by layer, in segments of this many bytes of weights, for a model whose weights
    pass 2 GiB (kept in an external-data file); None below (every segment loaded at once, the
    way measured on the small models)."""
    import onnx

    from quantkit.onnx_io import weight_bytes

    model = onnx.load(str(onnx_path), load_external_data=False)
    return (LAYER_SEGMENT_BYTES if weight_bytes(model) >= LAYER_BY_LAYER_FROM
            else None)


def first_rows(batches: Iterable[Mapping[str, np.ndarray]], rows: int
               ) -> Iterator[dict[str, np.ndarray]]:
    """The first ``rows`` rows of ``batches`` (the last batch cut short)."""
    left = rows
    for batch in batches:
        if left <= 0:
            return
        take = {k: v[:left] for k, v in batch.items()}
        left -= len(next(iter(take.values())))
        yield take


@dataclass
class CalibrationResult:
    directory: Path
    table: CalibrationTable
    stats: ActivationStats
    summary: dict[str, Any]
    manifest: dict[str, Any]


ProgressFn = Callable[[int, int], None]


def run_calibration(request: CalibrationRequest, out: Path, *, force: bool = False,
                    progress: ProgressFn | None = None,
                    on_blocks: Callable[[Any], None] | None = None) -> CalibrationResult:
    """Calibrate and write the output directory (nothing is left behind on error or Ctrl-C).

    ``on_blocks`` is called with the TokenBlocks once the data is chosen (to size a progress bar);
    ``progress`` after each batch with (batches done, tokens done).
    """
    from quantkit.calib.collect import collect_activation_stats
    from quantkit.calib.memory import check_calibration_fits
    from quantkit.data import TokenBlocks, resolve_text_source
    from quantkit.export import find_onnx, onnx_model_hash, tokenizer_beside

    request.validate()
    out = Path(out)
    check_can_write(out, force)
    trt_version = request.trt_version or _installed_tensorrt() or DEFAULT_TRT_VERSION
    trt_number = trt_version_number(trt_version)
    source = resolve_text_source(request.dataset, request.dataset_config, request.split,
                                 request.text_column)
    with atomic_output_dir(out, force=force) as tmp:
        if request.model is not None:
            onnx_path, tokenizer, model_info = _export(request, tmp / EXPORT_DIR)
            # the PyTorch model is gone: give its memory back before ONNX Runtime loads
            gc.collect()
            release_freed_memory()
        else:
            assert request.onnx is not None
            onnx_path = find_onnx(request.onnx)
            refuse_cache_graph(onnx_path)
            tokenizer = tokenizer_beside(onnx_path)
            model_info = {"onnx": str(onnx_path.resolve())}
        segment_bytes = layer_segment_bytes(onnx_path)
        check_calibration_fits(onnx_path, layer_segment_bytes=segment_bytes,
                               num_samples=request.num_samples, seq_len=request.seq_len,
                               gptq_memory=request.gptq_memory, gptq=request.weights == "gptq")
        model_hash = onnx_model_hash(onnx_path)
        blocks = TokenBlocks(source, tokenizer, seq_len=request.seq_len,
                             num_samples=request.num_samples, batch_size=request.batch_size,
                             seed=request.seed)
        data = blocks.describe()
        if request.smoothquant is not None:
            from quantkit.smoothquant import smooth_export

            onnx_path = smooth_export(onnx_path, blocks, tmp / SMOOTHED_DIR,
                                      alpha=request.smoothquant, data_description=data)
            model_info = {**model_info, "smoothquant": request.smoothquant,
                          "smoothed": SMOOTHED_DIR}
            model_hash = onnx_model_hash(onnx_path)
        if on_blocks is not None:
            on_blocks(blocks)
        stats = collect_activation_stats(onnx_path, blocks, tensors=request.tensors,
                                         num_bins=request.num_bins, progress=progress,
                                         data=data, model_hash=model_hash,
                                         segment_weight_bytes=segment_bytes)
        table = calibrate(stats, request.method, **request.params)
        weights_info: dict[str, Any] = {"method": "rtn"}
        if request.weights == "gptq":
            from quantkit.calib.gptq import gptq_weights

            table.weights, weights_info = gptq_weights(
                onnx_path, first_rows(blocks, request.gptq_samples),
                memory=request.gptq_memory, segment_bytes=segment_bytes)
        cache = table_to_trt_cache(table, trt_number)
        summary = summarize(stats, table)

        table.save(tmp / TABLE_NAME)
        cache.write(tmp / CACHE_NAME)
        stats.save(tmp / STATS_NAME)
        atomic_write_json(tmp / SUMMARY_NAME, summary)
        inputs = {
            "model": model_info,
            "model_hash": model_hash,
            "data": data,
            "method": request.method,
            "params": table.params,
            "tensors": request.tensors,
            "num_bins": request.num_bins,
            "weights": weights_info,
        }
        manifest = make_manifest(
            CALIBRATION_KIND, inputs,
            request={k: (str(v) if isinstance(v, Path) else v)
                     for k, v in asdict(request).items()},
            files={"table": TABLE_NAME, "tensorrt_cache": CACHE_NAME, "stats": STATS_NAME,
                   "summary": SUMMARY_NAME,
                   "weights": WEIGHTS_FILE if table.weights else None,
                   "onnx": _onnx_reference(request, onnx_path)},
            tensorrt_cache={"header": cache.header, "trt_version": trt_version},
            counts={"ranges": len(table.amax), "skipped": len(table.skipped),
                    "fetched_tensors": len(stats.unique_histograms()),
                    "batches": stats.num_batches, "samples": stats.num_samples,
                    "tokens": stats.num_tokens},
            peak_activation_bytes=stats.peak_activation_bytes,
        )
        write_manifest(tmp, manifest)
    return CalibrationResult(out, table, stats, summary, manifest)


def _export(request: CalibrationRequest, directory: Path) -> tuple[Path, Any, dict[str, Any]]:
    from quantkit.export import export_model
    from quantkit.models import load_model

    assert request.model is not None
    loaded = load_model(request.model, trust_remote_code=request.trust_remote_code)
    if loaded.tokenizer is None:
        raise QuantkitError(f"model '{request.model}' comes without a tokenizer")
    result = export_model(loaded, directory, with_nll=True)  # same graph as `export --with-nll`
    return result.onnx_path, loaded.tokenizer, {"model": request.model, "source": loaded.source,
                                                "export": EXPORT_DIR}


def refuse_cache_graph(onnx_path: Path) -> None:
    """A KV-cache export is not calibrated itself: its plain twin is, and the table carries over
    at build time (``quantkit.cache_tables``)."""
    from quantkit.export import export_manifest

    if (export_manifest(onnx_path) or {}).get("cache"):
        raise QuantkitError(
            f"{onnx_path} is a KV-cache export (--with-cache), which calibration does not run",
            "calibrate a plain export of the same model (quantkit export --with-nll) and build "
            "the cache export with that table")


def calibration_onnx(table: Path) -> Path:
    """The ONNX a calibration's table belongs to, as its manifest names it (``smoothed/`` for a
    SmoothQuant calibration)."""
    from quantkit.artifacts import read_manifest

    directory = Path(table).parent
    manifest = read_manifest(directory, CALIBRATION_KIND)
    reference = (manifest.get("files") or {}).get("onnx")
    if not reference:
        raise QuantkitError(f"{directory} has no calibration manifest naming its ONNX model",
                            "pass a table.json that 'quantkit calibrate' wrote, in its own "
                            "output directory")
    path = Path(reference)
    return path if path.is_absolute() else directory / path


def _onnx_reference(request: CalibrationRequest, onnx_path: Path) -> str:
    """Where the ONNX the table belongs to lives: inside the output directory when this run
    wrote it (export/ or smoothed/), else the path the user gave."""
    if request.smoothquant is not None:
        return f"{SMOOTHED_DIR}/{onnx_path.name}"
    if request.model is not None:
        return f"{EXPORT_DIR}/{onnx_path.name}"
    return str(onnx_path.resolve())


def _installed_tensorrt() -> str | None:
    for dist in ("tensorrt", "tensorrt-cu12", "tensorrt-cu13"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def clipped_fraction(hist: Any, amax: float) -> float:
    """Share of the values in bins that lie wholly above amax (clipped by INT8)."""
    width = hist.bin_width
    if not width or hist.total == 0:
        return 0.0
    first = math.ceil(amax / width - 1e-9)  # first bin whose lower edge is >= amax
    return float(hist.counts[first:].sum()) / hist.total


def summarize(stats: ActivationStats, table: CalibrationTable, top: int = 20) -> dict[str, Any]:
    """Per-tensor amax, largest |x| and clipped share; the largest and most clipped first."""
    per_tensor = {}
    for name, amax in table.amax.items():
        hist = stats.histograms[name]
        per_tensor[name] = {"amax": amax, "max_abs": hist.amax,
                            "clipped_fraction": clipped_fraction(hist, amax),
                            "shares_values_with": stats.aliases.get(name)}
    largest = sorted(per_tensor, key=lambda n: -per_tensor[n]["amax"])[:top]
    clipped = sorted(per_tensor, key=lambda n: -per_tensor[n]["clipped_fraction"])[:top]
    reasons = Counter(why.split(":", 1)[0] for why in table.skipped.values())
    return {
        "method": table.method,
        "params": table.params,
        "num_ranges": len(table.amax),
        "num_skipped": len(table.skipped),
        "skip_reasons": dict(reasons),
        "largest_amax": [{"tensor": n, **per_tensor[n]} for n in largest],
        "most_clipped": [{"tensor": n, **per_tensor[n]} for n in clipped],
        "per_tensor": per_tensor,
        "skipped": table.skipped,
    }
