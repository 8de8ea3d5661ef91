from __future__ import annotations

import math

import numpy as np
import pytest

from quantkit.calib.histogram import StreamingHistogram
from quantkit.errors import QuantkitError


def one_shot_counts(values: np.ndarray, width: float, nbins: int) -> np.ndarray:
    """The documented binning, written out plainly: floor(|x| * float32(1/width))."""
    scaled = np.abs(values.astype(np.float32)) * np.float32(1.0 / width)
    return np.bincount(np.floor(scaled).astype(np.int64), minlength=nbins)


def near_edge(values: np.ndarray, edges: np.ndarray, rtol: float = 1e-5) -> int:
    """How many |values| lie within rtol (of the range) of an inner bin edge."""
    a = np.abs(values.astype(np.float64))
    pos = np.searchsorted(edges, a)
    lo = np.abs(a - edges[np.clip(pos - 1, 0, len(edges) - 1)])
    hi = np.abs(edges[np.clip(pos, 0, len(edges) - 1)] - a)
    return int(np.count_nonzero(np.minimum(lo, hi) <= rtol * edges[-1]))


def test_small_example_bins_and_edges():
    h = StreamingHistogram(num_bins=4)
    h.update(np.array([[0.5, -1.5], [2.5, 4.0]], dtype=np.float32))
    assert h.counts.tolist() == [1, 1, 1, 1]  # amax is inside the last bin
    assert h.bin_width == pytest.approx(1.0, rel=1e-5) and h.top >= 4.0
    np.testing.assert_allclose(h.edges, [0.0, 1.0, 2.0, 3.0, 4.0], rtol=1e-5)
    assert (h.amax, h.min, h.max, h.total) == (4.0, -1.5, 4.0, 4)


def test_growth_keeps_width_and_matches_one_shot_histogram():
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal(20_000).astype(np.float32) * s for s in (1.0, 1.5, 0.5, 3.0)]
    h = StreamingHistogram(2048)
    for b in batches:
        h.update(b)
    everything = np.concatenate(batches)
    first_width = float(np.abs(batches[0]).max()) / 2048
    assert h.bin_width == pytest.approx(first_width, rel=1e-5)
    assert len(h.counts) > 2048  # grew by appending bins of the same width
    assert h.top >= h.amax == pytest.approx(float(np.abs(everything).max()))
    assert h.total == int(h.counts.sum()) == everything.size
    np.testing.assert_array_equal(h.counts, one_shot_counts(everything, h.bin_width,
                                                             len(h.counts)))
    # and, up to values within float rounding of an edge, what np.histogram gives
    ref, _ = np.histogram(np.abs(everything.astype(np.float64)), bins=h.edges)
    assert np.abs(ref - h.counts).sum() <= 2 * near_edge(everything, h.edges)


def test_streaming_equals_single_update_with_same_first_batch():
    rng = np.random.default_rng(1)
    first = rng.laplace(size=5000).astype(np.float32)
    rest = [rng.laplace(size=5000).astype(np.float32) * (1 + i) for i in range(5)]
    a = StreamingHistogram(512)
    a.update(first)
    for r in rest:
        a.update(r)
    b = StreamingHistogram(512)
    b.update(first)
    b.update(np.concatenate(rest))
    np.testing.assert_array_equal(a.counts, b.counts)
    assert a.bin_width == b.bin_width


def test_growth_past_max_bins_merges_bins_exactly():
    rng = np.random.default_rng(2)
    tiny = rng.random(1000).astype(np.float32) * 1e-3
    huge = rng.random(1000).astype(np.float32) * 10.0
    h = StreamingHistogram(128, max_bins=1024)
    h.update(tiny)
    h.update(huge)
    assert len(h.counts) <= 1024
    assert h.total == int(h.counts.sum()) == 2000
    assert h.top >= h.amax
    factor = round(h.bin_width / (float(tiny.max()) / 128))
    assert factor > 1
    assert h.bin_width == pytest.approx(factor * float(tiny.max()) / 128, rel=1e-5)
    both = np.concatenate([tiny, huge])
    ref, _ = np.histogram(np.abs(both.astype(np.float64)), bins=h.edges)
    assert np.abs(ref - h.counts).sum() <= 2 * near_edge(both, h.edges)


