"""The report's tuning section from a real autotune directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from quantkit.errors import QuantkitError
from quantkit.report import build_report
from quantkit.tune.autotune import autotune
from quantkit.tune.budget import AutotuneSettings, Budget
from tests.tune.conftest import FRAGILE_GROUP

RESULTS = Path(__file__).resolve().parent.parent / "report" / "data" / "results-ort-cpu.json"


def test_report_shows_ranking_and_search_path(tune_settings, tmp_path) -> None:
    tuned = tmp_path / "tuned"
    result = autotune(tune_settings, AutotuneSettings(budget=Budget.parse("1%"), max_evals=30,
                                                      methods=("minmax",), build=False), tuned)
    report = build_report([RESULTS], tmp_path / "report", tuning=tuned)
    md = report.markdown.read_text()
    assert "## Sensitivity and autotune" in md
    assert FRAGILE_GROUP in md and "sensitivity.png" in md and "autotune-search.png" in md
    assert f"{len(result.int8_groups)} of 13" in md
    assert (tmp_path / "report" / "sensitivity.png").stat().st_size > 1000
    html = report.html.read_text()
    assert "data:image/png;base64," in html and "Autotune" in html
    tuning = report.data["tuning"]
    assert tuning["autotune"]["int8_groups"] == result.int8_groups
    assert tuning["sensitivity"]["groups"][0]["name"] == FRAGILE_GROUP


def test_report_refuses_a_directory_without_sensitivity(tmp_path) -> None:
    with pytest.raises(QuantkitError, match="no sensitivity.json"):
        build_report([RESULTS], tmp_path / "report", tuning=tmp_path)
    assert not (tmp_path / "report").exists()
