"""PrecisionPlan: which precision each ONNX node runs in, and which rule decided it.

The plan is pure data: backends read it, the rule engine (``resolve_plan``) writes it.
"""

from __future__ import annotations

import difflib
import enum
import fnmatch
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
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


# ---------------------------------------------------------------------------------------------
# The rule engine: PlanRecipe (default + rules, YAML) -> resolve_plan(recipe, onnx) -> PrecisionPlan
# ---------------------------------------------------------------------------------------------

#: Op types that have an INT8 (Q/DQ) form: the linear layers and the attention batched MatMuls.
QUANTIZABLE_OP_TYPES = frozenset({"MatMul", "Gemm"})
#: Node-name segment of the online Hadamard rotations (quantkit.rotation): MatMuls that exist to
#: spread an activation's outliers before it is quantized, so they have no INT8 form themselves.
ROTATION_SEGMENT = "online_hadamard"


def is_rotation(name: str) -> bool:
    """Whether a node is one of quantkit.rotation's online Hadamard nodes (by its name)."""
    return f"/{ROTATION_SEGMENT}/" in name


def int8_capable(name: str, op_type: str) -> bool:
    """Whether a node has an INT8 (Q/DQ) form: a MatMul/Gemm that is not an online rotation."""
    return op_type in QUANTIZABLE_OP_TYPES and not is_rotation(name)

RECIPE_VERSION = 1

# Precedence tiers, strongest first: exact name > regex/glob > block range > op type > default.
_TIERS = ("exact", "pattern", "blocks", "op_type")
_GLOB_CHARS = set("*?[")
_BLOCK_SPEC = re.compile(
    r"^(?P<prefix>[A-Za-z_][A-Za-z0-9_]*)\.(?P<ranges>\d+(?:-\d+)?(?:,\d+(?:-\d+)?)*)$"
)


