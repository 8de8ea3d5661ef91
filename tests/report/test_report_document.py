"""Markdown and HTML rendering: escaping, alignment, inline images; number formatting."""

from __future__ import annotations

import base64

import pytest

from quantkit.report import fmt
from quantkit.report.document import Code, Heading, Image, Para, Table, to_html, to_markdown


def test_markdown_escapes_markup_but_keeps_names_readable():
    md = to_markdown([Table(["engine", "ppl"], [["a|b *x* <i>", "1.0"], ["q_proj", "2.0"]],
                            align="lr", highlight=[True, False])])
    lines = md.splitlines()
    assert lines[0] == "| engine | ppl |"
    assert lines[1] == "| --- | ---: |"
    assert lines[2] == r"| **a\|b \*x\* \<i\>** | 1.0 |"
    assert lines[3] == "| q_proj | 2.0 |"


def test_html_escapes_everything_and_inlines_images():
    png = b"\x89PNG\r\n\x1a\nfake"
    html = to_html([Heading(1, "<script>alert(1)</script>"), Para("a & b", muted=True),
                    Table(["x"], [["<b>"]], align="r"), Image("p.png", 'say "hi"', png, "cap"),
                    Code("quantkit eval --out 'x y'")], title="t <1>")
    assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert '<p class="muted">a &amp; b</p>' in html
    assert '<td class="r">&lt;b&gt;</td>' in html
    assert f'src="data:image/png;base64,{base64.b64encode(png).decode()}"' in html
    assert 'alt="say &quot;hi&quot;"' in html and "<figcaption>cap</figcaption>" in html
    assert "<pre>quantkit eval --out &#x27;x y&#x27;</pre>" in html
    assert "<title>t &lt;1&gt;</title>" in html


def test_markdown_code_fence_survives_backticks():
    md = to_markdown([Code("a ``` b")])
    assert md.startswith("````\na ``` b\n````")


def test_number_formats():
    assert fmt.delta({"abs": 0.18459, "pct": 0.88248}) == "+0.185 (+0.88%)"
    assert fmt.delta({"abs": -0.0029, "pct": -0.0139}) == "-0.003 (-0.01%)"
    assert fmt.delta(None) == "—"
    assert fmt.delta({"abs": 1234.5, "pct": 1410.3}) == "+1,234.500 (+1,410%)"
    assert [fmt.signed_percent(v) for v in (1410.3, -14.23, 0.882, 123456.0, None)] == \
        ["+1,410%", "-14.2%", "+0.88%", "+123,456%", "—"]
    assert [fmt.ms(v) for v in (0.8801, 2.214, 151.04)] == ["0.880", "2.21", "151.0"]
    assert fmt.speedup(38.4 / 11.6) == "3.31×"
    assert fmt.percent(0.68022) == "68.0%"
    assert [fmt.size(v) for v in (512, 2048, 205_127_680, 3 << 40)] == \
        ["512 B", "2.0 KiB", "195.6 MiB", "3072.0 GiB"]
    assert fmt.rate(204408.2) == "204,408"


def test_histogram_axis_goes_logarithmic_only_for_far_outliers():
    from quantkit.report.plots import symlog_threshold

    edges = [0.1 * i for i in range(2049)]
    counts = [0] * 2048
    counts[:10] = [1000] * 10  # the bulk: |x| < 1.0
    assert symlog_threshold(edges, counts, largest=0.95) is None
    assert symlog_threshold(edges, counts, largest=200.0) == pytest.approx(1.0)
    counts[2000] = 50  # 0.5% of the values out at 200: the 99.9th percentile is there
    assert symlog_threshold(edges, counts, largest=204.8) is None
    assert symlog_threshold(edges, [0] * 2048, largest=1.0) is None
