"""Pareto front of accuracy against speed, in pure Python.

Both coordinates are minimised: latency (lower is faster) and perplexity increase (lower is more
accurate). A point is on the front when no other point is at least as good in both and strictly
better in one. Points that tie exactly are all on the front.
"""

from __future__ import annotations

import math
from collections.abc import Mapping


def dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """``a`` is at least as good as ``b`` in both coordinates and strictly better in one."""
    return a[0] <= b[0] and a[1] <= b[1] and (a[0] < b[0] or a[1] < b[1])


def pareto_front(points: Mapping[str, tuple[float, float]]) -> list[str]:
    """Names of the non-dominated points, ordered by the first coordinate (then the second).

    Coordinates must be finite numbers; both are minimised.
    """
    for name, (x, y) in points.items():
        if not (math.isfinite(x) and math.isfinite(y)):
            raise ValueError(f"point {name!r} has a non-finite coordinate ({x}, {y})")
    front = [
        name
        for name, p in points.items()
        if not any(dominates(q, p) for other, q in points.items() if other != name)
    ]
    return sorted(front, key=lambda n: (points[n][0], points[n][1], n))
