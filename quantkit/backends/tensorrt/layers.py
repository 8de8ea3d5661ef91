"""Network layers <-> ONNX nodes: applying a PrecisionPlan to the parser's layers, and reading back
what precision each engine layer really runs in (the engine inspector's JSON).

Pure functions over plain records, so they are unit-tested without TensorRT.

How TensorRT's ONNX parser names layers (onnx-tensorrt ``ImporterContext::registerLayer``): a layer
made for ONNX node ``N`` is named ``N``; further layers for the same node (one node can become
several layers) get a unique suffix ``N_<k>`` from a parser-wide counter, so ``k`` is not
predictable. Since TensorRT 10 the parser also sets each such layer's *metadata* to
``[ONNX Layer: N]`` (``| Local Function: F`` may follow the name inside the brackets); constant
layers and helper layers the parser adds for itself (``ONNXTRT_*``) carry no metadata. The engine
inspector reports the metadata of every layer fused into an engine layer, separated by ``\\x1f``
or ``\\x1e``. Metadata is therefore the primary key here; names are the fallback.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from quantkit.backends.tensorrt.dtypes import FLOAT_TYPES, PRECISION_OF
from quantkit.errors import QuantkitError
from quantkit.plan import Precision, PrecisionPlan

_METADATA_RE = re.compile(r"\[ONNX Layer: (.*?)\]")
_SUFFIX_RE = re.compile(r"^(.*)_(\d+)$")

# TensorRT layers whose precision is not a numeric choice: never constrained
UNCONSTRAINED_LAYER_TYPES = frozenset(
    {"CONSTANT", "SHAPE", "ASSERTION", "CONDITION", "CONDITIONAL_INPUT", "CONDITIONAL_OUTPUT",
     "ITERATOR", "LOOP_OUTPUT", "RECURRENCE", "TRIP_LIMIT", "FILL", "NON_ZERO", "IDENTITY",
     "QUANTIZE", "DEQUANTIZE", "DYNAMIC_QUANTIZE", "CAST"}
)
# ONNX ops that always become at least one real layer: a plan naming one the network lacks is
# a plan for another graph (other ops may legitimately vanish into constants at parse time)
COMPUTE_OP_TYPES = frozenset(
    {"MatMul", "Gemm", "Conv", "ConvTranspose", "Einsum", "Softmax", "LayerNormalization",
     "RMSNormalization", "Attention"}
)
COMPUTE_LAYER_TYPES = frozenset(
    {"MATRIX_MULTIPLY", "CONVOLUTION", "DECONVOLUTION", "EINSUM", "SOFTMAX", "NORMALIZATION"}
)
_TRT_TYPE_OF = {Precision.FP32: "FLOAT", Precision.FP16: "HALF", Precision.INT8: "INT8"}


def onnx_nodes_from_metadata(metadata: str) -> list[str]:
    """ONNX node names in a layer's metadata, in order: ``[ONNX Layer: a]\\x1f[ONNX Layer: b]``."""
    names = []
    for match in _METADATA_RE.finditer(metadata or ""):
        name = match.group(1).split(" | ", 1)[0]
        if name and name not in names:
            names.append(name)
    return names


@dataclass(frozen=True)
class NetworkLayer:
    """One layer of a parsed network, as plain data (TensorRT enum values by name)."""

    index: int
    name: str
    type: str  # LayerType name, e.g. MATRIX_MULTIPLY
    metadata: str = ""
    output_dtypes: tuple[str, ...] = ()  # DataType names of the outputs
    shape_outputs: bool = False  # some output is a shape tensor
    input_dtypes: tuple[str, ...] = ()  # DataType names of the (present) inputs

    @classmethod
    def of(cls, index: int, name: str, type: str, **kw: Any) -> NetworkLayer:
        return cls(index, name, type, **kw)


def onnx_node_of(layer: NetworkLayer, known_nodes: Iterable[str] | Mapping[str, Any]) -> str | None:
    """The ONNX node a parser layer was made for: from its metadata, else its name (exactly, or
    with the parser's ``_<k>`` uniqueness suffix removed); None for parser helpers."""
    nodes = onnx_nodes_from_metadata(layer.metadata)
    if nodes:
        return nodes[0]
    known = known_nodes if isinstance(known_nodes, (set, frozenset, Mapping)) else set(known_nodes)
    name = layer.name
    while True:
        if name in known:
            return name
        match = _SUFFIX_RE.match(name)
        if not match:
            return None
        name = match.group(1)