def test_nan_and_inf_are_counted_apart():
    h = StreamingHistogram(16)
    h.update(np.array([1.0, np.nan, -np.inf, 2.0, np.inf, np.nan, -3.0], dtype=np.float32))
    assert (h.nan_count, h.inf_count, h.total) == (2, 2, 3)
    assert h.amax == 3.0 and h.min == -3.0 and h.max == 2.0
    assert int(h.counts.sum()) == 3
    h.update(np.array([np.nan]))
    assert h.nan_count == 3 and h.total == 3


def test_mask_sized_values_do_not_break_the_histogram():
    h = StreamingHistogram(2048)
    h.update(np.array([0.5, 1.0, 2.0], dtype=np.float32))
    h.update(np.array([np.finfo(np.float32).min, 0.25], dtype=np.float32))
    assert h.total == 5 and int(h.counts.sum()) == 5
    assert len(h.counts) <= h.max_bins
    assert h.amax == pytest.approx(3.4028235e38, rel=1e-6)


def test_zeros_before_the_width_is_known():
    h = StreamingHistogram(8)
    h.update(np.zeros(10, dtype=np.float32))
    assert h.bin_width is None and h.counts[0] == 10 and h.amax == 0.0
    h.update(np.array([8.0, 1.0], dtype=np.float32))
    assert h.bin_width == pytest.approx(1.0, rel=1e-5)
    assert h.counts.tolist() == [11, 0, 0, 0, 0, 0, 0, 1]  # 1.0 is a hair below edge 1


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_dtypes(dtype):
    rng = np.random.default_rng(3)
    x = rng.standard_normal(3000).astype(dtype)
    h = StreamingHistogram(256)
    h.update(x)
    assert h.total == 3000
    assert h.amax == float(np.abs(x).max())
    ref, _ = np.histogram(np.abs(x.astype(np.float64)), bins=h.edges)
    assert np.abs(ref - h.counts).sum() <= 2 * near_edge(x, h.edges, rtol=1e-3)


def test_rejects_integer_arrays():
    with pytest.raises(TypeError):
        StreamingHistogram().update(np.arange(4))


def test_dict_round_trip_and_validation():
    rng = np.random.default_rng(4)
    h = StreamingHistogram(64)
    h.update(rng.standard_normal(500))
    h.update(np.array([np.nan, np.inf]))
    again = StreamingHistogram.from_dict(h.to_dict())
    np.testing.assert_array_equal(again.counts, h.counts)
    assert again.to_dict() == h.to_dict()
    bad = h.to_dict()
    bad["total"] += 1
    with pytest.raises(QuantkitError, match="counts sum"):
        StreamingHistogram.from_dict(bad)
    with pytest.raises(QuantkitError, match="malformed"):
        StreamingHistogram.from_dict({"num_bins": 4})


def test_state_size_does_not_grow_with_updates():
    rng = np.random.default_rng(5)
    h = StreamingHistogram(2048)
    sizes = []
    for _ in range(50):
        batch = np.clip(rng.standard_normal(4096), -4, 4).astype(np.float32)
        batch[0] = 4.0  # every batch spans the same range
        h.update(batch)
        sizes.append(h.nbytes)
    assert h.total == 50 * 4096
    assert sizes == [2048 * 8] * 50


def test_max_bins_bounds_state_whatever_the_data():
    h = StreamingHistogram(256, max_bins=512)
    for k in range(30):
        h.update(np.array([10.0 ** (k - 10)], dtype=np.float64))
    assert len(h.counts) <= 512 and h.total == 30
    assert math.isclose(h.amax, 1e19)
