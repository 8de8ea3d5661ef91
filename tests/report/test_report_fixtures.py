"""The committed fixtures are what data/make_fixtures.py writes (so they can be regenerated and
reviewed), and their invented numbers are internally consistent."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from quantkit.calib import ActivationStats, CalibrationTable
from quantkit.report.inputs import read_results
from tests.report.data import make_fixtures
from tests.report.helpers import CALIB, DATA


@pytest.mark.parametrize("name", sorted(make_fixtures.fixture_files()))
def test_json_fixtures_match_their_generator(name):
    expected = make_fixtures.dumps(name, make_fixtures.fixture_files()[name])
    assert (DATA / name).read_text() == expected


def test_calibration_fixture_matches_its_generator(tmp_path):
    """The committed stats/table are what quantkit.calib makes of the synthetic activations today.
    A change to calib's binning or algorithms fails here: rerun make_fixtures.py and review."""
    regenerate = "calib changed: rerun python tests/report/data/make_fixtures.py"
    make_fixtures.write_calibration(tmp_path)
    fresh, committed = ActivationStats.load(tmp_path / "stats.npz"), \
        ActivationStats.load(CALIB / "stats.npz")
    assert list(fresh.histograms) == list(committed.histograms)
    for name, hist in fresh.histograms.items():
        assert np.array_equal(hist.counts, committed.histograms[name].counts), regenerate
        assert hist.bin_width == committed.histograms[name].bin_width, regenerate
    assert CalibrationTable.load(tmp_path / "table.json").to_dict() == \
        CalibrationTable.load(CALIB / "table.json").to_dict(), regenerate


@pytest.mark.parametrize("name", ["results-trt-h100.json", "results-ort-cpu.json"])
def test_results_fixtures_are_consistent(name):
    data = read_results(DATA / name).data  # passes quantkit.eval's own schema check
    assert "not measured" in json.loads((DATA / name).read_text())["_comment"]
    for e in data["engines"]:
        assert e["nll_mean"] == pytest.approx(math.log(e["perplexity"]))
        for r in e["latency"]:
            assert r["tokens_per_s"] == pytest.approx(r["batch"] * r["seq"] / r["mean_ms"] * 1e3,
                                                      rel=1e-5)
            assert r["min_ms"] <= r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] <= r["max_ms"]