@dataclass(frozen=True)
class LayerAssignment:
    """What the implicit path sets on one layer: ``layer.precision`` and ``set_output_type``."""

    index: int
    layer: str
    node: str
    precision: Precision
    output_types: tuple[tuple[int, str], ...]  # (output index, DataType name)

    @property
    def trt_precision(self) -> str:
        return _TRT_TYPE_OF[self.precision]


@dataclass
class PlanMapping:
    assignments: list[LayerAssignment] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (layer, why)
    helper_layers: list[str] = field(default_factory=list)  # made by the parser, no ONNX node
    nodes_without_layers: list[str] = field(default_factory=list)
    by_metadata: int = 0  # layers matched to their node through "[ONNX Layer: ...]" metadata
    by_name: int = 0  # matched through the layer name (ambiguous if a node is named "<n>_<k>")

    @property
    def precisions(self) -> set[Precision]:
        return {a.precision for a in self.assignments}

    def summary(self) -> dict[str, Any]:
        return {
            "constrained_layers": len(self.assignments),
            "by_precision": dict(Counter(a.precision.value for a in self.assignments)),
            "skipped_layers": len(self.skipped),
            "helper_layers": len(self.helper_layers),
            "plan_nodes_without_layers": len(self.nodes_without_layers),
            "matched_by_metadata": self.by_metadata,
            "matched_by_name": self.by_name,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "summary": self.summary(),
            "assignments": [
                {"layer": a.layer, "node": a.node, "precision": a.precision.value,
                 "output_types": [list(t) for t in a.output_types]}
                for a in self.assignments
            ],
            "skipped": [{"layer": name, "reason": why} for name, why in self.skipped],
            "helper_layers": self.helper_layers,
            "plan_nodes_without_layers": self.nodes_without_layers,
        }


