"""Report figures as PNG bytes, drawn with matplotlib's Agg canvas.

matplotlib is imported inside each function (``import quantkit`` stays light), and figures are made
with ``matplotlib.figure.Figure`` rather than pyplot, so no global state or GUI backend is involved.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

PRECISION_COLOURS = {"int8": "#1f77b4", "fp16": "#ff7f0e", "fp32": "#7f7f7f", "mixed": "#2ca02c"}
DPI = 110


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


def pareto_png(pareto: Mapping[str, Any], engines: Sequence[Mapping[str, Any]],
               shape_label: str) -> bytes:
    """Δppl % against p50 latency, a labelled point per engine, the Pareto front as a staircase."""
    points = pareto["points"]
    precision = {e["label"]: e["precision"] for e in engines}
    fig = _figure(7.5, 4.8)
    ax = fig.add_subplot()
    for label, p in points.items():
        on_front = label in pareto["front"]
        ax.scatter(
            p["p50_ms"], p["delta_pct"], s=70 if on_front else 45, zorder=3,
            color=PRECISION_COLOURS.get(precision.get(label, ""), "#9467bd"),
            edgecolor="black" if on_front else "none", linewidth=1.2,
        )
        ax.annotate(label, (p["p50_ms"], p["delta_pct"]), xytext=(6, 5),
                    textcoords="offset points", fontsize=8.5, zorder=4)
    front = [points[label] for label in pareto["front"]]
    if front:
        xs = [p["p50_ms"] for p in front]
        ys = [p["delta_pct"] for p in front]
        ax.step(xs, ys, where="post", color="black", linewidth=1.2, linestyle="--",
                label="Pareto front", zorder=2)
    xs_all = [p["p50_ms"] for p in points.values()]
    if xs_all and min(xs_all) > 0 and max(xs_all) / min(xs_all) > 8:
        ax.set_xscale("log")
    ax.axhline(0.0, color="#bbbbbb", linewidth=0.8, zorder=1)
    ax.set_xlabel(f"p50 latency, ms ({shape_label}) — lower is faster")
    ax.set_ylabel("Δ perplexity vs FP32, % — lower is better")
    ax.grid(True, alpha=0.3)
    _precision_legend(ax, sorted({precision.get(label, "") for label in points}),
                      with_front=bool(front))
    _pad_limits(ax, xs_all, [p["delta_pct"] for p in points.values()])
    return _png(fig)


def _precision_legend(ax: Any, precisions: Sequence[str], with_front: bool) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], marker="o", linestyle="none",
                      color=PRECISION_COLOURS.get(p, "#9467bd"), label=p)
               for p in precisions if p]
    if with_front:
        handles.append(Line2D([], [], color="black", linestyle="--", label="Pareto front"))
    ax.legend(handles=handles, loc="best", fontsize=8)


def _pad_limits(ax: Any, xs: Sequence[float], ys: Sequence[float]) -> None:
    """Leave room on the right and top for the point labels."""
    if not xs:
        return
    lo, hi = min(xs), max(xs)
    if ax.get_xscale() == "log":
        ax.set_xlim(lo / 1.3, hi * 2.6)
    else:
        span = (hi - lo) or max(abs(hi), 1.0)
        ax.set_xlim(lo - 0.08 * span, hi + 0.3 * span)
    ylo, yhi = min([*ys, 0.0]), max([*ys, 0.0])
    yspan = (yhi - ylo) or 1.0
    ax.set_ylim(ylo - 0.1 * yspan, yhi + 0.15 * yspan)


def precision_map_png(pmap: Mapping[str, Any], title: str) -> bytes:
    """Block (rows) × linear op (columns), each cell coloured by its precision."""
    import numpy as np
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    rows, columns, grid = pmap["rows"], pmap["columns"], pmap["grid"]
    present = sorted({c for row in grid for c in row if c is not None})
    order = [p for p in ("int8", "fp16", "fp32") if p in present]
    order += [p for p in present if p not in order]
    index = {p: i for i, p in enumerate(order)}
    values = np.full((len(rows), len(columns)), np.nan)
    for r, row in enumerate(grid):
        for c, cell in enumerate(row):
            if cell is not None:
                values[r, c] = index[cell]
    colours = [PRECISION_COLOURS.get(p, "#9467bd") for p in order] or ["#ffffff"]
    cmap = ListedColormap(colours).with_extremes(bad="#ffffff")
    width = min(12.0, 2.2 + 0.62 * len(columns))
    height = min(16.0, 1.5 + 0.24 * len(rows))
    fig = _figure(width, height)
    ax = fig.add_subplot()
    ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=-0.5,
              vmax=max(len(colours) - 0.5, 0.5), aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(columns)), [c["name"] for c in columns], rotation=45, ha="right",
                  fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=7 if len(rows) > 24 else 8)
    ax.set_ylabel("block")
    ax.set_xticks([x - 0.5 for x in range(1, len(columns))], minor=True)
    ax.set_yticks([y - 0.5 for y in range(1, len(rows))], minor=True)
    ax.grid(which="minor", color="white", linewidth=1.0)
    ax.tick_params(which="minor", length=0)
    ax.set_title(title, fontsize=10)
    ax.legend(handles=[Patch(color=PRECISION_COLOURS.get(p, "#9467bd"), label=p) for p in order],
              loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    return _png(fig)


def symlog_threshold(edges: Any, counts: Any, largest: float) -> float | None:
    """The 99.9th percentile of the histogram (its bin's upper edge) when ``largest`` lies over 20
    times beyond it, else None (a linear axis shows everything)."""
    import numpy as np

    cumulative = np.cumsum(np.asarray(counts, dtype=np.float64))
    if len(cumulative) == 0 or cumulative[-1] <= 0:
        return None
    index = int(np.searchsorted(cumulative, 0.999 * cumulative[-1]))
    q999 = float(edges[index + 1])
    return q999 if q999 > 0 and largest > 20 * q999 else None


def histogram_png(hist: Mapping[str, Any], tensor: str, threshold: float, method: str) -> bytes:
    """Histogram of |x| for one tensor, log counts, the calibrated threshold (amax) marked.

    When the largest value is far out in the tail (over 20 times the 99.9th percentile), the x axis
    is linear up to that percentile and logarithmic beyond it, so both the bulk of the values and
    the outliers the threshold clips are visible.
    """
    import numpy as np

    edges = np.asarray(hist["edges"], dtype=np.float64)
    counts = np.asarray(hist["counts"], dtype=np.float64)
    observed = float(hist.get("amax") or 0.0)
    fig = _figure(7.5, 3.6)
    ax = fig.add_subplot()
    ax.stairs(counts, edges, fill=True, color="#1f77b4", alpha=0.6, label="|x| histogram")
    ax.stairs(counts, edges, color="#1f77b4", linewidth=0.8)
    ax.set_yscale("log")
    right = max(threshold, observed, float(edges[-1])) * 1.05
    xlabel = "|activation|"
    linthresh = symlog_threshold(edges, counts, max(threshold, observed))
    if linthresh is not None:
        ax.set_xscale("symlog", linthresh=linthresh, linscale=1.0)
        xlabel += f" (linear up to {linthresh:.3g}, the 99.9th percentile; logarithmic beyond)"
    ax.set_xlim(0.0, right)
    ax.axvline(threshold, color="#d62728", linewidth=1.6,
               label=f"{method} threshold (amax) = {threshold:.4g}")
    if math.isfinite(observed) and observed > 0:
        ax.axvline(observed, color="black", linewidth=1.0, linestyle=":",
                   label=f"largest |x| seen = {observed:.4g}")
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_ylabel("count (log)")
    ax.set_title(tensor, fontsize=9)
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(True, alpha=0.3)
    return _png(fig)


KIND_COLOURS = {"qkv": "#1f77b4", "attn_scores": "#ff7f0e", "attn_values": "#e6b800",
                "attn_out": "#2ca02c", "mlp_in": "#9467bd", "mlp_down": "#d62728",
                "lm_head": "#8c564b", "other": "#7f7f7f"}


def sensitivity_png(sensitivity: Mapping[str, Any], top: int) -> bytes:
    """Horizontal bars: Δppl % of the ``top`` most sensitive groups, coloured by op kind."""
    groups = list(sensitivity["groups"])[:top]
    fig = _figure(7.5, 0.9 + 0.22 * max(1, len(groups)))
    ax = fig.add_subplot()
    ys = list(range(len(groups)))[::-1]
    ax.barh(ys, [g["delta_pct"] for g in groups],
            color=[KIND_COLOURS.get(g["kind"], "#7f7f7f") for g in groups])
    ax.set_yticks(ys, [g["name"] for g in groups], fontsize=7.5)
    ax.axvline(0.0, color="#888888", linewidth=0.8)
    ax.set_xlabel("Δ perplexity vs FP32 when only this group is INT8, %")
    kinds = list(dict.fromkeys(g["kind"] for g in groups))
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color=KIND_COLOURS.get(k, "#7f7f7f"), label=k) for k in kinds],
              fontsize=7.5, loc="lower right")
    return _png(fig)


def search_path_png(autotune: Mapping[str, Any]) -> bytes:
    """Every measured plan of an autotune search: Δppl % against the FP32 perplexity of the
    subset it was measured on, over INT8 coverage, by stage; the budget as dashed lines."""
    stages = {"kinds": "#8c564b", "bisect": "#1f77b4", "greedy": "#2ca02c", "tighten": "#ff7f0e",
              "holdout": "#9467bd", "verify": "#d62728"}
    base = autotune["baseline"]

    def delta(step: Mapping[str, Any]) -> float:
        return 100.0 * (step["perplexity"] / base[step["subset"]] - 1.0)

    fig = _figure(7.5, 4.2)
    ax = fig.add_subplot()
    shown = [s for s in autotune["path"] if s["stage"] in stages and s["subset"] in base]
    for stage, colour in stages.items():
        steps = [s for s in shown if s["stage"] == stage]
        if steps:
            ax.scatter([100 * s["coverage"] for s in steps], [delta(s) for s in steps],
                       s=[42 if s["within"] else 18 for s in steps], color=colour, label=stage,
                       edgecolor=["black" if s["within"] else "none" for s in steps], zorder=3)
    limits = {k: 100.0 * (v / base[k] - 1.0) for k, v in autotune["limits"].items() if k in base}
    for subset, style in (("search", "--"), ("holdout", ":")):
        if subset in limits:
            ax.axhline(limits[subset], color="#444444", linestyle=style, linewidth=1,
                       label=f"budget ({subset})")
    ax.axhline(0.0, color="#bbbbbb", linewidth=0.8)
    ax.set_xlabel("INT8 coverage, % of linear-layer MACs")
    ax.set_ylabel("Δ perplexity vs FP32 of the subset, %")
    values = [delta(s) for s in shown]
    if values and max(values) > 20 * max(max(limits.values(), default=1.0), 0.1):
        ax.set_yscale("symlog", linthresh=max(max(limits.values(), default=1.0), 0.1))
    ax.legend(fontsize=7.5)
    return _png(fig)
