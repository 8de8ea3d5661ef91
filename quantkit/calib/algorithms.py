"""Range algorithms: a StreamingHistogram (+ parameters) in, amax out. One registry by name.

Adding an algorithm touches this file only::

    @register("myalgo")
    def myalgo(hist: StreamingHistogram, *, some_param: float = 1.0) -> float:
        '''One line that ``quantkit calibrate --help`` and error messages show.'''
        ...

Its keyword-only parameters (with defaults) are the parameters it accepts; anything else is a
user error. Algorithms never see an empty histogram: :func:`compute_amax` checks that first.

``entropy`` is TensorRT's EntropyCalibration2 as NVIDIA describes it (GTC 2017, S7310) and as
NVIDIA's pytorch-quantization implements it (``calib/histogram.py``, ``_compute_amax_entropy``);
see :func:`entropy_divergences` for the exact formulation and the two documented differences.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from quantkit.calib.histogram import StreamingHistogram
from quantkit.errors import QuantkitError

AlgorithmFn = Callable[..., float]


@dataclass(frozen=True)
class Algorithm:
    name: str
    fn: AlgorithmFn
    defaults: dict[str, Any] = field(default_factory=dict)
    description: str = ""

    def resolve_params(self, params: dict[str, Any]) -> dict[str, Any]:
        """Defaults overlaid with ``params``; unknown names are a user error."""
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            accepted = ", ".join(sorted(self.defaults)) or "none"
            raise QuantkitError(
                f"calibration method '{self.name}' has no parameter {', '.join(unknown)}",
                f"it accepts: {accepted}",
            )
        return {**self.defaults, **params}

    def __call__(self, hist: StreamingHistogram, **params: Any) -> float:
        return compute_amax(hist, self, **params)


_REGISTRY: dict[str, Algorithm] = {}


def register(name: str) -> Callable[[AlgorithmFn], AlgorithmFn]:
    """Register ``fn(hist, *, param=default, ...) -> amax`` under ``name``."""

    def decorator(fn: AlgorithmFn) -> AlgorithmFn:
        if name in _REGISTRY:
            raise ValueError(f"calibration algorithm '{name}' is already registered")
        sig = inspect.signature(fn)
        defaults: dict[str, Any] = {}
        for pname, param in list(sig.parameters.items())[1:]:
            if param.kind is not inspect.Parameter.KEYWORD_ONLY or param.default is param.empty:
                raise TypeError(f"{fn.__name__}: parameter '{pname}' must be keyword-only "
                                "with a default")
            defaults[pname] = param.default
        doc = (fn.__doc__ or "").strip().splitlines()
        _REGISTRY[name] = Algorithm(name, fn, defaults, doc[0] if doc else "")
        return fn

    return decorator


def get_algorithm(name: str) -> Algorithm:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise QuantkitError(
            f"unknown calibration method '{name}'",
            f"available: {', '.join(available_algorithms())}",
        ) from None


def available_algorithms() -> list[str]:
    return sorted(_REGISTRY)


def compute_amax(hist: StreamingHistogram, algorithm: str | Algorithm, **params: Any) -> float:
    """amax of ``hist`` by the named algorithm; a histogram without nonzero data is an error."""
    algo = get_algorithm(algorithm) if isinstance(algorithm, str) else algorithm
    resolved = algo.resolve_params(params)
    if hist.total == 0 or hist.amax == 0.0 or hist.bin_width is None:
        raise ValueError("histogram holds no nonzero finite values")
    amax = float(algo.fn(hist, **resolved))
    if not (math.isfinite(amax) and amax > 0.0):
        raise ValueError(f"{algo.name} gave amax {amax}")
    return amax


# ====================================================================== minmax
@register("minmax")
def minmax(hist: StreamingHistogram) -> float:
    """Largest |x| seen: no clipping (TensorRT MinMaxCalibration)."""
    return hist.amax


# ====================================================================== percentile
@register("percentile")
def percentile(hist: StreamingHistogram, *, percentile: float = 99.99) -> float:
    """Upper edge of the bin where the cumulative share of |x| reaches the percentile."""
    return percentile_amax(hist.counts, hist.edges, percentile, hist.amax)


def percentile_amax(counts: np.ndarray, edges: np.ndarray, pct: float, amax: float) -> float:
    """The upper edge of the bin in which the CDF reaches ``pct`` %, capped at ``amax``.

    pytorch-quantization returns that bin's *lower* edge; the upper edge keeps at least ``pct`` %
    of the values inside the range, and percentile 100 then equals minmax exactly.
    """
    if not 0.0 < pct <= 100.0:
        raise QuantkitError(f"percentile must be in (0, 100], got {pct}")
    cdf = np.cumsum(counts, dtype=np.float64)
    idx = int(np.searchsorted(cdf, cdf[-1] * (pct / 100.0), side="left"))
    idx = min(idx, len(counts) - 1)
    return float(min(edges[idx + 1], amax))


# ====================================================================== entropy
@register("entropy")
def entropy(
    hist: StreamingHistogram, *, start_bin: int = 128, num_levels: int = 128, stride: int = 1
) -> float:
    """TensorRT EntropyCalibration2: the threshold minimising KL(P || Q) (exact, vectorised)."""
    i = entropy_threshold_bin(hist.counts, start_bin=start_bin, num_levels=num_levels,
                              stride=stride)
    return float(hist.edges[i])


# Two thresholds whose divergences differ by less than this (relative to the divergence scale)
# count as tied; ties go to the larger threshold, as in pytorch-quantization (last argmin).
_TIE_RTOL = 1e-12


def entropy_threshold_bin(
    counts: np.ndarray, *, start_bin: int = 128, num_levels: int = 128, stride: int = 1
) -> int:
    """The number of bins ``i`` kept by EntropyCalibration2; amax is ``edges[i]``.

    Ties (within floating-point noise) go to the largest ``i``. A histogram with fewer than
    ``start_bin`` bins has no candidate and keeps all its bins; so does one whose every candidate
    has an infinite divergence.
    """
    cands, kl = entropy_divergences(counts, start_bin=start_bin, num_levels=num_levels,
                                    stride=stride)
    if len(cands) == 0:
        return len(counts)
    finite = np.isfinite(kl)
    if not finite.any():
        return len(counts)
    best = float(kl[finite].min())
    tol = _TIE_RTOL * max(1.0, abs(best))
    ties = np.flatnonzero(finite & (kl <= best + tol))
    return int(cands[ties[-1]])


@functools.lru_cache(maxsize=16)
def _level_bounds(n: int, start_bin: int, num_levels: int, stride: int) -> np.ndarray:
    """``ceil(k * i / num_levels)`` for every candidate i and level edge k (read-only, cached:
    most histograms of a model share their bin count)."""
    cands = np.arange(start_bin, n + 1, stride, dtype=np.int64)
    k = np.arange(num_levels + 1, dtype=np.int64)
    bounds = -((-k[None, :] * cands[:, None]) // num_levels)
    bounds.flags.writeable = False
    return bounds


def entropy_divergences(
    counts: np.ndarray, *, start_bin: int = 128, num_levels: int = 128, stride: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """KL(P || Q) for every candidate number of kept bins ``i = start_bin, ..., len(counts)``.

    The definition (NVIDIA, GTC 2017 S7310; pytorch-quantization ``_compute_amax_entropy``):

    * ``b`` = the counts with bin 0 replaced by bin 1's count (zeros are over-represented in
      activations; pytorch-quantization does this, we follow it);
    * ``P`` = ``b[:i]`` with the mass of all later bins (the clipped outliers) added to ``P[i-1]``;
    * ``Q``: bin ``j < i`` belongs to level ``floor(num_levels * j / i)`` (exact integer
      arithmetic; pytorch-quantization's ``np.digitize`` on a ``linspace`` gives the same levels
      when ``num_levels`` is a power of two, as the default 128 is); each level's mass
      (``b[:i]`` only, without the outliers) is spread evenly over the level's *non-empty* bins;
      empty bins get 0;
    * both normalised; ``KL = sum p log(p / q)`` with ``0 log 0 = 0`` and ``p > 0, q = 0 -> inf``.

    Vectorised over all candidates at once with prefix sums: for candidate ``i`` and level ``k``
    covering bins ``[s, e)`` (``s = ceil(k i / L)``), the level contributes
    ``sum_j b_j log b_j - M log(M / m)`` (``M`` its mass, ``m`` its non-empty bins); then the last
    bin's term is corrected for the outlier mass, and ``KL = D / T + log(C_i / T)`` with ``T`` the
    total and ``C_i`` the mass of the first ``i`` bins (the normalisations of P and Q).

    Differences from pytorch-quantization, both in degenerate cases: a candidate whose first ``i``
    bins are all empty gives 0/0 (NaN) there, and ``np.argmin`` would pick a NaN; here it is
    +inf (never chosen). Ties are decided with a relative tolerance of 1e-12 rather than bitwise
    equality of the floating-point sums, since the two formulations round differently.
    """
    b = np.asarray(counts, dtype=np.float64).copy()
    n = len(b)
    if start_bin < 1 or num_levels < 1 or stride < 1:
        raise QuantkitError("entropy: start_bin, num_levels and stride must be positive")
    if n < start_bin:
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    if n > 1:
        b[0] = b[1]
    total = b.sum()
    cands = np.arange(start_bin, n + 1, stride, dtype=np.int64)
    if total <= 0:
        return cands, np.full(len(cands), np.inf)

    # Prefix sums of the counts, of the non-empty bins and of b*log(b).
    nonzero = b > 0
    cum_b = np.concatenate([[0.0], np.cumsum(b)])
    cum_nz = np.concatenate([[0.0], np.cumsum(nonzero, dtype=np.float64)])
    blogb = np.where(nonzero, b * np.log(np.where(nonzero, b, 1.0)), 0.0)
    cum_blogb = np.concatenate([[0.0], np.cumsum(blogb)])

    # Level k of candidate i covers bins [bounds[i, k], bounds[i, k+1]); per-level sums are
    # differences of the prefix sums, gathered for every (candidate, level) at once.
    bounds = _level_bounds(n, start_bin, num_levels, stride)

    def level_sums(prefix: np.ndarray) -> np.ndarray:
        at = prefix[bounds]
        return at[:, 1:] - at[:, :-1]

    mass, nbins, seg_blogb = level_sums(cum_b), level_sums(cum_nz), level_sums(cum_blogb)
    # log of Q's value on the level's non-empty bins (0 for an empty level, whose mass is 0)
    log_q = np.log(np.where(mass > 0, mass, 1.0) / np.maximum(nbins, 1.0))
    div = (seg_blogb - mass * log_q).sum(axis=1)

    # Correct the last kept bin j = i-1, whose P also carries the outliers beyond i.
    kept = cum_b[cands]
    outliers = np.maximum(total - kept, 0.0)
    last = b[cands - 1]
    last_level = (num_levels * (cands - 1)) // cands
    log_q_last = log_q[np.arange(len(cands)), last_level]
    has_out = outliers > 0
    infinite = has_out & (last == 0)
    fix = has_out & (last > 0)
    if fix.any():
        lf, of, lq = last[fix], outliers[fix], log_q_last[fix]
        div[fix] += (lf + of) * np.log(lf + of) - lf * np.log(lf) - of * lq
    with np.errstate(divide="ignore"):
        kl = div / total + np.log(kept / total)
    kl[infinite] = np.inf
    kl[kept <= 0] = np.inf
    return cands, kl


# ====================================================================== mse
@register("mse")
def mse(hist: StreamingHistogram, *, start_bin: int = 128, stride: int = 1,
        num_bits: int = 8) -> float:
    """The bin centre minimising the histogram-weighted squared error of INT8 fake quantization."""
    return mse_amax(hist.counts, hist.edges, start_bin=start_bin, stride=stride,
                    num_bits=num_bits)


def mse_amax(counts: np.ndarray, edges: np.ndarray, *, start_bin: int = 128, stride: int = 1,
             num_bits: int = 8) -> float:
    """pytorch-quantization's ``_compute_amax_mse``: candidates are the bin centres
    ``start_bin, ..., len(counts) - 1``; each value (a bin centre, weighted by its count) is
    quantized symmetrically with ``scale = (2^(bits-1) - 1) / amax``, round half to even, clipped
    at the top level; the first candidate with the smallest weighted squared error wins.
    Vectorised in blocks of candidates; only non-empty bins enter the sums. Computed in float64
    (pytorch-quantization uses float32 on the GPU, so near-ties may resolve differently).
    """
    counts = np.asarray(counts, dtype=np.float64)
    centers = (edges[1:] + edges[:-1]) / 2.0
    n = len(counts)
    if n <= start_bin:
        return float(edges[-1])
    top = float(2 ** (num_bits - 1) - 1)
    cands = np.arange(start_bin, n, stride)
    nz = counts > 0
    c, w = centers[nz], counts[nz]
    errors = np.empty(len(cands))
    block = max(1, (1 << 22) // max(1, len(c)))
    for s in range(0, len(cands), block):
        amax = centers[cands[s : s + block]][:, None]
        scale = top / amax
        q = np.minimum(np.rint(c[None, :] * scale), top) / scale
        errors[s : s + block] = ((q - c[None, :]) ** 2 * w[None, :]).sum(axis=1)
    return float(centers[cands[int(np.argmin(errors))]])