def _preview(names: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def map_plan_to_layers(layers: Sequence[NetworkLayer], plan: PrecisionPlan) -> PlanMapping:
    """Per-layer precisions for the implicit path.

    Each layer takes the precision of the plan's decision for its ONNX node. FP16 and FP32 layers
    also get that type on every output; INT8 layers leave the output type to TensorRT (an INT8
    GEMM may write FP16/FP32 and so spare a reformat). Constants, shape arithmetic and layers
    with non-float inputs or outputs (indexing, comparisons) are left alone. A plan naming compute
    nodes the network does not have, or a network with compute layers the plan does not know, is
    refused: the plan was resolved for another graph.
    """
    decisions = plan.decisions
    mapping = PlanMapping()
    seen_nodes: set[str] = set()
    unplanned: list[str] = []
    for layer in layers:
        node = onnx_node_of(layer, decisions)
        if node is None:
            mapping.helper_layers.append(layer.name)
            continue
        if onnx_nodes_from_metadata(layer.metadata):
            mapping.by_metadata += 1
        else:
            mapping.by_name += 1
        decision = decisions.get(node)
        if decision is None:
            if layer.type in COMPUTE_LAYER_TYPES:
                unplanned.append(node)
            else:
                mapping.skipped.append((layer.name, f"ONNX node '{node}' is not in the plan"))
            continue
        seen_nodes.add(node)
        if layer.type in UNCONSTRAINED_LAYER_TYPES:
            mapping.skipped.append((layer.name, f"{layer.type} layer"))
            continue
        if layer.shape_outputs:
            mapping.skipped.append((layer.name, "computes a shape"))
            continue
        if not layer.output_dtypes or any(t not in FLOAT_TYPES for t in layer.output_dtypes):
            mapping.skipped.append(
                (layer.name, f"non-float outputs {list(layer.output_dtypes)}")
            )
            continue
        if any(t not in FLOAT_TYPES for t in layer.input_dtypes):
            # indices, masks, conditions: an indexing layer, its precision is its data's
            mapping.skipped.append((layer.name, f"non-float inputs {list(layer.input_dtypes)}"))
            continue
        precision = decision.precision
        outputs: tuple[tuple[int, str], ...] = ()
        if precision is not Precision.INT8:
            outputs = tuple((i, _TRT_TYPE_OF[precision]) for i in range(len(layer.output_dtypes)))
        mapping.assignments.append(
            LayerAssignment(layer.index, layer.name, node, precision, outputs)
        )
    missing = [
        name for name, d in decisions.items()
        if name not in seen_nodes and d.op_type in COMPUTE_OP_TYPES
    ]
    if decisions and not seen_nodes and layers:
        missing = list(decisions)
    if missing:
        raise QuantkitError(
            f"the precision plan names {len(missing)} node(s) the TensorRT network does not "
            f"have: {_preview(missing)}",
            "the plan was resolved for another ONNX graph; resolve it again for this model",
        )
    if unplanned:
        unplanned = list(dict.fromkeys(unplanned))
        raise QuantkitError(
            f"the TensorRT network has {len(unplanned)} compute node(s) the precision plan does "
            f"not cover: {_preview(unplanned)}",
            "the plan was resolved for another ONNX graph; resolve it again for this model",
        )
    mapping.nodes_without_layers = [n for n in decisions if n not in seen_nodes]
    return mapping


def check_explicit_network(layers: Sequence[NetworkLayer], wanted: set[Precision]) -> None:
    """A strongly typed network runs what its ONNX says: refuse to label an engine INT8 or FP16
    when the ONNX holds no Q/DQ nodes or no FP16 tensors."""
    types = {layer.type for layer in layers}
    if Precision.INT8 in wanted and not types & {"QUANTIZE", "DEQUANTIZE", "DYNAMIC_QUANTIZE"}:
        raise QuantkitError(
            "INT8 was asked for, but the ONNX given to the explicit (strongly typed) path has no "
            "QuantizeLinear/DequantizeLinear nodes, so TensorRT would build it in float",
            "pass the Q/DQ ONNX of the plan (option qdq_onnx), not the FP32 export",
        )
    if Precision.FP16 in wanted and not any("HALF" in layer.output_dtypes for layer in layers):
        raise QuantkitError(
            "FP16 was asked for, but the ONNX given to the explicit (strongly typed) path has no "
            "FP16 tensors, so TensorRT would build it in FP32",
            "pass the ONNX with the plan's FP16 casts (option qdq_onnx), not the FP32 export",
        )


# -- the engine inspector -------------------------------------------------------------------------

_DTYPE_TOKENS = {
    "fp32": "FLOAT", "float": "FLOAT", "float32": "FLOAT",
    "fp16": "HALF", "half": "HALF", "float16": "HALF",
    "bf16": "BF16", "bfloat16": "BF16",
    "int8": "INT8", "fp8": "FP8", "int4": "INT4", "fp4": "FP4",
    "int32": "INT32", "int64": "INT64", "bool": "BOOL", "uint8": "UINT8",
}
_TOKEN_RE = re.compile(r"[A-Za-z]+[0-9]*")
# lower rank = lower precision: a layer's precision is its lowest-precision numeric input
_RANK = {"INT4": 0, "FP4": 0, "INT8": 1, "FP8": 1, "HALF": 2, "BF16": 2, "FLOAT": 3}


def dtype_of_format(text: str) -> str | None:
    """``"Row major linear FP16 format"`` -> ``HALF``; ``"Int8"`` -> ``INT8``; else None."""
    for token in _TOKEN_RE.findall(text or ""):
        found = _DTYPE_TOKENS.get(token.lower())
        if found:
            return found
    return None


@dataclass(frozen=True)
class EngineLayer:
    name: str
    type: str
    precision: str  # int8 | fp8 | fp16 | bf16 | fp32 | int4 | fp4 | none | unknown
    input_types: tuple[str, ...]
    output_types: tuple[str, ...]
    onnx_nodes: tuple[str, ...]
    tactic: str | None = None

    @property
    def is_reformat(self) -> bool:
        return "reformat" in self.type.lower() or self.name.startswith("Reformatting CopyNode")

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.type,
            "precision": self.precision,
            "inputs": list(self.input_types),
            "outputs": list(self.output_types),
            "onnx_nodes": list(self.onnx_nodes),
            "tactic": self.tactic,
        }


