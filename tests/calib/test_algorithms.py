from __future__ import annotations

import numpy as np
import pytest
from calib_reference import entropy_divergences_loop, entropy_threshold_bin_loop, mse_amax_loop

from quantkit.calib import algorithms
from quantkit.calib.algorithms import (
    available_algorithms,
    compute_amax,
    entropy_divergences,
    entropy_threshold_bin,
    get_algorithm,
    mse_amax,
    register,
)
from quantkit.calib.histogram import StreamingHistogram
from quantkit.errors import QuantkitError


def hist_of(values, num_bins=2048) -> StreamingHistogram:
    h = StreamingHistogram(num_bins)
    h.update(np.asarray(values, dtype=np.float32))
    return h


def random_histograms(seed: int):
    """Histograms of the kinds calibration meets: smooth, heavy-tailed, sparse and spiky."""
    rng = np.random.default_rng(seed)
    yield "normal", hist_of(rng.standard_normal(100_000)).counts
    yield "student-t", hist_of(rng.standard_t(2, 100_000)).counts
    yield "cauchy", hist_of(rng.standard_cauchy(100_000)).counts
    yield "laplace-cubed", hist_of(rng.laplace(size=50_000) ** 3).counts
    yield "softmax-like", hist_of(rng.dirichlet(np.full(512, 0.05), 200).ravel()).counts
    yield "sparse-random", rng.integers(0, 100, 2048) * (rng.random(2048) < 0.3)
    spiky = rng.integers(1, 5, 2048) * (rng.random(2048) < 0.05)
    spiky[:4] = rng.integers(10, 50, 4)  # mass near zero, as activations have
    spiky[rng.choice(2048, 12, replace=False)] += rng.integers(500, 5000, 12)
    yield "spiky", spiky
    yield "grown", hist_of(rng.standard_normal(3000) * 1.7, num_bins=2048).counts[:2300]


@pytest.mark.parametrize("seed", range(2))
def test_vectorised_entropy_matches_the_loop_reference(seed):
    for name, counts in random_histograms(seed):
        ref_cands, ref_kl = entropy_divergences_loop(counts)
        last_argmin = len(ref_kl) - 1 - int(np.argmin(ref_kl[::-1]))  # pytorch-quantization
        assert entropy_threshold_bin(counts) == ref_cands[last_argmin], name
        cands, kl = entropy_divergences(counts)
        np.testing.assert_array_equal(cands, ref_cands)
        finite = np.isfinite(ref_kl)
        np.testing.assert_array_equal(np.isfinite(kl), finite, err_msg=name)
        np.testing.assert_allclose(kl[finite], ref_kl[finite], rtol=1e-9, atol=1e-12,
                                   err_msg=name)


@pytest.mark.parametrize("stride,start", [(3, 128), (1, 300), (7, 64)])
def test_entropy_stride_and_start_match_the_reference(stride, start):
    counts = hist_of(np.random.default_rng(9).standard_t(3, 50_000)).counts
    got = entropy_threshold_bin(counts, start_bin=start, stride=stride)
    assert got == entropy_threshold_bin_loop(counts, start_bin=start, stride=stride)


def test_entropy_ties_go_to_the_largest_threshold():
    # Isolated single spikes: for many thresholds Q equals P exactly (KL 0): keep the most bins.
    counts = np.zeros(1024, dtype=np.int64)
    counts[[0, 1, 40, 300, 700]] = [7, 7, 9, 2, 1]
    ref = entropy_threshold_bin_loop(counts)
    assert entropy_threshold_bin(counts) == ref
    _, kl = entropy_divergences(counts)
    assert kl.min() == pytest.approx(0.0, abs=1e-12)


def test_documented_difference_when_the_first_bins_are_empty():
    # All mass far from zero: the first i bins can be empty, Q sums to 0 (scipy: NaN).
    counts = np.zeros(512, dtype=np.int64)
    counts[400:] = 10
    _, ref_kl = entropy_divergences_loop(counts)
    assert np.isnan(ref_kl).any()
    _, kl = entropy_divergences(counts)
    assert not np.isnan(kl).any() and np.isinf(kl[np.isnan(ref_kl)]).all()
    assert entropy_threshold_bin(counts) == 512  # no clipping into the empty region


