"""Latency grid and peak memory, on a real tiny engine (numbers, never wall-clock thresholds)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from quantkit.backends.base import Engine
from quantkit.errors import QuantkitError
from quantkit.eval.latency import (
    GridPoint,
    PeakMemory,
    check_grid,
    latency_feeds,
    measure_latency,
    parse_grid,
    summarize,
)


def test_parse_grid() -> None:
    assert parse_grid("1x128, 4X512,1x128") == [GridPoint(1, 128), GridPoint(4, 512)]
    assert parse_grid("none") == [] and parse_grid("") == []
    for bad in ("1x", "128", "1x128;2x2", "0x128", "ax1"):
        with pytest.raises(QuantkitError):
            parse_grid(bad)


def test_grid_beyond_positions_is_refused() -> None:
    check_grid([GridPoint(1, 256)], 256)
    with pytest.raises(QuantkitError, match="1x512 is beyond the model's limit of 256"):
        check_grid([GridPoint(1, 128), GridPoint(1, 512)], 256)


def test_summarize_percentiles_and_throughput() -> None:
    seconds = [i / 1000 for i in range(1, 101)]  # 1 .. 100 ms
    point = summarize(seconds, batch=2, seq=64, warmup=3)
    assert (point.iterations, point.warmup) == (100, 3)
    assert point.p50_ms == pytest.approx(50.5)
    assert point.p90_ms == pytest.approx(90.1)
    assert point.p99_ms == pytest.approx(99.01)
    assert point.mean_ms == pytest.approx(50.5)
    assert (point.min_ms, point.max_ms) == pytest.approx((1.0, 100.0))
    assert point.tokens_per_s == pytest.approx(128 / 0.0505)


def test_feeds_are_seeded_and_in_vocab() -> None:
    a, b = latency_feeds(2, 16, 100), latency_feeds(2, 16, 100)
    assert np.array_equal(a["input_ids"], b["input_ids"])
    assert a["input_ids"].shape == (2, 16) and a["input_ids"].max() < 100
    assert not np.array_equal(a["input_ids"], latency_feeds(2, 16, 100, seed=1)["input_ids"])


def test_measure_latency_on_engine(llama_engine: Path) -> None:
    grid = [GridPoint(1, 16), GridPoint(2, 32)]
    with Engine.load(llama_engine).runner(threads=1) as runner:
        points = measure_latency(runner, grid, vocab_size=256, warmup=1, iterations=5)
        with pytest.raises(QuantkitError, match="iterations must be at least 1"):
            measure_latency(runner, grid, 256, warmup=0, iterations=0)
    assert [(p.batch, p.seq, p.iterations, p.warmup) for p in points] == [(1, 16, 5, 1),
                                                                          (2, 32, 5, 1)]
    for p in points:
        assert 0 < p.min_ms <= p.p50_ms <= p.p90_ms <= p.p99_ms <= p.max_ms
        assert p.min_ms <= p.mean_ms <= p.max_ms
        assert p.tokens_per_s == pytest.approx(p.batch * p.seq / (p.mean_ms / 1e3))


def test_peak_memory_sees_an_allocation() -> None:
    size = 200 << 20
    with PeakMemory() as memory:
        block = np.ones(size, dtype=np.uint8)  # touched, so resident
        del block
    assert memory.peak_bytes is not None and memory.baseline_bytes is not None
    assert memory.method
    if memory.method.startswith("VmHWM"):  # resettable high-water mark: the delta is this block
        assert memory.delta_bytes is not None and memory.delta_bytes >= 0.9 * size
    with PeakMemory() as small:
        np.ones(1 << 20, dtype=np.uint8)
    if small.method.startswith("VmHWM"):  # the mark was reset: the earlier 200 MB is not seen
        assert small.delta_bytes is not None and small.delta_bytes < 0.5 * size


class _Recorder:
    """A runner that records the order of its timed runs."""

    def __init__(self, name: str, log: list[str]) -> None:
        self.name, self.log = name, log

    def benchmark(self, feeds, warmup: int, iterations: int) -> list[float]:
        self.log.append(f"{self.name}{'w' * warmup}{iterations}")
        return [0.001 * (1 + len(self.log))] * iterations


def test_engines_are_timed_interleaved_with_the_order_rotated() -> None:
    from quantkit.eval.latency import interleaved_times, measure_latency_interleaved

    log: list[str] = []
    runners = [_Recorder("a", log), _Recorder("b", log), _Recorder("c", log)]
    times = interleaved_times(runners, {}, warmup=2, iterations=5, block=2)
    # warm-up (2 runs each, dropped), then rounds a b c / b c a / c a b, each engine one
    # untimed settling run ("w") and up to 2 timed runs
    assert log == ["aw1", "bw1", "cw1", "aw2", "bw2", "cw2", "bw2", "cw2", "aw2",
                   "cw1", "aw1", "bw1"]
    assert [len(t) for t in times] == [5, 5, 5]
    log.clear()
    alone = interleaved_times(runners[:1], {}, warmup=0, iterations=4)
    assert log == ["a3", "a1"] and len(alone[0]) == 4  # one engine: nothing to settle
    points = measure_latency_interleaved(runners[:2], [GridPoint(1, 8), GridPoint(2, 4)],
                                         vocab_size=10, warmup=0, iterations=2)
    assert [[(p.batch, p.seq, p.iterations) for p in row] for row in points] == [
        [(1, 8, 2), (2, 4, 2)], [(1, 8, 2), (2, 4, 2)]]
    with pytest.raises(QuantkitError, match="iterations must be at least 1"):
        measure_latency_interleaved(runners, [GridPoint(1, 8)], 10, 0, 0)
