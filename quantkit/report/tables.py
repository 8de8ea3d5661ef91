"""The numbers of a report: one row per engine, references, deltas, speedups and the Pareto front.

Definitions (also written into every report):

* **Δppl** of an engine against FP32 (FP16) is ``ppl - ppl_ref`` and ``100 * (ppl - ppl_ref) /
  ppl_ref``, where the reference is an FP32 (FP16) engine built from the same source model
  (``source_model_hash``). Among several candidates the one measured on the same machine with the
  same backend is preferred, then the same backend, then the first listed.
* **Speedup** against FP32 (FP16) is ``p50_ref / p50`` at the same (batch, seq) shape, and only
  against a reference measured on the same machine, backend and device: latencies from different
  hardware are not compared.
* The **reference shape** of the summary table and the Pareto plot is the (batch, seq) shape
  measured by the most engines; among ties the one with the most tokens (batch × seq), then the
  larger batch.
  Every other shape is in the full latency table.
* The **Pareto front** minimises p50 latency at the reference shape and Δppl % against FP32; engines
  lacking either are left out of the plot, with the reason recorded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from quantkit.report.inputs import ResultsFile, engine_labels
from quantkit.report.pareto import pareto_front

REFERENCE_PRECISIONS = ("fp32", "fp16")


def machine_of(environment: Mapping[str, Any]) -> dict[str, Any]:
    """What identifies the hardware a latency was measured on: CPU model and GPU model(s)."""
    gpu = environment.get("gpu")
    if isinstance(gpu, list):
        gpu = ", ".join(str(g.get("name")) if isinstance(g, Mapping) else str(g) for g in gpu)
    return {"cpu": environment.get("cpu"), "gpu": gpu or None,
            "platform": environment.get("platform")}


def latency_group(entry: Mapping[str, Any]) -> tuple[Any, ...]:
    """Engines whose latencies may be compared: same machine, backend, runner device and threads."""
    machine = entry["machine"]
    runner = entry.get("runner") or {}
    return (entry["backend"], machine.get("cpu"), machine.get("gpu"),
            str(runner.get("device")), str(runner.get("threads")))


def collect_engines(files: Sequence[ResultsFile]) -> list[dict[str, Any]]:
    """Flatten the engines of all files into report rows carrying their source and machine."""
    labels = engine_labels(files)
    rows: list[dict[str, Any]] = []
    for index, (f, file_labels) in enumerate(zip(files, labels, strict=True)):
        for engine, label in zip(f.engines, file_labels, strict=True):
            rows.append({
                "label": label,
                "name": str(engine["name"]),
                "source": index,
                "path": engine.get("path"),
                "backend": str(engine["backend"]),
                "precision": str(engine["precision"]),
                "int8_coverage": engine.get("int8_coverage"),
                "source_model_hash": engine.get("source_model_hash"),
                "size_bytes": engine.get("size_bytes"),
                "perplexity": float(engine["perplexity"]),
                "nll_mean": engine.get("nll_mean"),
                "num_scored_tokens": engine.get("num_scored_tokens"),
                "peak_rss_bytes": engine.get("peak_rss_bytes"),
                "runner": engine.get("runner") or {},
                "machine": machine_of(f.environment),
                "latency": [dict(row) for row in engine["latency"]],
                "accuracy_only": engine.get("accuracy_only"),
                "generation": engine.get("generation"),
            })
    return rows


def choose_reference(
    entry: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], precision: str
) -> Mapping[str, Any] | None:
    """The engine that ``entry``'s Δppl against ``precision`` is measured from (see module doc)."""
    candidates = [
        r for r in rows
        if r["precision"] == precision
        and r.get("source_model_hash") == entry.get("source_model_hash")
    ]
    if not candidates:
        return None
    if any(r is entry for r in candidates):
        return entry

    def rank(r: Mapping[str, Any]) -> tuple[int, int, int]:
        return (
            0 if latency_group(r) == latency_group(entry) else 1,
            0 if r["backend"] == entry["backend"] else 1,
            0 if r["source"] == entry["source"] else 1,
        )

    return min(candidates, key=rank)  # min is stable: the first listed wins ties


