"""PrecisionPlan: which precision each ONNX node runs in, and which rule decided it.

The plan is pure data: backends read it, the rule engine (``resolve_plan``) writes it.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from quantkit.errors import QuantkitError


class Precision(str, enum.Enum):
    INT8 = "int8"
    FP16 = "fp16"
    FP32 = "fp32"

    @classmethod
    def parse(cls, value: str | Precision) -> Precision:
        if isinstance(value, Precision):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            choices = ", ".join(p.value for p in cls)
            raise QuantkitError(f"unknown precision '{value}'", f"use one of: {choices}") from None


@dataclass(frozen=True)
class NodeDecision:
    """The precision of one node and the rule that chose it (e.g. ``op_type:MatMul``)."""

    node: str
    op_type: str
    precision: Precision
    rule: str

    def to_dict(self) -> dict[str, str]:
        return {
            "node": self.node,
            "op_type": self.op_type,
            "precision": self.precision.value,
            "rule": self.rule,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> NodeDecision:
        return cls(
            node=str(data["node"]),
            op_type=str(data["op_type"]),
            precision=Precision.parse(data["precision"]),
            rule=str(data["rule"]),
        )


@dataclass(frozen=True)
class PrecisionPlan:
    """Node name -> decision, for every node of one ONNX graph, plus the recipe it came from."""

    default: Precision
    decisions: Mapping[str, NodeDecision]
    source: Mapping[str, Any] = field(default_factory=dict)

    def precision_of(self, node: str) -> Precision:
        try:
            return self.decisions[node].precision
        except KeyError:
            raise QuantkitError(f"node '{node}' is not in the precision plan") from None

    def nodes_with(self, precision: Precision) -> list[str]:
        return [name for name, d in self.decisions.items() if d.precision == precision]

    def to_dict(self) -> dict[str, Any]:
        return {
            "default": self.default.value,
            "source": dict(self.source),
            "decisions": [d.to_dict() for d in self.decisions.values()],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PrecisionPlan:
        decisions = [NodeDecision.from_dict(d) for d in data["decisions"]]
        return cls(
            default=Precision.parse(data["default"]),
            decisions={d.node: d for d in decisions},
            source=dict(data.get("source", {})),
        )

    @classmethod
    def uniform(
        cls, nodes: Iterable[tuple[str, str]], precision: Precision, rule: str = "default"
    ) -> PrecisionPlan:
        """Every (node, op_type) at one precision: the plan of a plain FP32 or FP16 build."""
        decisions = {n: NodeDecision(n, op, precision, rule) for n, op in nodes}
        return cls(default=precision, decisions=decisions)