@dataclass(frozen=True)
class PlanRule:
    """One override: the nodes it selects and the precision it gives them.

    Exactly one selector is set:

    * ``node``: an exact node name, ``re:<regex>`` (``re.search`` on the name) or a glob
      (any of ``* ? [``, ``fnmatch`` on the whole name);
    * ``blocks``: transformer-block index ranges, ``layers.0-1``, ``h.0-3``, ``layers.0-1,28-29``:
      every node under ``/<prefix>.<i>/`` with ``i`` in a range (inclusive);
    * ``op_type``: an ONNX op type such as ``Softmax``.
    """

    precision: Precision
    node: str | None = None
    blocks: str | None = None
    op_type: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "precision", Precision.parse(self.precision))
        selectors = [s for s in (self.node, self.blocks, self.op_type) if s is not None]
        if len(selectors) != 1:
            raise QuantkitError(
                f"precision rule {self._raw()} must name exactly one of node, blocks, op_type"
            )
        if self.node is not None and self.kind == "regex":
            try:
                re.compile(self.node[3:])
            except re.error as exc:
                raise QuantkitError(f"rule '{self.node}' is not a valid regex: {exc}") from None
        if self.blocks is not None:
            _parse_blocks(self.blocks)
        if self.op_type is not None:
            _check_op_type(self.op_type)

    def _raw(self) -> str:
        return str({k: v for k, v in self.to_dict().items() if v is not None})

    @property
    def kind(self) -> str:
        """exact | regex | glob | blocks | op_type"""
        if self.blocks is not None:
            return "blocks"
        if self.op_type is not None:
            return "op_type"
        assert self.node is not None
        if self.node.startswith("re:"):
            return "regex"
        if _GLOB_CHARS & set(self.node):
            return "glob"
        return "exact"

    @property
    def tier(self) -> str:
        return {"exact": "exact", "regex": "pattern", "glob": "pattern"}.get(self.kind, self.kind)

    @property
    def label(self) -> str:
        """How decisions name this rule: ``exact:/lm_head/MatMul``, ``re:...``, ``glob:*``,
        ``blocks:layers.0-1``, ``op_type:Softmax``."""
        if self.kind == "regex":
            return str(self.node)
        selector = self.node if self.node is not None else (self.blocks or self.op_type)
        return f"{self.kind}:{selector}"

    def matches(self, name: str, op_type: str) -> bool:
        kind = self.kind
        if kind == "exact":
            return name == self.node
        if kind == "regex":
            return re.search(str(self.node)[3:], name) is not None
        if kind == "glob":
            return fnmatch.fnmatchcase(name, str(self.node))
        if kind == "op_type":
            return op_type == self.op_type
        prefix, indices = _parse_blocks(str(self.blocks))
        block = block_index(name, prefix)
        return block is not None and block in indices

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key in ("node", "blocks", "op_type"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        out["precision"] = self.precision.value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PlanRule:
        if not isinstance(data, Mapping):
            raise QuantkitError(f"precision rule {data!r} must be a mapping",
                                "e.g. {node: /lm_head/MatMul, precision: fp32}")
        unknown = set(data) - {"node", "blocks", "op_type", "precision"}
        if unknown:
            raise QuantkitError(
                f"precision rule {dict(data)} has unknown keys: {', '.join(sorted(unknown))}",
                "a rule has one of node, blocks, op_type and a precision",
            )
        if "precision" not in data:
            raise QuantkitError(f"precision rule {dict(data)} has no precision")
        return cls(
            precision=Precision.parse(data["precision"]),
            node=_opt_str(data.get("node")),
            blocks=_opt_str(data.get("blocks")),
            op_type=_opt_str(data.get("op_type")),
        )


@dataclass(frozen=True)
class PlanRecipe:
    """A precision recipe: a default, the rules that override it, and ``fallback``, the float
    precision that nodes decided ``int8`` run in when their op has no INT8 form (everything but
    MatMul/Gemm: norms, softmax, elementwise ops, shape arithmetic).

    Precedence: exact node name > regex/glob > block range > op type > default. Within one tier
    the later rule wins.
    """

    default: Precision = Precision.INT8
    rules: tuple[PlanRule, ...] = ()
    fallback: Precision = Precision.FP32
    name: str | None = None
    description: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "default", Precision.parse(self.default))
        object.__setattr__(self, "fallback", Precision.parse(self.fallback))
        object.__setattr__(self, "rules", tuple(self.rules))
        if self.fallback == Precision.INT8:
            raise QuantkitError(
                "a recipe's fallback must be a float precision (fp32 or fp16), not int8",
                "fallback is what non-quantizable ops run in when a rule says int8",
            )

    @classmethod
    def uniform(cls, precision: Precision | str) -> PlanRecipe:
        """The recipe of a plain ``--precision fp32|fp16|int8`` build (int8: every quantizable
        op; the rest in FP32)."""
        precision = Precision.parse(precision)
        return cls(default=precision, name=precision.value)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"version": RECIPE_VERSION}
        if self.name:
            out["name"] = self.name
        if self.description:
            out["description"] = self.description
        out["default"] = self.default.value
        out["fallback"] = self.fallback.value
        out["rules"] = [r.to_dict() for r in self.rules]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PlanRecipe:
        if not isinstance(data, Mapping):
            raise QuantkitError("a precision recipe must be a mapping with 'default' and 'rules'")
        unknown = set(data) - {"version", "name", "description", "default", "fallback", "rules"}
        if unknown:
            raise QuantkitError(
                f"precision recipe has unknown keys: {', '.join(sorted(unknown))}",
                "allowed: version, name, description, default, fallback, rules",
            )
        version = data.get("version", RECIPE_VERSION)
        if version != RECIPE_VERSION:
            raise QuantkitError(
                f"precision recipe version {version} is not supported (expected {RECIPE_VERSION})"
            )
        rules = data.get("rules") or []
        if not isinstance(rules, list):
            raise QuantkitError("a precision recipe's 'rules' must be a list")
        return cls(
            default=Precision.parse(data.get("default", Precision.INT8.value)),
            rules=tuple(PlanRule.from_dict(r) for r in rules),
            fallback=Precision.parse(data.get("fallback", Precision.FP32.value)),
            name=_opt_str(data.get("name")),
            description=str(data.get("description") or ""),
        )

    def to_yaml(self) -> str:
        import yaml

        return str(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_yaml(cls, text: str) -> PlanRecipe:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise QuantkitError(f"precision recipe is not valid YAML: {exc}") from None
        return cls.from_dict(data or {})

    @classmethod
    def load(cls, path: Path | str) -> PlanRecipe:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise QuantkitError(f"precision recipe {path} does not exist") from None
        recipe = cls.from_yaml(text)
        return recipe if recipe.name else replace(recipe, name=path.stem)

    def save(self, path: Path | str) -> None:
        from quantkit.artifacts import atomic_write_text

        atomic_write_text(Path(path), self.to_yaml())


def block_index(node_name: str, prefix: str) -> int | None:
    """The block index of ``node_name`` under ``/<prefix>.<i>/`` (``layers``, ``h``), if any."""
    match = re.search(rf"(?:^|/){re.escape(prefix)}\.(\d+)(?:/|$)", node_name)
    return int(match.group(1)) if match else None


def graph_nodes(onnx_model: Any) -> list[tuple[str, str]]:
    """(name, op_type) of every node of the main graph of a ModelProto or an ONNX file."""
    model = _as_model(onnx_model)
    names = [n.name for n in model.graph.node]
    if any(not n for n in names):
        raise QuantkitError("the ONNX graph has unnamed nodes",
                            "export it with 'quantkit export', which names every node")
    duplicated = sorted(n for n, count in Counter(names).items() if count > 1)
    if duplicated:
        raise QuantkitError(f"the ONNX graph has duplicate node names: {', '.join(duplicated[:5])}")
    return [(n.name, n.op_type) for n in model.graph.node]


def resolve_plan(recipe: PlanRecipe, onnx_model: Any) -> PrecisionPlan:
    """Decide every node of ``onnx_model`` (a ModelProto or a path) from ``recipe``.

    Raises QuantkitError for a rule that matches no node (naming the closest node names, op types
    or block ranges) and for a rule that asks INT8 of a node by its exact name or op type when
    that op has no INT8 form. Broader rules (default, regex, glob, blocks) that say int8 give
    non-quantizable nodes the recipe's ``fallback`` precision; the decision's rule says so.
    """
    nodes = graph_nodes(onnx_model)
    _check_rules_match(recipe.rules, nodes)
    decisions: dict[str, NodeDecision] = {}
    for name, op_type in nodes:
        precision, rule = recipe.default, "default"
        chosen: PlanRule | None = None
        for tier in _TIERS:
            for candidate in recipe.rules:
                if candidate.tier == tier and candidate.matches(name, op_type):
                    chosen = candidate  # later rule of the same tier wins
            if chosen is not None:
                break
        if chosen is not None:
            precision, rule = chosen.precision, chosen.label
        if precision == Precision.INT8 and not int8_capable(name, op_type):
            # an exact name asks for this node; an op type asks for every MatMul, and the
            # rotations among them just stay in the fallback precision
            if chosen is not None and (chosen.kind == "exact" or (
                    chosen.kind == "op_type" and op_type not in QUANTIZABLE_OP_TYPES)):
                raise QuantkitError(
                    f"rule '{chosen.label}' asks int8 for {name} ({op_type}), "
                    f"which has no INT8 form",
                    f"only {', '.join(sorted(QUANTIZABLE_OP_TYPES))} run in INT8 (not the "
                    f"'{ROTATION_SEGMENT}' rotations); use fp16 or fp32 for it",
                )
            precision = recipe.fallback
            what = "a rotation" if op_type in QUANTIZABLE_OP_TYPES else op_type
            rule = f"{rule} (int8 n/a for {what}: {recipe.fallback.value})"
        decisions[name] = NodeDecision(name, op_type, precision, rule)
    source: dict[str, Any] = {"recipe": recipe.to_dict()}
    return PrecisionPlan(default=recipe.default, decisions=decisions, source=source)


def _check_rules_match(rules: Iterable[PlanRule], nodes: list[tuple[str, str]]) -> None:
    names = [n for n, _ in nodes]
    op_types = sorted({op for _, op in nodes})
    for rule in rules:
        if rule.kind == "blocks":
            prefix, indices = _parse_blocks(str(rule.blocks))
            present = {i for i in (block_index(n, prefix) for n in names) if i is not None}
            absent = sorted(indices - present)
            if present and absent:
                raise QuantkitError(
                    f"rule '{rule.label}' names blocks this graph lacks: "
                    f"{', '.join(f'{prefix}.{i}' for i in absent[:8])}",
                    f"blocks in this graph: {', '.join(available_blocks(names)) or 'none'}",
                )
        if any(rule.matches(name, op) for name, op in nodes):
            continue
        if rule.kind == "op_type":
            close = difflib.get_close_matches(str(rule.op_type), op_types, n=5, cutoff=0.4)
            hint = f"closest op types in this graph: {', '.join(close or op_types[:8])}"
        elif rule.kind == "blocks":
            hint = f"blocks in this graph: {', '.join(available_blocks(names)) or 'none'}"
        else:
            selector = str(rule.node)
            probe = selector[3:] if rule.kind == "regex" else selector
            close = difflib.get_close_matches(probe, names, n=5, cutoff=0.3)
            hint = f"closest node names: {', '.join(close) if close else '(none similar)'}"
        raise QuantkitError(f"rule '{rule.label}' matches no node of the graph", hint)


def available_blocks(names: Iterable[str]) -> list[str]:
    """``layers.0-29``-style summaries of the block indices present in node names."""
    found: dict[str, set[int]] = {}
    for name in names:
        for prefix, index in re.findall(r"(?:^|/)([A-Za-z_][A-Za-z0-9_]*)\.(\d+)(?=/|$)", name):
            found.setdefault(prefix, set()).add(int(index))
    return [f"{p}.{min(ix)}-{max(ix)}" for p, ix in sorted(found.items())]


def _parse_blocks(spec: str) -> tuple[str, frozenset[int]]:
    match = _BLOCK_SPEC.match(spec.strip())
    if not match:
        raise QuantkitError(
            f"block range '{spec}' is not understood",
            "write <prefix>.<first>-<last>, e.g. layers.0-1, h.0-3 or layers.0-1,28-29",
        )
    indices: set[int] = set()
    for part in match.group("ranges").split(","):
        first, _, last = part.partition("-")
        lo, hi = int(first), int(last or first)
        if hi < lo:
            raise QuantkitError(f"block range '{spec}' runs backwards ({lo} > {hi})")
        indices.update(range(lo, hi + 1))
    return match.group("prefix"), frozenset(indices)


def _check_op_type(op_type: str) -> None:
    import onnx.defs

    if onnx.defs.has(op_type) or op_type in _CONTRIB_OPS:
        return
    known = sorted({s.name for s in onnx.defs.get_all_schemas()} | _CONTRIB_OPS)
    close = difflib.get_close_matches(op_type, known, n=3)
    raise QuantkitError(
        f"unknown op type '{op_type}'",
        f"did you mean {', '.join(close)}?" if close else "use an ONNX op type such as MatMul",
    )


# ONNX Runtime contrib ops that can appear in an exported or pre-optimized graph
_CONTRIB_OPS = frozenset({
    "FusedMatMul", "SkipLayerNormalization", "SimplifiedLayerNormalization",
    "SkipSimplifiedLayerNormalization", "MultiHeadAttention", "GroupQueryAttention",
    "RotaryEmbedding", "QuickGelu", "FastGelu", "BiasGelu",
})


def _opt_str(value: Any) -> str | None:
    return None if value is None else str(value)


def _as_model(onnx_model: Any) -> Any:
    if isinstance(onnx_model, (str, Path)):
        import onnx

        path = Path(onnx_model)
        if not path.is_file():
            raise QuantkitError(f"ONNX model {path} does not exist")
        return onnx.load(str(path), load_external_data=False)
    return onnx_model