def _layer_precision(inputs: Sequence[str], outputs: Sequence[str]) -> str:
    for types in (inputs, outputs):
        ranked = [t for t in types if t in _RANK]
        if ranked:
            return PRECISION_OF[min(ranked, key=lambda t: _RANK[t])]
    return "none" if (inputs or outputs) else "unknown"


def _io_dtypes(tensors: Any) -> tuple[str, ...]:
    """Data types of a layer's inputs or outputs: TensorRT 10 writes one ``Format/Datatype``
    string ("Row major linear FP16 format"); TensorRT 11 splits it into ``Format`` and
    ``DataType`` ("Half")."""
    found = []
    for tensor in tensors if isinstance(tensors, list) else []:
        if not isinstance(tensor, dict):
            continue
        for key in ("DataType", "Format/Datatype", "Format/DataType", "Format"):
            dtype = dtype_of_format(str(tensor.get(key, "")))
            if dtype:
                found.append(dtype)
                break
    return tuple(found)


def parse_engine_information(text: str) -> list[EngineLayer]:
    """Layers of ``EngineInspector.get_engine_information(LayerInformationFormat.JSON)``.

    With ``ProfilingVerbosity.DETAILED`` each layer is an object with ``Name``, ``LayerType``,
    ``Inputs``/``Outputs`` (each with ``Format/Datatype``, or ``Format`` and ``DataType`` from
    TensorRT 11), ``TacticName`` and ``Metadata``; with less verbosity layers are bare names, and
    their precision is ``unknown``.
    """
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise QuantkitError(f"the engine inspector's output is not JSON: {exc}") from None
    entries = data.get("Layers", []) if isinstance(data, dict) else []
    layers = []
    for entry in entries:
        if isinstance(entry, str):
            layers.append(EngineLayer(entry, "", "unknown", (), (), ()))
            continue
        inputs = _io_dtypes(entry.get("Inputs", []))
        outputs = _io_dtypes(entry.get("Outputs", []))
        layers.append(
            EngineLayer(
                name=str(entry.get("Name", "")),
                type=str(entry.get("LayerType", "")),
                precision=_layer_precision(inputs, outputs),
                input_types=inputs,
                output_types=outputs,
                onnx_nodes=tuple(onnx_nodes_from_metadata(str(entry.get("Metadata", "")))),
                tactic=entry.get("TacticName"),
            )
        )
    return layers


def summarize_engine_layers(layers: Sequence[EngineLayer]) -> dict[str, Any]:
    compute = [layer for layer in layers if not layer.is_reformat]
    by_precision = Counter(layer.precision for layer in compute)
    int8_nodes = sorted({n for layer in compute if layer.precision == "int8"
                         for n in layer.onnx_nodes})
    return {
        "engine_layers": len(layers),
        "reformat_layers": len(layers) - len(compute),
        "by_precision": dict(sorted(by_precision.items())),
        "onnx_nodes_in_int8_layers": len(int8_nodes),
    }


def compare_with_plan(layers: Sequence[EngineLayer], plan: PrecisionPlan) -> dict[str, Any]:
    """Planned vs realized precision per ONNX node, for nodes the inspector names.

    A node's realized precision is that of the engine layer whose metadata lists it (for a layer
    fused from many nodes, the fused layer's precision)."""
    realized: dict[str, tuple[str, str]] = {}
    for layer in layers:
        if layer.is_reformat:
            continue
        for node in layer.onnx_nodes:
            realized.setdefault(node, (layer.precision, layer.name))
    agree = 0
    planned_int8 = realized_int8 = 0
    differ = []
    for node, decision in plan.decisions.items():
        if decision.precision is Precision.INT8:
            planned_int8 += 1
        if node not in realized:
            continue
        precision, layer_name = realized[node]
        if precision == decision.precision.value:
            agree += 1
            realized_int8 += decision.precision is Precision.INT8
        else:
            differ.append({"node": node, "planned": decision.precision.value,
                           "realized": precision, "engine_layer": layer_name})
    return {
        "plan_nodes": len(plan.decisions),
        "found_in_engine": agree + len(differ),
        "as_planned": agree,
        "planned_int8": planned_int8,
        "realized_int8": realized_int8,
        "differ": differ,
    }
