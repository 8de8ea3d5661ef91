"""The report's sweep section: one row per engine of a ``quantkit sweep`` with its recipe and the
value of each axis of the recipes' ``sweep:`` sections as columns, beside the numbers the
engines table shows (so the axes' effect reads off one table)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from quantkit.errors import QuantkitError
from quantkit.report import fmt
from quantkit.report.document import Block, Heading, Para, Table


def check_sweep(sweep: Mapping[str, Any] | None, sources: int) -> dict[str, Any] | None:
    """``{"axes": [path], "sources": [{"recipe", "axes": {path: value}}]}``, one source per
    results file in their order; None when the report is not a sweep's."""
    if sweep is None:
        return None
    entries = list(sweep.get("sources") or [])
    if len(entries) != sources:
        raise QuantkitError(f"the sweep names {len(entries)} recipes for {sources} results files")
    return {"axes": [str(a) for a in sweep.get("axes") or []],
            "sources": [{"recipe": str(e["recipe"]), "axes": dict(e.get("axes") or {})}
                        for e in entries]}


def sweep_section(sweep: Mapping[str, Any] | None,
                  engines: Sequence[Mapping[str, Any]]) -> list[Block]:
    """The table (nothing when the report is not a sweep's, or its recipes have no axes)."""
    if not sweep or not sweep["axes"]:
        return []
    axes = list(sweep["axes"])
    headers = ["recipe", *axes, "engine", "precision", "INT8 coverage", "perplexity",
               "Δ vs FP32", "p50 ms"]
    rows = []
    for e in engines:
        source = sweep["sources"][e["source"]]
        at = e["at_reference_shape"] or {}
        rows.append([source["recipe"], *(_value(source["axes"], a) for a in axes), e["name"],
                     e["precision"], fmt.percent(e["int8_coverage"]), fmt.ppl(e["perplexity"]),
                     fmt.delta(e["delta_vs_fp32"]),
                     "accuracy only" if e.get("accuracy_only") else fmt.ms(at.get("p50_ms"))])
    return [
        Heading(2, "Sweep", anchor="sweep"),
        Para("Each recipe of the sweep with the value of each axis of its sweep section; "
             "Δ is against the recipe's own FP32, p50 at the reference shape."),
        Table(headers, rows, align="l" * (len(axes) + 3) + "rrrr"),
    ]


def _value(values: Mapping[str, Any], axis: str) -> str:
    return str(values[axis]) if axis in values else fmt.DASH
