from __future__ import annotations

import numpy as np
import pytest

from quantkit.calib import ActivationStats, StreamingHistogram, calibrate
from quantkit.calib.algorithms import entropy_threshold_bin
from quantkit.calib.run import clipped_fraction, summarize


def test_clipped_fraction_counts_the_bins_above_amax():
    h = StreamingHistogram(1024)
    h.update(np.random.default_rng(0).standard_t(2, 100_000).astype(np.float32))
    i = entropy_threshold_bin(h.counts)
    amax = float(h.edges[i])
    assert clipped_fraction(h, amax) == pytest.approx(h.counts[i:].sum() / h.total)
    assert clipped_fraction(h, h.amax) == 0.0
    assert clipped_fraction(h, 0.0) == 1.0


def test_summary_orders_by_amax_and_clipping():
    rng = np.random.default_rng(1)
    hists = {}
    for name, scale in (("small", 1.0), ("large", 50.0), ("medium", 5.0)):
        h = StreamingHistogram()
        h.update((rng.standard_t(3, 20_000) * scale).astype(np.float32))
        hists[name] = h
    hists["alias"] = hists["large"]
    stats = ActivationStats(hists, skipped={"m": "mask: holds -inf"}, aliases={"alias": "large"})
    table = calibrate(stats, "entropy")
    summary = summarize(stats, table, top=2)
    assert [r["tensor"] for r in summary["largest_amax"]] == ["large", "alias"]
    assert summary["per_tensor"]["alias"]["shares_values_with"] == "large"
    assert summary["skip_reasons"] == {"mask": 1}
    assert summary["num_ranges"] == 4 and summary["num_skipped"] == 1
    worst = summary["most_clipped"][0]
    assert worst["clipped_fraction"] == max(t["clipped_fraction"]
                                            for t in summary["per_tensor"].values())