def test_entropy_keeps_everything_for_uniform_data_and_clips_heavy_tails():
    rng = np.random.default_rng(5)
    uniform = hist_of(rng.uniform(-1, 1, 200_000))
    assert compute_amax(uniform, "entropy") >= 0.95 * uniform.amax
    heavy = hist_of(rng.standard_t(2, 200_000))
    assert compute_amax(heavy, "entropy") < 0.2 * heavy.amax


def test_amax_per_method_is_ordered_on_a_heavy_tailed_distribution():
    rng = np.random.default_rng(6)
    h = hist_of(rng.standard_t(3, 500_000))
    amax = {m: compute_amax(h, m) for m in ("minmax", "percentile", "entropy", "mse")}
    assert amax["minmax"] == h.amax
    assert amax["minmax"] >= amax["percentile"]
    assert compute_amax(h, "percentile", percentile=99.0) < amax["percentile"]
    # entropy and mse clip the tail well below the extreme value
    assert amax["entropy"] < 0.5 * amax["minmax"]
    assert amax["mse"] < 0.5 * amax["minmax"]
    # ... but keep the bulk: more than 99% of |x| lies below either
    values = np.abs(rng.standard_t(3, 500_000))
    for method in ("entropy", "mse"):
        assert np.mean(values <= amax[method]) > 0.99, method


def test_percentile_100_is_minmax_and_bounds_are_checked():
    h = hist_of(np.random.default_rng(7).standard_normal(10_000))
    assert compute_amax(h, "percentile", percentile=100.0) == h.amax
    with pytest.raises(QuantkitError, match="percentile"):
        compute_amax(h, "percentile", percentile=0.0)


def test_percentile_keeps_at_least_that_share_of_values():
    rng = np.random.default_rng(8)
    values = rng.exponential(size=100_000).astype(np.float32)
    h = hist_of(values)
    for pct in (50.0, 90.0, 99.9):
        amax = compute_amax(h, "percentile", percentile=pct)
        share = np.mean(values <= amax) * 100
        assert pct <= share <= pct + 100 * (h.counts.max() / h.total) + 0.01


@pytest.mark.parametrize("seed", range(2))
def test_vectorised_mse_matches_the_loop_reference(seed):
    for name, counts in random_histograms(seed):
        edges = np.arange(len(counts) + 1, dtype=np.float64) * 0.01
        assert mse_amax(counts, edges) == mse_amax_loop(counts, edges), name


def test_registry():
    assert {"entropy", "minmax", "percentile", "mse"} <= set(available_algorithms())
    assert get_algorithm("percentile").defaults == {"percentile": 99.99}
    with pytest.raises(QuantkitError, match="unknown calibration method 'kl'"):
        get_algorithm("kl")
    h = hist_of([1.0, 2.0])
    with pytest.raises(QuantkitError, match="no parameter"):
        compute_amax(h, "minmax", percentile=3)
    with pytest.raises(ValueError, match="no nonzero"):
        compute_amax(StreamingHistogram(), "minmax")


def test_registering_an_algorithm_takes_one_function():
    try:
        @register("half-max")
        def half_max(hist: StreamingHistogram, *, fraction: float = 0.5) -> float:
            """A fraction of the largest value."""
            return hist.amax * fraction

        h = hist_of([1.0, -4.0])
        assert compute_amax(h, "half-max") == 2.0
        assert compute_amax(h, "half-max", fraction=0.25) == 1.0
        assert get_algorithm("half-max").description == "A fraction of the largest value."
        with pytest.raises(ValueError, match="already registered"):
            register("half-max")(half_max)
        with pytest.raises(TypeError, match="keyword-only"):
            register("bad")(lambda hist, x: 1.0)
    finally:
        algorithms._REGISTRY.pop("half-max", None)
        algorithms._REGISTRY.pop("bad", None)
