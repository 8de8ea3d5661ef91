"""What autotune is asked and what it answers: the perplexity budget, the search's settings, the
steps it records and its result (pure data), and the names of the files ``quantkit autotune``
writes."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from quantkit.errors import QuantkitError
from quantkit.tune.context import DEFAULT_METHODS

SCHEMA = "quantkit.autotune/1"
AUTOTUNE_NAME = "autotune.json"
PLAN_NAME = "plan.yaml"
TABLE_NAME = "table.json"
ENGINE_DIR = "engine"
SENSITIVITY_NAME = "sensitivity.json"
SUMMARY_NAME = "autotune.md"
OBJECTIVES = ("coverage", "latency")


@dataclass(frozen=True)
class Budget:
    """Allowed perplexity increase over FP32: relative (``1%``) or absolute (``0.3``)."""

    value: float
    relative: bool

    @classmethod
    def parse(cls, text: str | float) -> Budget:
        raw = str(text).strip()
        match = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)\s*(%?)", raw)
        if match is None:
            raise QuantkitError(f"cannot read the perplexity budget '{raw}'",
                                "write a relative increase such as 1% or an absolute one "
                                "such as 0.3")
        return cls(float(match.group(1)), bool(match.group(2)))

    def limit(self, baseline: float, share: float = 1.0) -> float:
        allowed = baseline * self.value / 100.0 if self.relative else self.value
        return baseline + share * allowed

    def __str__(self) -> str:
        return f"{self.value:g}%" if self.relative else f"+{self.value:g} ppl"


@dataclass(frozen=True)
class AutotuneSettings:
    budget: Budget = Budget(1.0, True)
    objective: str = "coverage"
    max_evals: int = 120  # measurements of the search, cached or not (sensitivity not counted)
    methods: tuple[str, ...] = DEFAULT_METHODS
    method_groups: int = 6  # most sensitive groups whose tensors get the per-tensor search
    latency_candidates: int = 3
    latency_iterations: int = 5
    build: bool = True  # build and verify the engine
    confidence: float = 0.9  # one-sided confidence of the held-out checks (0: point estimates)
    search_confidence: float = 0.0  # ... of the search's checks (fast, noisy: point estimates)
    search_share: float = 1.0  # share of the budget the search aims at on the search windows
    holdout_share: float = 1.0  # share of the budget the plan must meet on held-out windows
    greedy_runs: int = 12  # measurements of the chunked greedy pass after the bisection
    time_limit_s: float | None = None  # the search stops when this is spent (None: no limit)
    reserve_windows: int = 0  # windows of work after the search, kept out of time_limit_s

    def check(self) -> None:
        if self.objective not in OBJECTIVES:
            raise QuantkitError(f"unknown objective '{self.objective}'",
                                f"use one of: {', '.join(OBJECTIVES)}")
        if self.max_evals < 1:
            raise QuantkitError("max-evals must be at least 1")
        for name in ("search_share", "holdout_share"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise QuantkitError(f"{name.replace('_', '-')} must be in (0, 1], not {value}",
                                    "it is the share of the budget a stage may use")
        for name in ("confidence", "search_confidence"):
            value = getattr(self, name)
            if not (value == 0.0 or 0.5 <= value < 1.0):
                raise QuantkitError(
                    f"{name.replace('_', '-')} must be in [0.5, 1) or 0, not {value}",
                    "0.9: a plan passes when its increase is within the budget with 90 % "
                    "confidence; 0 compares point estimates")
        if self.greedy_runs < 0:
            raise QuantkitError("greedy-runs must not be negative")
        if self.time_limit_s is not None and self.time_limit_s <= 0:
            raise QuantkitError(f"the search time limit must be positive, not "
                                f"{self.time_limit_s:g} s")
        if self.reserve_windows < 0:
            raise QuantkitError("reserve-windows must not be negative")
        from quantkit.calib.algorithms import available_algorithms

        unknown = [m for m in self.methods if m not in available_algorithms()]
        if unknown:
            raise QuantkitError(f"unknown calibration method(s): {', '.join(unknown)}",
                                f"use some of: {', '.join(available_algorithms())}")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["budget"] = str(self.budget)
        return out


@dataclass
class Step:
    stage: str  # method | bisect | greedy | holdout | tighten | latency | verify
    action: str
    int8_groups: int
    coverage: float
    perplexity: float
    subset: str
    within: bool
    cached: bool = False
    bound: float | None = None  # the upper confidence bound of the perplexity checked

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class AutotuneResult:
    settings: dict[str, Any]
    baseline: dict[str, float]  # subset -> FP32 perplexity
    limits: dict[str, float]  # subset -> perplexity allowed
    int8_groups: list[str]
    fp32_groups: list[str]
    methods: dict[str, str]  # tensor -> method where not the table's
    coverage: float  # MAC share at 1 x max_length, from the probe's groups
    search_perplexity: float
    holdout_perplexity: float | None
    met_on_holdout: bool | None
    path: list[Step] = field(default_factory=list)
    engine: dict[str, Any] | None = None  # verified engine: path, perplexity, coverage, met
    latency: list[dict[str, Any]] = field(default_factory=list)
    model_runs: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    onnx: str = ""  # the export the plan belongs to (build engines from it)
    candidates: list[dict[str, Any]] = field(default_factory=list)  # see choose_candidate
    # Ray (--ray): address, workers, tasks run, speculative measurements the search never read
    parallel: dict[str, Any] | None = None
    # (coverage, groups) of every plan the search found within the budget (not serialised)
    feasible: list[tuple[float, tuple[str, ...]]] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        del out["feasible"]
        out["schema"] = SCHEMA
        out["path"] = [s.to_dict() for s in self.path]
        return out
