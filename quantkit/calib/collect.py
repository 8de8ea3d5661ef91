"""Activation statistics: run the FP32 ONNX model in ONNX Runtime (CPU) over calibration batches
and stream every calibrated tensor into its |x| histogram.

Bounded memory
--------------
Fetching every activation of a model at once costs gigabytes (SmolLM2-135M, one 512-token
sequence: about 2.5 GB of float32 activations; ONNX Runtime's own calibrator keeps every batch's
outputs, 17 GB for 16 batches of 4 x 128 tokens on the GPT-2-124M shape). So:

1. Tensors that only rearrange another tensor's values (Reshape, Transpose, ...) are not fetched;
   they share their source's histogram (see :mod:`quantkit.calib.graph`).
2. The graph is cut into segments of at most ``max_tensors_per_segment`` fetched tensors, each an
   ONNX Runtime session of its own. Segments run one after the other; each one's outputs are
   histogrammed and dropped before the next runs. Only the values later segments read (the
   residual stream, masks, rotary tables) are carried along.
3. A batch is run in sub-batches of rows. The first sub-batch is one row; from the bytes it
   actually produced, the next sub-batches take as many rows as keep one segment's activations
   under ``activation_budget`` bytes (at least one row).

So at most one segment's activations for one sub-batch are alive at a time (two while the
histogram thread works through the previous segment's), whatever the number of batches;
``ActivationStats.peak_activation_bytes`` reports the measured maximum.

4. Layer by layer (``segment_weight_bytes``; ``quantkit calibrate`` does it for models past 2 GiB
   of weights): segments are also capped in weight bytes and run one at a time over every
   sequence, loaded just before and freed just after, so ONNX Runtime holds one segment's
   weights, not the model's; the values later segments read are kept per sequence in between.

The histograms themselves have a fixed size (``num_bins`` bins, at most ``8 * num_bins`` after
growth).

Tensors that must not be calibrated
-----------------------------------
Checked on every sub-batch from the tensor's min and max (one pass each):

* NaN or +Inf anywhere: a QuantkitError naming the tensor (the model or the data is broken).
* Mask sentinels: values of magnitude >= 1e30 or -Inf (``torch.finfo(float32).min`` = -3.4e38
  or -inf additive attention masks, and the scores they are added to). The tensor is skipped with
  the reason recorded: such a tensor must stay in floating point (INT8 would turn "masked" into a
  finite score), and its range would crush every real value into bin 0. The threshold is far
  above real activations: SmolLM2-135M's RMSNorm squares its "massive activations" to 8.6e8, so
  a 1e9 threshold would already misfire. Finite masks of old models (-1e4, -1e9) are therefore
  not recognised; their tensors keep an ordinary histogram.
* Constant tensors: every element equal within every batch (all zeros, shape-derived scalars,
  ...). Skipped with the reason recorded: their histogram says nothing about a range.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import math
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from quantkit.calib.graph import (
    GraphInfo,
    alias_roots,
    analyse,
    partition,
    segment_model,
    select_tensors,
)
from quantkit.calib.histogram import DEFAULT_NUM_BINS, StreamingHistogram
from quantkit.calib.stats import ActivationStats, calibrate
from quantkit.errors import QuantkitError

__all__ = ["ActivationStats", "calibrate", "collect_activation_stats", "MASK_THRESHOLD"]

MASK_THRESHOLD = 1e30
DEFAULT_MAX_TENSORS_PER_SEGMENT = 48
DEFAULT_ACTIVATION_BUDGET = 256 << 20

ProgressFn = Callable[[int, int], None]  # (batches done, tokens done)


class _Root:
    """Collection state of one fetched tensor."""

    __slots__ = ("hist", "skip", "constant", "const_values")

    def __init__(self, num_bins: int) -> None:
        self.hist = StreamingHistogram(num_bins)
        self.skip: str | None = None
        self.constant = True  # every batch so far had all elements equal
        self.const_values: set[float] = set()


def _np_dtype(elem_type: int) -> np.dtype:
    import onnx

    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))


def _nbytes(value: Any) -> int:
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    arr = value.numpy()
    return int(arr.nbytes)


class SegmentRunner:
    """The model as a chain of ONNX Runtime sessions, one per segment.

    Sessions are loaded from files, their weights from an external-data file, so the weights are
    read once by ONNX Runtime and never serialised into per-segment byte strings: a model held
    in memory as a protobuf, then as bytes, then in ONNX Runtime costs three times its size, and
    the freed protobuf memory is not handed back to the system.
    """

    def __init__(self, tmp: Path, model: Any, info: GraphInfo, roots: list[str],
                 max_tensors: int, num_threads: int | None,
                 max_weight_bytes: int | None = None) -> None:
        """``max_weight_bytes`` (layer by layer): segments of at most that many bytes of
        weights, each loaded only while it runs (see :meth:`open`); else every segment's
        session is loaded here."""
        import onnxruntime as ort

        from quantkit.onnx_io import tensor_bytes

        sizes = ({t.name: tensor_bytes(t) for t in model.graph.initializer}
                 if max_weight_bytes is not None else None)
        self.segments = partition(info, roots, max_tensors, sizes, max_weight_bytes)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = num_threads or 0
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        # Sessions take turns: idle worker threads must not spin and steal the next one's cores.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # Without an arena, memory a segment frees goes back for the next segment; one arena
        # per session would hold every segment's peak at once.
        options.enable_cpu_mem_arena = False
        self.options = options
        self.paths = []
        for seg in self.segments:
            path = tmp / f"segment{seg.index}.onnx"
            path.write_bytes(segment_model(model, info, seg).SerializeToString())
            self.paths.append(path)
        self.layer_by_layer = max_weight_bytes is not None
        self.sessions = [] if self.layer_by_layer else [self.open(s.index) for s in self.segments]
        self.last_use: dict[str, int] = {}
        for seg in self.segments:
            for name in seg.inputs:
                self.last_use[name] = seg.index
        self.keep = [{n for n in seg.outputs if self.last_use.get(n, -1) > seg.index}
                     for seg in self.segments]
        self.root_sets = [set(seg.roots) for seg in self.segments]

    def open(self, index: int) -> Any:
        """An ONNX Runtime session of segment ``index`` (its weights read from disk now)."""
        import onnxruntime as ort

        try:
            return ort.InferenceSession(str(self.paths[index]), self.options,
                                        providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise QuantkitError(f"ONNX Runtime cannot load segment {index} of the "
                                f"model: {exc}") from None


def load_weightless(onnx_path: Path, tmp: Path) -> Any:
    """The model's graph, its large initializers referring to external-data files in ``tmp``.

    Weights embedded in the file are written once to ``tmp/weights.bin`` and the model is read
    back without them: a protobuf frees nothing until the whole message goes, so clearing the
    fields in place would keep the full model in memory next to ONNX Runtime's copy. The files of
    a model that already uses external data are hard-linked into ``tmp`` instead (copied
    across filesystems): ONNX Runtime refuses external data that resolves outside the folder
    of the model it loads, symbolic links included.
    """
    import onnx
    from onnx.external_data_helper import convert_model_to_external_data

    from quantkit.onnx_io import link_external_data

    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as exc:  # protobuf DecodeError and friends
        raise QuantkitError(f"cannot read ONNX model {onnx_path}: {exc}") from None
    link_external_data(model, onnx_path.parent, tmp)
    if any(t.HasField("raw_data") and len(t.raw_data) >= 1024 for t in model.graph.initializer):
        convert_model_to_external_data(model, all_tensors_to_one_file=True,
                                       location="weights.bin", size_threshold=1024)
        onnx.save_model(model, str(tmp / "weightless.onnx"))
        del model
        gc.collect()
        release_freed_memory()
        model = onnx.load(str(tmp / "weightless.onnx"), load_external_data=False)
    return model


def release_freed_memory() -> None:
    """Hand memory freed by the C heap back to the system (glibc only; a no-op elsewhere)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def collect_activation_stats(
    onnx_path: str | Path,
    batches: Iterable[Mapping[str, np.ndarray]],
    tensors: str = "all",
    num_bins: int = DEFAULT_NUM_BINS,
    progress: ProgressFn | None = None,
    *,
    max_tensors_per_segment: int = DEFAULT_MAX_TENSORS_PER_SEGMENT,
    activation_budget: int = DEFAULT_ACTIVATION_BUDGET,
    num_threads: int | None = None,
    data: dict[str, Any] | None = None,
    model_hash: str | None = None,
    background: bool = False,
    segment_weight_bytes: int | None = None,
) -> ActivationStats:
    """Histograms of the model's activations over ``batches`` (see the module docs).

    ``batches`` yields dicts of int64 arrays ``[batch, seq]`` keyed by graph input name (e.g.
    ``input_ids``, ``attention_mask``); each batch is consumed and dropped. ``progress`` is
    called after each batch with (batches done, tokens done). ``data`` describes the calibration
    data for the record; ``model_hash`` defaults to the hash of the ONNX file (and its external
    data). ``background``: histogram on a second thread while ONNX Runtime runs the next
    segment (same numbers; off by default: on 2 cores, where ONNX Runtime already uses both,
    it bought nothing: SmolLM2, --tensors all, 67.0 vs 68.1 s and 66.8 vs 60.6 s).
    ``segment_weight_bytes``: layer by layer (see ``run_layer_by_layer``), in segments of at
    most that many bytes of weights, one loaded at a time; memory then holds one segment's
    weights instead of the model's, plus what the sequences carry between segments.
    """
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise QuantkitError(f"ONNX model {onnx_path} not found")
    if model_hash is None:
        from quantkit.export import onnx_model_hash

        model_hash = onnx_model_hash(onnx_path)
    with contextlib.ExitStack() as cleanup:
        # the segment files outlive the set-up when segments are loaded one at a time
        tmp = cleanup.enter_context(tempfile.TemporaryDirectory(prefix="quantkit-calib-"))
        model = load_weightless(onnx_path, Path(tmp))
        info = analyse(model)
        selected = select_tensors(info, tensors)
        if not selected:
            raise QuantkitError(f"the model has no floating-point activations to calibrate "
                                f"(tensors={tensors!r})")
        roots_of = alias_roots(info, selected)
        states: dict[str, _Root] = {}
        skipped: dict[str, str] = {}
        for name in selected:
            root = roots_of[name]
            if info.elem_types.get(root) == 16:
                skipped[name] = "bfloat16 tensors are not supported by the collector"
                continue
            states.setdefault(root, _Root(num_bins))
        fetched = [r for r in states if r not in info.inputs]
        runner = SegmentRunner(Path(tmp), model, info, fetched, max_tensors_per_segment,
                               num_threads, segment_weight_bytes)
        fixed_rows = _fixed_batch(model, info)
        del model
        if fixed_rows is not None and fixed_rows != 1 and runner.layer_by_layer:
            raise QuantkitError("layer-by-layer calibration runs one sequence at a time; this "
                                f"model's inputs fix the batch size at {fixed_rows}",
                                "export with a dynamic batch size")
        if not runner.layer_by_layer:
            cleanup.close()  # every session holds its weights: the files can go

        with _Histogrammer(states, background) as histogrammer:
            if runner.layer_by_layer:
                counts, peak = _run_layers(runner, batches, histogrammer, info, progress)
            else:
                counts, peak = _run_batches(runner, batches, histogrammer, info, fixed_rows,
                                            activation_budget, progress)
    num_batches, num_samples, num_tokens = counts

    histograms: dict[str, StreamingHistogram] = {}
    aliases: dict[str, str] = {}
    for name in selected:
        if name in skipped:
            continue
        root = roots_of[name]
        state = states[root]
        if root != name:
            aliases[name] = root
        reason = state.skip or _constant_reason(state)
        if reason is not None:
            skipped[name] = reason if root == name else f"{reason} (same values as {root})"
        else:
            histograms[name] = state.hist
    return ActivationStats(
        histograms=histograms, skipped=skipped, aliases=aliases, num_batches=num_batches,
        num_samples=num_samples, num_tokens=num_tokens, tensors=tensors, num_bins=num_bins,
        model_hash=model_hash, data=dict(data or {}), peak_activation_bytes=peak,
    )


