"""Number formatting shared by the Markdown and HTML renderers (one place, so both agree)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

DASH = "—"


def ppl(value: float | None) -> str:
    return DASH if value is None else f"{value:.3f}"


def delta(d: Mapping[str, float] | None) -> str:
    """``+0.123 (+0.71%)``; large ones ``+1,234.000 (+1,410%)``."""
    if d is None:
        return DASH
    return f"{d['abs']:+,.3f} ({signed_percent(d['pct'])})"


def signed_percent(value: float | None) -> str:
    """A relative change already in percent, readable at any size: ``+0.71%``, ``-14.2%``,
    ``+1,410%`` (never ``+1.41e+03%``)."""
    if value is None:
        return DASH
    if abs(value) >= 100:
        return f"{value:+,.0f}%"
    if abs(value) >= 10:
        return f"{value:+.1f}%"
    return f"{value:+.2f}%"


def ms(value: float | None) -> str:
    if value is None:
        return DASH
    if value >= 100:
        return f"{value:.1f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def rate(value: float | None) -> str:
    return DASH if value is None else f"{value:,.0f}"


def speedup(value: float | None) -> str:
    return DASH if value is None else f"{value:.2f}×"


def percent(fraction: float | None) -> str:
    return DASH if fraction is None else f"{100.0 * fraction:.1f}%"


def size(num_bytes: int | None) -> str:
    if num_bytes is None:
        return DASH
    value = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def amax(value: float) -> str:
    return f"{value:.4g}"


def count(value: Any) -> str:
    return DASH if value is None else f"{int(value):,}"


def shape(ref: Mapping[str, int] | None) -> str:
    return DASH if ref is None else f"batch {ref['batch']} × seq {ref['seq']}"
