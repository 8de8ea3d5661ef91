"""The HTML report in headless Chromium: no console errors, every image loaded, not blank.

Chromium comes from Debian's ``chromium`` package (``.ci/install-chromium``). Where it is not
installed the test skips with that reason, unless QUANTKIT_REQUIRE_CHROMIUM=1 (CI after a
successful install) makes a missing browser a failure.
"""

from __future__ import annotations

import base64
import os

import pytest

from quantkit.report import build_report
from tests.report.browser import blank_stats, find_chromium, inspect_page, is_blank, screenshot
from tests.report.helpers import CALIB, ORT, TRT

CHROMIUM = find_chromium()


@pytest.fixture(scope="module")
def chromium():
    if CHROMIUM is None:
        message = "chromium is not installed (.ci/install-chromium installs Debian's package)"
        if os.environ.get("QUANTKIT_REQUIRE_CHROMIUM") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return CHROMIUM


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    return build_report([TRT, ORT], tmp_path_factory.mktemp("report") / "out",
                        calibration=CALIB)


def test_report_html_in_chromium(chromium, report, tmp_path):
    page = inspect_page(chromium, report.html, tmp_path)
    assert page.errors == []
    assert page.console == []
    assert page.resources == []  # nothing fetched: no network, no files beside the report
    assert page.images == 3 and page.loaded == 3  # Pareto plot, precision map, histogram
    assert all(w > 100 and h > 100 for w, h in page.sizes)
    assert page.title == "quantkit report: 7 engines"
    assert "Accuracy against speed" in page.dom and "int8@results-ort-cpu" in page.dom

    png, console = screenshot(chromium, report.html, tmp_path / "report.png")
    assert console == []
    stats = blank_stats(png)
    assert stats["non_background"] > 0.10 and stats["colours"] > 256, stats
    assert not is_blank(png)


def test_tables_fit_or_scroll_inside_their_box(chromium, report, tmp_path):
    """At 1400 px the engine table (13 columns) fits its container; in a narrower window wide
    tables scroll inside their own box and the page itself never scrolls sideways."""
    wide = inspect_page(chromium, report.html, tmp_path, width=1400)
    assert wide.viewport == 1400 and wide.page_width <= wide.viewport
    engines_table = wide.scroll_boxes[0]
    assert engines_table[0] <= engines_table[1], wide.scroll_boxes
    png, _ = screenshot(chromium, report.html, tmp_path / "report-1400.png", width=1400,
                        height=900)
    assert not is_blank(png)

    narrow = inspect_page(chromium, report.html, tmp_path, width=900)
    assert narrow.page_width <= narrow.viewport, (narrow.page_width, narrow.viewport)
    assert narrow.scroll_boxes[0][0] > narrow.scroll_boxes[0][1]  # it scrolls in its box


def test_probe_catches_broken_pages(chromium, tmp_path):
    """The checks above can fail: a broken image, a script error and console.error are seen."""
    pixel = base64.b64encode(b"not a png").decode()
    page = tmp_path / "broken.html"
    page.write_text(
        "<!DOCTYPE html><html><head><title>broken</title></head><body><h1>Broken</h1>"
        f'<img src="data:image/png;base64,{pixel}"><img src="missing.png">'
        '<img src="http://127.0.0.1:9/network.png">'
        "<script>console.error('bad thing'); undefinedFunction();</script></body></html>"
    )
    seen = inspect_page(chromium, page, tmp_path)
    assert seen.images == 3 and seen.loaded == 0
    assert "console.error: bad thing" in seen.errors
    assert any(e.startswith("uncaught:") and "undefinedFunction" in e for e in seen.errors)
    assert any("missing.png" in e for e in seen.errors)
    assert "http://127.0.0.1:9/network.png" in seen.resources
    assert any("bad thing" in line for line in seen.console)


def test_blank_page_screenshot_is_blank(chromium, tmp_path):
    page = tmp_path / "blank.html"
    page.write_text("<!DOCTYPE html><html><head><title>blank</title></head><body></body></html>")
    png, _ = screenshot(chromium, page, tmp_path / "blank.png")
    assert is_blank(png)