def delta(value: float, reference: float) -> dict[str, float]:
    return {"abs": value - reference, "pct": 100.0 * (value - reference) / reference}


def latency_at(entry: Mapping[str, Any], shape: tuple[int, int]) -> Mapping[str, Any] | None:
    for row in entry["latency"]:
        if (int(row["batch"]), int(row["seq"])) == shape:
            return row
    return None


def reference_shape(rows: Sequence[Mapping[str, Any]]) -> tuple[int, int] | None:
    """The shape measured by the most engines; ties go to more tokens, then the larger batch."""
    counts: dict[tuple[int, int], int] = {}
    for entry in rows:
        for shape in {(int(r["batch"]), int(r["seq"])) for r in entry["latency"]}:
            counts[shape] = counts.get(shape, 0) + 1
    if not counts:
        return None
    return max(counts, key=lambda s: (counts[s], s[0] * s[1], s[0]))


def speedup(entry: Mapping[str, Any], ref: Mapping[str, Any] | None,
            shape: tuple[int, int]) -> float | None:
    if ref is None or latency_group(ref) != latency_group(entry):
        return None
    mine, theirs = latency_at(entry, shape), latency_at(ref, shape)
    if mine is None or theirs is None or float(mine["p50_ms"]) <= 0:
        return None
    return float(theirs["p50_ms"]) / float(mine["p50_ms"])


def build_tables(files: Sequence[ResultsFile]) -> dict[str, Any]:
    """Every number the report shows: rows with references, deltas, speedups, and the front."""
    rows = collect_engines(files)
    shape = reference_shape(rows)
    for entry in rows:
        refs = {p: choose_reference(entry, rows, p) for p in REFERENCE_PRECISIONS}
        entry["reference"] = {p: (r["label"] if r is not None else None) for p, r in refs.items()}
        for p, ref in refs.items():
            entry[f"delta_vs_{p}"] = (
                delta(entry["perplexity"], ref["perplexity"]) if ref is not None else None
            )
        for row in entry["latency"]:
            row_shape = (int(row["batch"]), int(row["seq"]))
            for p, ref in refs.items():
                row[f"speedup_vs_{p}"] = speedup(entry, ref, row_shape)
        at = latency_at(entry, shape) if shape is not None else None
        entry["at_reference_shape"] = None if at is None else {
            "p50_ms": float(at["p50_ms"]),
            "p99_ms": float(at["p99_ms"]),
            "tokens_per_s": float(at["tokens_per_s"]),
            "speedup_vs_fp32": at["speedup_vs_fp32"],
            "speedup_vs_fp16": at["speedup_vs_fp16"],
        }
    pareto = pareto_summary(rows, shape)
    front = set(pareto["front"])
    for entry in rows:
        entry["pareto"] = entry["label"] in front
    return {
        "reference_shape": None if shape is None else {"batch": shape[0], "seq": shape[1]},
        "engines": rows,
        "pareto": pareto,
    }


def pareto_summary(rows: Sequence[Mapping[str, Any]],
                   shape: tuple[int, int] | None) -> dict[str, Any]:
    """Which engines are plotted, where, and which are on the front."""
    points: dict[str, tuple[float, float]] = {}
    excluded: list[dict[str, str]] = []
    for entry in rows:
        at = latency_at(entry, shape) if shape is not None else None
        d = entry.get("delta_vs_fp32")
        if d is None:
            excluded.append({"engine": entry["label"],
                             "reason": "no FP32 engine of the same model to measure Δppl from"})
        elif at is None:
            reason = ("no latency measured" if shape is None else
                      f"no latency measured at batch {shape[0]} × seq {shape[1]}")
            excluded.append({"engine": entry["label"], "reason": reason})
        else:
            points[entry["label"]] = (float(at["p50_ms"]), float(d["pct"]))
    return {
        "x": "p50 latency (ms) at the reference shape",
        "y": "Δppl % against FP32",
        "points": {k: {"p50_ms": x, "delta_pct": y} for k, (x, y) in points.items()},
        "front": pareto_front(points),
        "excluded": excluded,
    }