def _run_batches(runner: SegmentRunner, batches: Iterable[Mapping[str, np.ndarray]],
                 histogrammer: _Histogrammer, info: GraphInfo, fixed_rows: int | None,
                 activation_budget: int, progress: ProgressFn | None,
                 ) -> tuple[tuple[int, int, int], int]:
    """Every batch through the model in sub-batches; (batches, samples, tokens) and the most
    activation bytes alive at once."""
    input_dtypes = {name: _np_dtype(t) for name, t in info.inputs.items()}
    num_batches = num_samples = num_tokens = 0
    peak = 0
    rows_per_run = 1
    probed_shape: tuple[int, ...] | None = None
    for batch in batches:
        feed = _check_batch(batch, input_dtypes, num_batches)
        rows = next(iter(feed.values())).shape[0]
        shape = next(iter(feed.values())).shape[1:]
        if shape != probed_shape:  # new sequence length: measure one row again
            rows_per_run, probed_shape = 1, shape
        start = 0
        while start < rows:
            take = min(rows_per_run if fixed_rows is None else fixed_rows, rows - start)
            sub = {k: np.ascontiguousarray(v[start : start + take]) for k, v in feed.items()}
            run_peak = _run_once(runner, sub, histogrammer)
            peak = max(peak, run_peak)
            per_row = max(1, run_peak // take)
            limit = rows if fixed_rows is None else fixed_rows
            rows_per_run = max(1, min(limit, activation_budget // per_row))
            start += take
        num_batches += 1
        num_samples += rows
        mask = feed.get("attention_mask")
        num_tokens += int(mask.sum()) if mask is not None else int(next(iter(feed.values())).size)
        del feed, batch
        if progress is not None:
            progress(num_batches, num_tokens)
    if num_batches == 0:
        raise QuantkitError("no calibration batches: the data yielded nothing",
                            "check --dataset / --num-samples")
    histogrammer.wait()
    return (num_batches, num_samples, num_tokens), peak


def _constant_reason(state: _Root) -> str | None:
    if state.hist.total == 0 and state.hist.nan_count == 0:
        return "empty: the tensor had no elements"
    if not state.constant:
        return None
    values = sorted(state.const_values)
    if len(values) == 1:
        return f"constant: every element is {values[0]:.6g}"
    return (f"constant within each batch ({len(values)} different values, "
            f"{values[0]:.6g} to {values[-1]:.6g})")


def _fixed_batch(model: Any, info: GraphInfo) -> int | None:
    """The batch size the model's inputs fix (None if dynamic)."""
    for vi in model.graph.input:
        if vi.name in info.inputs and vi.type.tensor_type.HasField("shape"):
            dims = vi.type.tensor_type.shape.dim
            if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0:
                return int(dims[0].dim_value)
    return None


def _check_batch(batch: Mapping[str, np.ndarray], dtypes: dict[str, np.dtype],
                 index: int) -> dict[str, np.ndarray]:
    if not isinstance(batch, Mapping):
        raise QuantkitError(f"calibration batch {index} is a {type(batch).__name__}, "
                            "not a dict of arrays")
    missing = [n for n in dtypes if n not in batch]
    if missing:
        raise QuantkitError(f"calibration batch {index} lacks model input(s) {missing}",
                            f"it has: {', '.join(batch) or 'nothing'}")
    feed: dict[str, np.ndarray] = {}
    rows = None
    for name, dtype in dtypes.items():
        arr = np.asarray(batch[name])
        if arr.dtype != dtype:
            if arr.dtype.kind in "iub" and dtype.kind in "iu":
                arr = arr.astype(dtype)
            else:
                raise QuantkitError(f"calibration batch {index}: '{name}' is {arr.dtype}, "
                                    f"the model takes {dtype}")
        if arr.ndim == 0:
            raise QuantkitError(f"calibration batch {index}: '{name}' is a scalar")
        if rows is None:
            rows = arr.shape[0]
        elif arr.shape[0] != rows:
            raise QuantkitError(f"calibration batch {index}: inputs disagree on the batch size")
        feed[name] = arr
    if not rows:
        raise QuantkitError(f"calibration batch {index} has no rows")
    return feed


def _observe(name: str, arr: np.ndarray, state: _Root) -> None:
    """Check one sub-batch of a tensor and add it to the histogram."""
    if state.skip is not None or arr.size == 0:
        return
    flat = arr.reshape(-1)
    lo, hi = float(flat.min()), float(flat.max())
    if math.isnan(lo) or math.isnan(hi):
        raise QuantkitError(f"tensor '{name}' has NaN values",
                            "the model produces NaN on the calibration data; check it in FP32")
    if hi == math.inf:
        raise QuantkitError(f"tensor '{name}' has +Inf values",
                            "the model overflows on the calibration data; check it in FP32")
    if lo <= -MASK_THRESHOLD or hi >= MASK_THRESHOLD:
        big = lo if -lo >= hi else hi
        state.skip = (f"mask: holds {big:.4g} (|x| >= {MASK_THRESHOLD:.0e} or -inf), "
                      "an attention-mask sentinel; keep it in floating point")
        return
    if lo == hi:
        state.const_values.add(lo + 0.0)  # -0.0 and 0.0 are one value
    else:
        state.constant = False
        state.const_values.clear()
    state.hist.update_finite(flat, lo, hi)


class ValueSink(Protocol):
    """Where the segments' roots go as they are made (histograms, GPTQ's Hessians)."""

    pending_bytes: int  # bytes of values handed over and still held

    def start_row(self, index: int) -> None: ...  # layer by layer: the sequence about to run

    def submit(self, values: list[tuple[str, np.ndarray]]) -> None: ...

    def wait(self) -> None: ...


class _Histogrammer:
    """Histograms off the critical path: one worker thread histograms a segment's outputs while
    ONNX Runtime runs the next segment (ONNX Runtime releases the GIL while it runs; NumPy's
    min/max and arithmetic release it too). One job waits at most, so at most two segments'
    activations are alive; jobs run in the order given, so every tensor's histogram sees its
    values in the same order as without the thread, and ends bit for bit the same."""

    def __init__(self, states: dict[str, _Root], background: bool = False) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.states = states

        self._pool = (ThreadPoolExecutor(max_workers=1, thread_name_prefix="quantkit-hist")
                      if background else None)
        self._pending: Any = None
        self.pending_bytes = 0

    def submit(self, values: list[tuple[str, np.ndarray]]) -> None:
        """Histogram the calibrated ones of ``values`` in the background, after the job before
        it is done (at once, in this thread, without a background thread)."""
        self.wait()
        observations = [(name, arr, self.states[name]) for name, arr in values
                        if name in self.states]
        if self._pool is None:
            _observe_all(observations)
        elif observations:
            self.pending_bytes = sum(arr.nbytes for _, arr, _ in observations)
            self._pending = self._pool.submit(_observe_all, observations)

    def start_row(self, index: int) -> None:
        """Histograms do not depend on which sequence a value came from."""

    def wait(self) -> None:
        """Wait for the job in flight; its errors (NaN, Inf) are raised here."""
        pending, self._pending = self._pending, None
        self.pending_bytes = 0
        if pending is not None:
            pending.result()

    def __enter__(self) -> _Histogrammer:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pending is not None:
            self._pending.cancel()
        if self._pool is not None:
            self._pool.shutdown(wait=True)


def _observe_all(observations: list[tuple[str, np.ndarray, _Root]]) -> None:
    for name, arr, state in observations:
        _observe(name, arr, state)


def _run_once(runner: SegmentRunner, feed: dict[str, np.ndarray], histogrammer: _Histogrammer,
              ) -> int:
    """Run all segments on one sub-batch, handing each one's calibrated outputs to the
    histogrammer; returns the most activation bytes alive at once (the outputs still waiting
    for their histograms included)."""
    histogrammer.submit(list(feed.items()))  # float graph inputs are calibrated too
    values: dict[str, Any] = dict(feed)
    live = sum(a.nbytes for a in feed.values())
    peak = live
    for seg, sess in zip(runner.segments, runner.sessions, strict=True):
        live, run_peak = _run_segment(runner, seg, sess, values, live, histogrammer)
        peak = max(peak, run_peak)
    return peak


def _run_segment(runner: SegmentRunner, seg: Any, sess: Any, values: dict[str, Any], live: int,
                 sink: ValueSink) -> tuple[int, int]:
    """Run one segment on ``values`` (updated in place: its outputs later segments read are
    added, the values no later segment reads are dropped) and hand its roots to ``sink``;
    returns the bytes of ``values`` after and the most alive during it."""
    binding = sess.io_binding()
    for name in seg.inputs:
        value = values[name]
        if isinstance(value, np.ndarray):
            binding.bind_cpu_input(name, value)
        else:
            binding.bind_ortvalue_input(name, value)
    for name in seg.outputs:
        binding.bind_output(name, "cpu")
    try:
        sess.run_with_iobinding(binding)
    except Exception as exc:  # onnxruntime's own error types
        raise QuantkitError(f"ONNX Runtime failed on the calibration data (segment "
                            f"{seg.index}): {exc}") from None
    outs = binding.get_outputs()
    keep, roots = runner.keep[seg.index], runner.root_sets[seg.index]
    produced = kept = 0
    observations = []
    for name, ov in zip(seg.outputs, outs, strict=True):
        arr = ov.numpy()
        produced += arr.nbytes
        if name in roots:
            observations.append((name, arr))
        if name in keep:
            # layer by layer a value waits for the next segment while every other sequence
            # runs: a copy of its own, so it holds no ONNX Runtime buffer of this run alive
            values[name] = arr.copy() if runner.layer_by_layer else ov
            kept += arr.nbytes
        del arr
    peak = live + produced + sink.pending_bytes
    sink.submit(observations)
    del observations, outs, binding
    live += kept
    for name in seg.inputs:
        if runner.last_use.get(name) == seg.index and name in values:
            live -= _nbytes(values.pop(name))
    return live, peak


def _run_layers(runner: SegmentRunner, batches: Iterable[Mapping[str, np.ndarray]],
                histogrammer: _Histogrammer, info: GraphInfo, progress: ProgressFn | None,
                ) -> tuple[tuple[int, int, int], int]:
    """Statistics layer by layer (see ``run_layer_by_layer``); ``progress`` is called after
    each segment with the share of the work done, in batches and tokens."""
    rows, num_batches, num_tokens = sequences(batches, info)
    for row in rows:
        histogrammer.submit(list(row.items()))  # float graph inputs are calibrated too

    def done(seg: Any) -> None:
        if progress is not None:
            share = (seg.index + 1) / len(runner.segments)
            progress(round(num_batches * share), round(num_tokens * share))

    peak = run_layer_by_layer(runner, rows, histogrammer, done)
    histogrammer.wait()
    return (num_batches, len(rows), num_tokens), peak


def sequences(batches: Iterable[Mapping[str, np.ndarray]], info: GraphInfo,
              ) -> tuple[list[dict[str, Any]], int, int]:
    """Every row of ``batches`` as a feed of its own; and the numbers of batches and tokens."""
    input_dtypes = {name: _np_dtype(t) for name, t in info.inputs.items()}
    rows: list[dict[str, Any]] = []
    num_batches = num_tokens = 0
    for batch in batches:
        feed = _check_batch(batch, input_dtypes, num_batches)
        count = next(iter(feed.values())).shape[0]
        rows.extend({k: np.ascontiguousarray(v[r:r + 1]) for k, v in feed.items()}
                    for r in range(count))
        num_batches += 1
        mask = feed.get("attention_mask")
        num_tokens += int(mask.sum()) if mask is not None else int(next(iter(feed.values())).size)
    if num_batches == 0:
        raise QuantkitError("no calibration batches: the data yielded nothing",
                            "check --dataset / --num-samples")
    return rows, num_batches, num_tokens


def run_layer_by_layer(runner: SegmentRunner, rows: list[dict[str, Any]], sink: ValueSink,
                       done: Callable[[Any], None] | None = None) -> int:
    """Each segment over every sequence before the next is loaded, so only one segment's
    weights are in memory at a time; what later segments read (the residual stream, masks,
    rotary tables) is kept for every sequence between them (``rows`` are updated in place). One
    sequence per run; each root reaches ``sink`` sequence by sequence in ``rows`` order, as in
    ``_run_batches`` with one row per run (so the histograms are the same). ``done(segment)``
    after each segment, once ``sink`` has every value of it. Returns the most activation
    bytes alive at once."""
    carried = [sum(a.nbytes for a in row.values()) for row in rows]
    peak = sum(carried)
    for seg in runner.segments:
        sess = runner.open(seg.index)
        for i, values in enumerate(rows):
            before = sum(carried) - carried[i]
            sink.start_row(i)
            carried[i], run_peak = _run_segment(runner, seg, sess, values, carried[i], sink)
            peak = max(peak, before + run_peak)
        del sess
        release_freed_memory()
        if done is not None:
            sink.wait()
            done(seg)
    return peak


