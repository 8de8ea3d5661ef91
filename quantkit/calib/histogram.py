"""Streaming histograms of |x|, the statistic every range algorithm in quantkit works from.

Binning
-------
Bins are uniform, ``width`` wide, start at 0 and are half-open: bin ``k`` holds
``k*width <= |x| < (k+1)*width``. The first batch with a nonzero value fixes
``width = amax_of_that_batch / num_bins * (1 + 2**-20)``: ``num_bins`` (2048) bins over
``[0, amax]``, as TensorRT and NVIDIA's pytorch-quantization use, widened by a millionth so that
amax falls inside the last bin rather than on its upper edge. A value's bin is
``floor(|x| * (1/width))`` computed in float32 for float16/float32 input and in float64 for float64
input (or when ``1/width`` does not fit a float32); that is monotone in ``|x|`` and equals exact
edge comparison except within an ulp of an edge. The same function bins every batch and decides
how many bins the range needs, so a value's bin depends only on the width, never on when it
arrived: streaming and one-shot histograms with the same width agree exactly.

Growth without losing or smearing counts
----------------------------------------
When a batch holds a value above the range, bins of the *same width* are appended until the range
covers it (the scheme of NVIDIA pytorch-quantization's ``HistogramCalibrator``): old counts stay in
their bins, nothing is re-binned or interpolated, so the result equals a one-shot histogram of all
data with the final width. After growth the histogram has more than ``num_bins`` bins over
``[0, top]``, amax in the last one.

A tiny first batch followed by a huge one would need millions of bins, so the bin count is capped
at ``max_bins`` (default ``8 * num_bins``). Past the cap, ``f`` adjacent bins are merged into one
(``f`` the smallest integer that fits) and the width becomes ``f * width``: the coarse bins' edges
are a subset of the fine edges, so this too moves no count across an edge (up to float rounding
of values within an ulp of one); it only lowers the resolution.

Non-finite values
-----------------
NaN and +-Inf are counted in ``nan_count`` / ``inf_count`` and left out of the bins, ``total``,
``amax`` and the signed ``min`` / ``max``. (The activation collector treats them as errors, or
as attention-mask sentinels; see :mod:`quantkit.calib.collect`.)
"""

from __future__ import annotations

import math
import threading
from typing import Any

import numpy as np

from quantkit.errors import QuantkitError

DEFAULT_NUM_BINS = 2048
MAX_BINS_FACTOR = 8
# The first width is amax / num_bins widened by this factor, so amax lies inside the last bin.
WIDEN = 1.0 + 2.0**-20

# Values are binned in chunks of this many elements: the scratch buffers stay in cache and the
# temporaries never grow with the tensor. (Measured on 2 cores: about 3 ns per value, two thirds
# of it in np.bincount; 64K chunks were as fast as any other size, and counting consecutive
# values into interleaved sub-histograms did not help.)
CHUNK = 1 << 16

_scratch = threading.local()


