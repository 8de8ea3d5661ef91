"""Per-group sensitivity: the perplexity increase when only that group runs in INT8 (everything
else FP32), on a fixed evaluation subset; the ranking autotune starts from and the report charts.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantkit.artifacts import atomic_output_dir, atomic_write_json, check_can_write, read_json
from quantkit.errors import QuantkitError
from quantkit.tune.context import TuneContext, TuneSettings, load_context

SCHEMA = "quantkit.sensitivity/1"
SENSITIVITY_NAME = "sensitivity.json"


@dataclass(frozen=True)
class GroupSensitivity:
    name: str
    kind: str
    block: int | None
    nodes: tuple[str, ...]
    macs: int
    perplexity: float
    delta: float  # perplexity - baseline
    delta_pct: float
    methods: dict[str, str] = field(default_factory=dict)  # tensor -> method, where not the base

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "block": self.block,
                "nodes": list(self.nodes), "macs": self.macs, "perplexity": self.perplexity,
                "delta": self.delta, "delta_pct": self.delta_pct, "methods": dict(self.methods)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GroupSensitivity:
        return cls(str(data["name"]), str(data["kind"]), data.get("block"),
                   tuple(data["nodes"]), int(data["macs"]), float(data["perplexity"]),
                   float(data["delta"]), float(data["delta_pct"]),
                   dict(data.get("methods") or {}))


@dataclass
class SensitivityResult:
    baseline: float  # FP32 perplexity on the subset
    groups: list[GroupSensitivity]  # ranked, most sensitive first
    subset: str
    data: dict[str, Any]
    inputs: dict[str, Any]
    runs: int = 0
    seconds: float = 0.0

    def ranking(self) -> list[str]:
        return [g.name for g in self.groups]

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "baseline_perplexity": self.baseline, "subset": self.subset,
                "data": self.data, "inputs": self.inputs, "model_runs": self.runs,
                "seconds": self.seconds, "groups": [g.to_dict() for g in self.groups]}

    @classmethod
    def from_dict(cls, data: Any, source: str = "sensitivity results") -> SensitivityResult:
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            raise QuantkitError(f"{source} is not quantkit sensitivity results ({SCHEMA})")
        return cls(float(data["baseline_perplexity"]),
                   [GroupSensitivity.from_dict(g) for g in data["groups"]],
                   str(data["subset"]), dict(data["data"]), dict(data["inputs"]),
                   int(data.get("model_runs", 0)), float(data.get("seconds", 0.0)))

    @classmethod
    def load(cls, path: Path) -> SensitivityResult:
        path = Path(path)
        if path.is_dir():
            path = path / SENSITIVITY_NAME
        if not path.is_file():
            raise QuantkitError(f"{path} not found", "run 'quantkit sensitivity' first")
        return cls.from_dict(read_json(path), str(path))


def rank(entries: list[GroupSensitivity]) -> list[GroupSensitivity]:
    """Most sensitive first; ties in graph order."""
    order = {g.name: i for i, g in enumerate(entries)}
    return sorted(entries, key=lambda g: (-g.delta, order[g.name]))


def measure_sensitivity(context: TuneContext, subset: str = "rank",
                        progress: Callable[[int, int], None] | None = None,
                        methods: Mapping[str, str] | None = None,
                        only: Collection[str] | None = None,
                        stop: Callable[[], bool] | None = None) -> SensitivityResult:
    """One measurement per group (cached; ``only``: just these groups) plus the FP32 baseline.
    ``methods`` (tensor -> calibration method) overrides the table's ranges where given.
    ``stop`` (asked before each group not measured yet) ends the pass early: the groups not
    measured are left out of the result."""
    started = time.perf_counter()
    measurer = context.measurer
    runs_before = measurer.runs
    measured = [g for g in context.groups if only is None or g.name in only]
    owns = [{t: m for t, m in (methods or {}).items()
             if t in context.probe.group_tensors.get(g.name, [])} for g in measured]
    # with workers (Ray): every group side by side, each result cached as it comes back
    if measurer.prefetch([(subset, (), None), *((subset, (g.name,), own)
                                                for g, own in zip(measured, owns, strict=True))],
                         stop=stop, progress=progress):
        progress = None  # the pass's progress was reported as the measurements came back
    baseline = measurer.measure(subset, ()).perplexity
    entries: list[GroupSensitivity] = []
    for i, (group, own) in enumerate(zip(measured, owns, strict=True)):
        if stop is not None and not measurer.cached(subset, (group.name,), own) and stop():
            break
        ppl = measurer.measure(subset, (group.name,), own).perplexity
        delta = ppl - baseline
        entries.append(GroupSensitivity(group.name, group.kind, group.block, group.nodes,
                                        context.macs[group.name], ppl, delta,
                                        100.0 * delta / baseline, own))
        if progress is not None:
            progress(i + 1, len(measured))
    return SensitivityResult(
        baseline, rank(entries), subset, context.data, sensitivity_inputs(context),
        measurer.runs - runs_before, time.perf_counter() - started)


def sensitivity_inputs(context: TuneContext) -> dict[str, Any]:
    return {"onnx": str(context.onnx_path.resolve()), "model_hash": context.model_hash,
            "table": str(Path(context.settings.table).resolve()),
            "table_method": context.table.method, "granularity": context.settings.granularity,
            "per_channel": context.settings.per_channel, "settings": context.settings.to_dict()}


def run_sensitivity(settings: TuneSettings, out: Path, *, force: bool = False,
                    progress: Callable[[int, int], None] | None = None,
                    say: Callable[[str], None] | None = None) -> SensitivityResult:
    """``quantkit sensitivity``: measure, then write OUT/sensitivity.json (+ manifest)."""
    from quantkit.artifacts import make_manifest, write_manifest

    check_can_write(Path(out), force)
    context = load_context(settings, subsets={"rank": settings.rank_windows}, say=say)
    try:
        result = measure_sensitivity(context, progress=progress)
    finally:
        context.close()
    with atomic_output_dir(Path(out), force) as tmp:
        atomic_write_json(tmp / SENSITIVITY_NAME, result.to_dict())
        write_manifest(tmp, make_manifest("sensitivity", result.inputs,
                                          files={"sensitivity": SENSITIVITY_NAME}))
    return result
