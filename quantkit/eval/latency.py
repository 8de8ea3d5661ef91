"""Latency over a batch x sequence grid, and the peak memory of an engine's run.

For each grid point the runner gets a batch of random token ids (seeded, so every engine sees the
same inputs) with an all-ones attention mask, runs ``warmup`` untimed iterations and ``iterations``
timed ones through ``Runner.benchmark`` (several engines: interleaved, a few runs of each in
turn after a settling run, ``interleaved_times``): host-to-host wall time
(``time.perf_counter``) for CPU runners, device events for GPU runners that override it. One
iteration is one full forward pass fetching every engine output. Percentiles are numpy's linear
interpolation over the iteration times; tokens/s is ``batch * seq / mean``.

Peak memory is the process's resident set size (Linux ``VmHWM``, the high-water mark). Before an
engine is loaded the mark is reset to the current RSS by writing ``5`` to ``/proc/self/clear_refs``,
so the peak afterwards is this engine's run alone (loading, perplexity, and latency where it is
the only engine timed: several engines are timed together after their own runs);
``peak_rss_delta_bytes`` subtracts the RSS just before loading. Where the mark cannot be reset the
process-lifetime ``ru_maxrss`` is reported instead and the method says so (the peak of an earlier,
larger engine can then hide a later one's).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from quantkit.errors import QuantkitError

LATENCY_SEED = 0


@dataclass(frozen=True)
class GridPoint:
    batch: int
    seq: int

    def __str__(self) -> str:
        return f"{self.batch}x{self.seq}"


def parse_pairs(text: str, what: str, second: str, example: str) -> list[tuple[int, int]]:
    """``"1x128,4x512"`` -> distinct (batch, n) pairs in order, each at least 1; ``what`` names
    the list in errors (``"latency grid"``), ``second`` its second number (``"seq"``)."""
    pairs: list[tuple[int, int]] = []
    for item in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", item)
        if not match:
            raise QuantkitError(f"{what} entry '{item.strip()}' is not BATCHx{second.upper()}",
                                example)
        pair = (int(match.group(1)), int(match.group(2)))
        if min(pair) < 1:
            raise QuantkitError(f"{what} entry '{pair[0]}x{pair[1]}' needs batch and {second} "
                                "of at least 1")
        if pair not in pairs:
            pairs.append(pair)
    return pairs


def parse_grid(text: str) -> list[GridPoint]:
    """``"1x128,4x512"`` -> grid points; ``""`` or ``"none"`` -> no latency measurement."""
    text = text.strip()
    if text.lower() in ("", "none"):
        return []
    return [GridPoint(b, s) for b, s in parse_pairs(text, "latency grid", "seq",
                                                    "e.g. 1x128,1x512")]


def check_grid(grid: Sequence[GridPoint], max_positions: int | None) -> None:
    if max_positions is None:
        return
    too_long = [str(p) for p in grid if p.seq > max_positions]
    if too_long:
        raise QuantkitError(
            f"latency grid {', '.join(too_long)} is beyond the model's limit of "
            f"{max_positions} positions"
        )


@dataclass(frozen=True)
class LatencyPoint:
    batch: int
    seq: int
    warmup: int
    iterations: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    max_ms: float
    tokens_per_s: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize(seconds: Sequence[float], batch: int, seq: int, warmup: int) -> LatencyPoint:
    if not seconds:
        raise QuantkitError("no timed iterations to summarize")
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    mean = float(ms.mean())
    return LatencyPoint(
        batch=batch, seq=seq, warmup=warmup, iterations=len(seconds),
        p50_ms=float(p50), p90_ms=float(p90), p99_ms=float(p99), mean_ms=mean,
        min_ms=float(ms.min()), max_ms=float(ms.max()),
        tokens_per_s=batch * seq / (mean / 1e3) if mean > 0 else float("inf"),
    )


def latency_feeds(batch: int, seq: int, vocab_size: int, seed: int = LATENCY_SEED
                  ) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([seed, batch, seq])
    ids = rng.integers(0, vocab_size, size=(batch, seq), dtype=np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


INTERLEAVE_BLOCK = 3  # timed runs of one engine in a row, after one untimed settling run


def interleaved_times(runners: Sequence[Any], feeds: dict[str, np.ndarray], warmup: int,
                      iterations: int, block: int = INTERLEAVE_BLOCK) -> list[list[float]]:
    """Seconds per timed run of each runner on ``feeds``: ``warmup`` untimed runs each, then
    rounds in which every runner, in an order rotated each round, makes one untimed run and
    then up to ``block`` timed ones, so load from other processes falls on every engine alike.

    The untimed run lets the engine that ran before go quiet: ONNX Runtime's idle worker threads
    spin for a while after a run and take the cores from the next session. Timed one run each
    in turn, a SmolLM2-135M decode step measured 40.0 ms against 19.8 ms in a block of its own,
    and 20.0 ms with the settling run and blocks of 3 (``benchmarks/decode_step.py``, AMD EPYC
    with VNNI, 2 cores)."""
    for runner in runners:
        if warmup:
            runner.benchmark(feeds, warmup - 1, 1)  # ``warmup`` runs in all, every one dropped
    times: list[list[float]] = [[] for _ in runners]
    n = len(runners)
    settle = 1 if n > 1 else 0
    for i in range(-(-iterations // block)):
        for k in range(n):
            j = (i + k) % n
            times[j] += runners[j].benchmark(feeds, settle,
                                             min(block, iterations - len(times[j])))
    return times


def measure_latency_interleaved(runners: Sequence[Any], grid: Sequence[GridPoint],
                                vocab_size: int, warmup: int = 2, iterations: int = 10
                                ) -> list[list[LatencyPoint]]:
    """``measure_latency`` of several active runners at once, interleaved at every grid point
    (``interleaved_times``): the ratios between engines hold on a loaded machine."""
    check_iterations(warmup, iterations)
    points: list[list[LatencyPoint]] = [[] for _ in runners]
    for point in grid:
        feeds = latency_feeds(point.batch, point.seq, vocab_size)
        for j, seconds in enumerate(interleaved_times(runners, feeds, warmup, iterations)):
            points[j].append(summarize(seconds, point.batch, point.seq, warmup))
    return points


def check_iterations(warmup: int, iterations: int) -> None:
    if warmup < 0:
        raise QuantkitError(f"warmup must be 0 or more, got {warmup}")
    if iterations < 1:
        raise QuantkitError(f"iterations must be at least 1, got {iterations}")


def measure_latency(
    runner: Any,
    grid: Sequence[GridPoint],
    vocab_size: int,
    warmup: int = 2,
    iterations: int = 10,
) -> list[LatencyPoint]:
    """Time an active runner at every grid point (see the module docstring)."""
    check_iterations(warmup, iterations)
    points = []
    for point in grid:
        feeds = latency_feeds(point.batch, point.seq, vocab_size)
        seconds = runner.benchmark(feeds, warmup, iterations)
        points.append(summarize(seconds, point.batch, point.seq, warmup))
    return points


# -- memory ------------------------------------------------------------------------------------
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_bytes(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024  # reported in kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def current_rss_bytes() -> int | None:
    return _status_bytes("VmRSS")


class PeakMemory:
    """Peak RSS over a block: ``with PeakMemory() as mem: ...; mem.peak_bytes``."""

    def __init__(self) -> None:
        self.baseline_bytes: int | None = None
        self.peak_bytes: int | None = None
        self.method = ""

    def __enter__(self) -> PeakMemory:
        self.baseline_bytes = current_rss_bytes()
        try:
            _CLEAR_REFS.write_text("5")
            self._reset = _status_bytes("VmHWM") is not None
        except OSError:
            self._reset = False
        return self

    def __exit__(self, *exc: object) -> None:
        if self._reset:
            self.peak_bytes = _status_bytes("VmHWM")
            self.method = "VmHWM (peak RSS, reset via /proc/self/clear_refs before the engine)"
        else:
            import resource
            import sys

            scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux kB
            self.peak_bytes = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale
            self.method = "ru_maxrss (process-lifetime peak RSS; not reset between engines)"

    @property
    def delta_bytes(self) -> int | None:
        if self.peak_bytes is None or self.baseline_bytes is None:
            return None
        return max(0, self.peak_bytes - self.baseline_bytes)