def _buffers(dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Per-thread scratch: a float buffer of ``dtype`` and an index buffer, CHUNK long each."""
    key = np.dtype(dtype).char
    bufs = getattr(_scratch, "bufs", None)
    if bufs is None:
        bufs = _scratch.bufs = {}
    if key not in bufs:
        bufs[key] = (np.empty(CHUNK, dtype=dtype), np.empty(CHUNK, dtype=np.intp))
    return bufs[key]


class StreamingHistogram:
    """Histogram of ``|x|`` over ``[0, running amax]`` that grows exactly (see module docs).

    >>> h = StreamingHistogram(num_bins=4)
    >>> h.update(np.array([0.5, -1.5, 2.5, 4.0]))
    >>> h.counts.tolist(), h.amax, round(h.bin_width, 5)
    ([1, 1, 1, 1], 4.0, 1.0)
    """

    def __init__(self, num_bins: int = DEFAULT_NUM_BINS, max_bins: int | None = None) -> None:
        if num_bins < 1:
            raise ValueError("num_bins must be at least 1")
        max_bins = MAX_BINS_FACTOR * num_bins if max_bins is None else max_bins
        if not num_bins <= max_bins <= 1 << 22:
            # The bound keeps float32 binning exact enough that no index passes the last bin.
            raise ValueError("max_bins must be between num_bins and 2**22")
        self.num_bins = int(num_bins)
        self.max_bins = int(max_bins)
        self._counts = np.zeros(self.num_bins, dtype=np.int64)
        self._width: float | None = None
        self._amax = 0.0
        self._min = math.inf
        self._max = -math.inf
        self.total = 0
        self.nan_count = 0
        self.inf_count = 0

    # ------------------------------------------------------------------ read access
    @property
    def counts(self) -> np.ndarray:
        """Counts per bin (int64, read-only view)."""
        view = self._counts.view()
        view.flags.writeable = False
        return view

    @property
    def bin_width(self) -> float | None:
        """Width of every bin; None until a nonzero value has been seen."""
        return self._width

    @property
    def edges(self) -> np.ndarray:
        """``len(counts) + 1`` bin edges ``k * bin_width`` (all 0 until the width is known)."""
        width = self._width or 0.0
        return np.arange(len(self._counts) + 1, dtype=np.float64) * width

    @property
    def top(self) -> float:
        """Upper edge of the last bin (0 until the width is known)."""
        return len(self._counts) * (self._width or 0.0)

    @property
    def amax(self) -> float:
        """Largest finite ``|x|`` seen (0 before any value)."""
        return self._amax

    @property
    def min(self) -> float:
        """Smallest finite signed value seen (+inf before any value)."""
        return self._min

    @property
    def max(self) -> float:
        """Largest finite signed value seen (-inf before any value)."""
        return self._max

    @property
    def nbytes(self) -> int:
        """Size of the histogram's state (the counts array dominates)."""
        return int(self._counts.nbytes)

    def __repr__(self) -> str:
        return (
            f"StreamingHistogram(bins={len(self._counts)}, width={self._width}, "
            f"amax={self._amax}, total={self.total}, nan={self.nan_count}, inf={self.inf_count})"
        )

    # ------------------------------------------------------------------ updates
    def update(self, array: Any) -> None:
        """Add the values of a float array of any shape (NaN/Inf counted apart, not binned)."""
        x = np.asarray(array)
        if x.dtype.kind != "f":
            raise TypeError(f"StreamingHistogram takes floating-point arrays, not {x.dtype}")
        if x.size == 0:
            return
        flat = x.reshape(-1)
        lo, hi = float(flat.min()), float(flat.max())
        if not (math.isfinite(lo) and math.isfinite(hi)):
            finite = np.isfinite(flat)
            nan = int(np.count_nonzero(np.isnan(flat)))
            self.nan_count += nan
            self.inf_count += int(flat.size - np.count_nonzero(finite) - nan)
            flat = flat[finite]
            if flat.size == 0:
                return
            lo, hi = float(flat.min()), float(flat.max())
        self.update_finite(flat, lo, hi)

    def update_finite(self, flat: np.ndarray, lo: float, hi: float) -> None:
        """Add a 1-D array known to be finite, with its precomputed ``min`` and ``max``.

        The collector computes min/max anyway (to detect masks and NaN), so it skips that pass.
        """
        if flat.size == 0:
            return
        self._min = min(self._min, lo)
        self._max = max(self._max, hi)
        amax = max(-lo, hi, 0.0)
        self._amax = max(self._amax, amax)
        self.total += int(flat.size)
        if amax == 0.0:  # all zeros: bin 0 whatever the width
            self._counts[0] += flat.size
            return
        if self._width is None:
            self._width = amax / self.num_bins * WIDEN
        dtype = self._dtype(flat)
        self._ensure_range(amax, dtype)
        self._accumulate(flat, dtype)

    def _dtype(self, flat: np.ndarray) -> type[np.floating]:
        """Arithmetic of the bin index: float32 for float16/32 data unless 1/width overflows it."""
        assert self._width is not None
        return np.float32 if flat.dtype.itemsize <= 4 and 1.0 / self._width < 1e37 else np.float64

    def _index(self, value: float, dtype: type[np.floating]) -> int:
        """The bin of ``|value|``, by exactly the arithmetic of :meth:`_accumulate`."""
        assert self._width is not None
        with np.errstate(over="ignore"):
            product = dtype(abs(value)) * dtype(1.0 / self._width)
        if not np.isfinite(product):  # far out of range: the merge loop only needs a size
            return math.floor(abs(value) / self._width)
        return int(np.floor(product))

    def _ensure_range(self, amax: float, dtype: type[np.floating]) -> None:
        """Append bins (or, past max_bins, merge them) until amax has a bin."""
        while True:
            n = len(self._counts)
            need = self._index(amax, dtype) + 1
            if need <= n:
                return
            if need <= self.max_bins:
                self._counts = np.concatenate([self._counts,
                                               np.zeros(need - n, dtype=np.int64)])
                return
            assert self._width is not None
            factor = math.ceil(need / self.max_bins)
            starts = np.arange(0, n, factor) if factor < n else np.zeros(1, dtype=np.intp)
            self._counts = np.add.reduceat(self._counts, starts).astype(np.int64)
            self._width = self._width * factor

    def _accumulate(self, flat: np.ndarray, dtype: type[np.floating]) -> None:
        assert self._width is not None
        n = len(self._counts)
        scale = dtype(1.0 / self._width)
        fbuf, ibuf = _buffers(np.dtype(dtype))
        counts = np.zeros(n, dtype=np.int64)
        for start in range(0, flat.size, CHUNK):
            chunk = flat[start : start + CHUNK]
            m = chunk.size
            f, i = fbuf[:m], ibuf[:m]
            np.abs(chunk, out=f)
            np.multiply(f, scale, out=f)
            np.copyto(i, f, casting="unsafe")  # truncation == floor for values >= 0
            binned = np.bincount(i, minlength=n)
            if len(binned) > n:  # cannot happen: _ensure_range used the same arithmetic
                raise RuntimeError("histogram index past the last bin")
            counts += binned
        self._counts += counts

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return {
            "num_bins": self.num_bins,
            "max_bins": self.max_bins,
            "width": self._width,
            "counts": self._counts.tolist(),
            "amax": self._amax,
            "min": self._min if math.isfinite(self._min) else None,
            "max": self._max if math.isfinite(self._max) else None,
            "total": self.total,
            "nan_count": self.nan_count,
            "inf_count": self.inf_count,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StreamingHistogram:
        try:
            hist = cls(int(data["num_bins"]), int(data["max_bins"]))
            counts = np.asarray(data["counts"], dtype=np.int64)
            width = data["width"]
            hist._width = None if width is None else float(width)
            hist._amax = float(data["amax"])
            hist._min = math.inf if data.get("min") is None else float(data["min"])
            hist._max = -math.inf if data.get("max") is None else float(data["max"])
            hist.total = int(data["total"])
            hist.nan_count = int(data.get("nan_count", 0))
            hist.inf_count = int(data.get("inf_count", 0))
        except (KeyError, TypeError, ValueError) as exc:
            raise QuantkitError(f"malformed histogram record: {exc!r}") from None
        if counts.ndim != 1 or len(counts) < 1 or (counts < 0).any():
            raise QuantkitError("malformed histogram record: counts must be a non-empty list >= 0")
        if int(counts.sum()) != hist.total:
            raise QuantkitError(
                f"malformed histogram record: counts sum to {int(counts.sum())}, "
                f"total says {hist.total}"
            )
        if hist._width is not None and not (hist._width > 0 and math.isfinite(hist._width)):
            raise QuantkitError(f"malformed histogram record: bad width {hist._width}")
        hist._counts = counts
        return hist

    def copy(self) -> StreamingHistogram:
        other = StreamingHistogram.__new__(StreamingHistogram)
        other.__dict__.update(self.__dict__)
        other._counts = self._counts.copy()
        return other
