"""Realise a PrecisionPlan in an ONNX graph: Q/DQ pairs for INT8 ops, Cast-bounded FP16 regions.

What the rewrite produces (explicit quantization, the form TensorRT 10/11 and ONNX Runtime read):

* **INT8 ops** (MatMul, Gemm, including the attention batched MatMuls). Every activation input gets
  its own ``QuantizeLinear -> DequantizeLinear`` pair: per-tensor, symmetric, int8, zero point 0,
  scale ``amax / 127`` from the calibration table. Constant weights are stored pre-quantized as
  int8 initializers followed by one ``DequantizeLinear``: per output channel, symmetric
  (``max|w| / 127`` per channel, values in [-127, 127]), along the axis that holds the output
  channels in the weight's layout (MatMul ``B[K, N]``: axis 1; Gemm ``transB=1`` ``B[N, K]``:
  axis 0). A weight reached through a ``Transpose`` of an initializer (a tied LM head) is folded
  into the int8 initializer. Gemm biases stay float. The Q/DQ sit on the op's inputs and nowhere
  else, as TensorRT's Q/DQ placement guidance asks, so TensorRT and ONNX Runtime both fuse
  ``DQ -> op`` into an integer kernel.
* **Weight layouts** (``QdqOptions.weight_layout``; ONNX Runtime engines only, TensorRT always
  gets ``s8``): ``s8`` is the symmetric int8 weight above, which ONNX Runtime multiplies with its
  u8 x s8 kernels (it turns int8 activation pairs into uint8 ones itself); on x86 without VNNI
  those kernels add pairs of products into int16 with saturation. ``u8`` stores the same
  integers plus 128 as uint8 with zero point 128: DequantizeLinear gives the very same values,
  and ONNX Runtime runs them on its u8 x u8 kernels, which widen to int16 before multiplying and
  cannot saturate. ``s7`` quantizes weights to [-63, 63] (``max|w| / 63``; ONNX Runtime's
  ``reduce_range``): it cannot saturate either, but has half the weight resolution.
* **One pair per consumer.** ONNX Runtime fuses ``DQ -> MatMul`` into an integer kernel only when
  the DequantizeLinear feeds that op alone, and its common-subexpression pass merges identical
  Q/DQ nodes back together (which is why ``quantize_static``'s ``DedicatedQDQPair`` does not help).
  So each pair has its own scale and zero-point initializers. By default (``shared_inputs="fuse"``)
  sibling MatMuls that read the same activation with constant 2-D weights at the same precision
  (Llama's q/k/v and gate/up projections) are first merged into one MatMul over concatenated
  weights followed by a Split, the shape GPT-2's fused ``c_attn`` already has: one quantization of
  the input and one larger GEMM. The split outputs keep the original tensor names.
* **FP16 nodes** compute in float16: their float initializers are converted (clamped to the
  float16 range), float inputs from FP32 producers pass through one shared ``Cast``, and their
  outputs are cast back to float32 where an FP32/INT8 consumer or a graph output reads them. Ops
  whose output type is fixed by an attribute (Cast, ConstantOfShape, ...) and nodes with no float
  input stay as they are. Graph inputs and outputs keep their types.
  With ``fp16="emulate"`` (a CPU without float16 kernels) the same nodes compute in float32 but
  every value a float16 engine holds in float16 is rounded to it: initializers are stored
  rounded, and each input entering the region and each output of an FP16 node passes through a
  ``Cast`` to float16 and back (overflow gives inf, as in float16). The perplexity is FP16's
  (accumulation inside an op is float32, as in float16 GEMMs with float32 accumulators); the
  speed is not, so such engines are accuracy-only.
* **FP32 nodes** are untouched.

``rewrite_model`` also reports what was built (``as_built``: node -> precision actually used),
how many Q/DQ pairs each INT8 op got, and which nodes were merged.

The weight arithmetic it stores (scales, integers, layouts) is :mod:`quantkit.weight_quant`;
measuring a graph, rewritten or not (MACs, INT8 coverage, Q/DQ counts), is
:mod:`quantkit.graph_stats`.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from quantkit.errors import QuantkitError
from quantkit.graph_edit import constant_weight, node_attrs, range_source
from quantkit.graph_stats import _elem_types
from quantkit.onnx_io import INLINE_BYTES, SpillFile, read_initializer
from quantkit.plan import QUANTIZABLE_OP_TYPES, Precision, PrecisionPlan, int8_capable
from quantkit.weight_quant import (
    check_given_weights_layout,
    check_weight_layout,
    quantize_weight,
    stored_weight,
    symmetric_scale,
    weight_axis,
    weight_qmax,
)

FP16_MAX = float(np.finfo(np.float16).max)
SHARED_INPUT_MODES = ("fuse", "dedicated")
FP16_MODES = ("native", "emulate")

# Ops whose output element type is set by an attribute or which compute nothing in float: an FP16
# decision leaves them as they are.
_TYPE_FIXED_OPS = frozenset({
    "Cast", "CastLike", "Constant", "ConstantOfShape", "EyeLike", "RandomNormal",
    "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli",
    "Shape", "Size", "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear",
})


@dataclass(frozen=True)
class QdqOptions:
    """How INT8 is laid out. ``per_channel=False`` quantizes weights per tensor (for comparison);
    ``shared_inputs`` says what happens when one activation feeds several INT8 MatMuls:
    ``fuse`` merges sibling MatMuls with constant weights into one (then splits the result),
    ``dedicated`` only gives each consumer its own Q/DQ pair."""

    per_channel: bool = True
    shared_inputs: str = "fuse"
    weight_layout: str = "s8"  # s8 | u8 | s7: how INT8 weights are stored (module docstring)
    fp16: str = "native"  # native: float16 tensors; emulate: float32 rounded to float16

    def __post_init__(self) -> None:
        if self.shared_inputs not in SHARED_INPUT_MODES:
            raise QuantkitError(
                f"unknown shared_inputs mode '{self.shared_inputs}'",
                f"use one of: {', '.join(SHARED_INPUT_MODES)}",
            )
        if self.fp16 not in FP16_MODES:
            raise QuantkitError(f"unknown fp16 mode '{self.fp16}'",
                                f"use one of: {', '.join(FP16_MODES)}")
        check_weight_layout(self.weight_layout)

    def to_dict(self) -> dict[str, Any]:
        return {"per_channel": self.per_channel, "shared_inputs": self.shared_inputs,
                "weight_layout": self.weight_layout, "fp16": self.fp16}


@dataclass
class RewriteResult:
    """The rewritten model and what it holds, keyed by the original node names."""

    model: Any  # onnx.ModelProto
    as_built: dict[str, str]  # node -> int8 | fp16 | fp32 | none (computes no floats)
    qdq: dict[str, dict[str, int]]  # INT8 node -> {"activation": pairs, "weight": DQs}
    fused: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        counts = Counter(self.as_built.values())
        return {
            "as_built_counts": dict(sorted(counts.items())),
            "qdq_pairs": sum(v["activation"] for v in self.qdq.values()),
            "weight_dequantize": sum(v["weight"] for v in self.qdq.values()),
            "fused": self.fused,
            "notes": self.notes,
        }


# -- the rewrite -------------------------------------------------------------------------------
def rewrite_model(
    model: Any,
    plan: PrecisionPlan,
    amax: Mapping[str, float] | None,
    options: QdqOptions | None = None,
    skipped: Mapping[str, str] | None = None,
    weights: Mapping[str, Any] | None = None,
    *,
    weights_dir: Path | None = None,
    spill: SpillFile | None = None,
) -> RewriteResult:
    """Return a rewritten copy of ``model`` (an ONNX ModelProto) that realises ``plan``.

    ``amax`` maps activation tensor names to calibrated ranges (``CalibrationTable.amax``); it is
    needed when the plan has INT8 nodes. A tensor missing from it may be a Reshape/Transpose view
    of one that is there. ``skipped`` (``CalibrationTable.skipped``) only improves the error
    message for tensors the calibration left out on purpose. ``weights``
    (``CalibrationTable.weights``: GPTQ int8 weights by weight key) replaces round-to-nearest
    for the weights it names.

    A model past the memory budget comes without its weights (``onnx.load(...,
    load_external_data=False)``): each external weight is read from ``weights_dir`` when the
    rewrite needs it, and every new initializer of at least 1 KiB (int8 weights, fused or
    float16 weights) goes to ``spill`` as it is made, the graph keeping a reference. Memory then
    holds a weight or a fused group at a time, never the FP32 model and its rewrite; the values
    are the ones the in-memory rewrite makes, bit for bit."""
    import onnx

    options = options or QdqOptions()
    out = onnx.ModelProto()
    out.CopyFrom(model)
    rewriter = _Rewriter(out, plan, amax, options, skipped or {}, weights or {})
    rewriter.weights_dir, rewriter.spill = weights_dir, spill
    return rewriter.run()


class _Rewriter:
    def __init__(self, model: Any, plan: PrecisionPlan, amax: Mapping[str, float] | None,
                 options: QdqOptions, skipped: Mapping[str, str],
                 weights: Mapping[str, Any]) -> None:
        self.model = model
        self.weights = dict(weights)  # weight key -> QuantizedWeight (GPTQ); fused ones added
        self.graph = model.graph
        self.plan = plan
        self.amax = amax
        self.skipped = skipped
        self.options = options
        self.inits: dict[str, Any] = {t.name: t for t in self.graph.initializer}
        self.new_inits: list[Any] = []
        self.as_built: dict[str, str] = {}
        self.qdq: dict[str, dict[str, int]] = {}
        self.fused: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self._weight_cache: dict[tuple[str, tuple[int, ...] | None, int | None], str] = {}
        self._names: set[str] = set()
        self._fused_members: dict[str, list[str]] = {}  # fused MatMul -> original MatMuls
        self._split_nodes: set[str] = set()
        self._fp16_nodes: set[str] = set()
        self.weights_dir: Path | None = None  # where external weights are read from
        self.spill: SpillFile | None = None  # where new initializers go, if not in the graph

    # -- helpers ---------------------------------------------------------------------------
    def run(self) -> RewriteResult:
        self._check_plan_covers_graph()
        self.types = _elem_types(self.model)
        self.producers = {o: n for n in self.graph.node for o in n.output if o}
        int8_nodes = [n for n in self.graph.node if self._precision(n.name) == Precision.INT8]
        self._check_int8(int8_nodes)
        self._names = {n.name for n in self.graph.node} | set(self.inits)
        self._names |= {o for n in self.graph.node for o in n.output}
        if int8_nodes and self.options.shared_inputs == "fuse":
            self._fuse_siblings(int8_nodes)
        self._insert_qdq()
        self._fp16_regions()
        self._finish()
        self._record_as_built()
        return RewriteResult(self.model, self.as_built, self.qdq, self.fused, self.notes)

    def _precision(self, node_name: str) -> Precision:
        decision = self.plan.decisions.get(node_name)
        # nodes the rewrite added (Q/DQ, Casts) are not the plan's: they stay as they are
        return decision.precision if decision is not None else Precision.FP32

    def _unique(self, name: str) -> str:
        candidate, i = name, 1
        while candidate in self._names:
            candidate = f"{name}_{i}"
            i += 1
        self._names.add(candidate)
        return candidate

    def _add_init(self, array: np.ndarray, name: str) -> str:
        name = self._unique(name)
        tensor = self._tensor(np.asarray(array), name)
        self.new_inits.append(tensor)
        self.inits[name] = tensor
        return name

    def _tensor(self, array: np.ndarray, name: str) -> Any:
        """An initializer of ``array``: in the graph, or written to the spill file (with a
        reference in the graph) when there is one and it is not small."""
        from onnx import numpy_helper

        if self.spill is not None and array.nbytes >= INLINE_BYTES:
            return self.spill.tensor(array, name)
        return numpy_helper.from_array(array, name)

    def _const_value(self, tensor: str) -> np.ndarray | None:
        if tensor in self.inits:
            return np.asarray(read_initializer(self.inits[tensor], Path(self.weights_dir or ".")))
        return None

    def _constant_weight(self, tensor: str) -> tuple[str, tuple[int, ...] | None] | None:
        return constant_weight(tensor, self.inits, self.producers)

    def _check_plan_covers_graph(self) -> None:
        names = [n.name for n in self.graph.node]
        missing = [n for n in names if n not in self.plan.decisions]
        extra = [n for n in self.plan.decisions if n not in set(names)]
        if missing or extra:
            what = (f"{len(missing)} graph nodes are not in it (e.g. {', '.join(missing[:3])})"
                    if missing else f"it names {len(extra)} nodes the graph lacks "
                                    f"(e.g. {', '.join(extra[:3])})")
            raise QuantkitError(f"the precision plan was made for another graph: {what}",
                                "resolve the plan against this ONNX model")

    def _check_int8(self, nodes: list[Any]) -> None:
        bad = [f"{n.name} ({n.op_type})" for n in nodes if not int8_capable(n.name, n.op_type)]
        if bad:
            raise QuantkitError(f"these nodes cannot run in INT8: {', '.join(bad[:5])}",
                                f"only {', '.join(sorted(QUANTIZABLE_OP_TYPES))} can")
        if not nodes:
            return
        if self.amax is None:
            raise QuantkitError("an INT8 build needs a calibration table",
                                "pass --table (made by 'quantkit calibrate')")
        missing: list[str] = []
        for node in nodes:
            for tensor in node.input[:2]:
                if self._constant_weight(tensor) is None and self._lookup_amax(tensor) is None:
                    missing.append(tensor)
        if missing:
            missing = list(dict.fromkeys(missing))
            listed = [f"{t} (skipped: {self.skipped[t]})" if t in self.skipped else t
                      for t in missing[:8]]
            raise QuantkitError(
                f"the calibration table has no range for {len(missing)} tensor(s) the plan "
                f"quantizes: {', '.join(listed)}{' ...' if len(missing) > 8 else ''}",
                "calibrate this model again, or keep those nodes out of INT8 in the plan",
            )

    def _lookup_amax(self, tensor: str) -> float | None:
        """The calibrated range of ``tensor``, or of the tensor it is a reshaped/transposed view
        of (such ops move values without changing them, so the range is the same)."""
        assert self.amax is not None
        key = range_source(tensor, self.amax, self.producers)
        return None if key is None else float(self.amax[key])

    # -- sibling fusion --------------------------------------------------------------------
    def _fuse_siblings(self, int8_nodes: list[Any]) -> None:
        """Merge INT8 MatMuls that share an activation input and have constant 2-D weights."""
        from onnx import helper

        groups: dict[str, list[Any]] = defaultdict(list)
        for node in int8_nodes:
            if node.op_type != "MatMul" or len(node.input) != 2:
                continue
            act, weight = node.input[0], node.input[1]
            if self._constant_weight(act) is not None or weight not in self.inits:
                continue
            if len(self.inits[weight].dims) != 2 or self.types.get(weight) != 1:
                continue
            groups[act].append(node)
        replace: dict[str, list[Any]] = {}
        drop: set[str] = set()
        for act, members in groups.items():
            if len(members) < 2:
                continue
            weights = [self._const_value(m.input[1]) for m in members]
            assert all(w is not None for w in weights)
            if len({w.shape[0] for w in weights if w is not None}) != 1:
                continue
            fused_w = np.concatenate([w for w in weights if w is not None], axis=1)
            name = _fused_name([m.name for m in members])
            mm_name = self._unique(name)
            w_name = self._add_init(fused_w.astype(np.float32), f"{mm_name}/weight")
            self._fuse_given_weights(w_name, [m.input[1] for m in members], weights)
            sizes = self._add_init(np.array([w.shape[1] for w in weights if w is not None],
                                            dtype=np.int64), f"{mm_name}/split")
            mm_out = self._unique(f"{mm_name}_output_0")
            split_name = self._unique(mm_name.rsplit("/", 1)[0] + "/Split")
            matmul = helper.make_node("MatMul", [act, w_name], [mm_out], name=mm_name)
            split = helper.make_node("Split", [mm_out, sizes], [m.output[0] for m in members],
                                     name=split_name, axis=-1)
            replace[members[0].name] = [matmul, split]
            drop.update(m.name for m in members)
            self.fused.append({"node": mm_name, "split": split_name,
                               "members": [m.name for m in members]})
            self._fused_members[mm_name] = [m.name for m in members]
            self._split_nodes.add(split_name)
        if not replace:
            return
        nodes = []
        for node in self.graph.node:
            if node.name in replace:
                nodes.extend(replace[node.name])
            if node.name not in drop:
                nodes.append(node)
        del self.graph.node[:]
        self.graph.node.extend(nodes)
        self.producers = {o: n for n in self.graph.node for o in n.output if o}

    def _fuse_given_weights(self, fused: str, sources: list[str],
                            values: list[np.ndarray | None]) -> None:
        """The given int8 weights of fused siblings, side by side (per-channel quantization
        treats output channels apart, so this is what each member would have had)."""
        from quantkit.calib.gptq import QuantizedWeight, weight_key

        given = [self.weights.get(weight_key(src, None)) for src in sources]
        if not any(given) or not self.options.per_channel:
            return
        parts = [g if g is not None else QuantizedWeight(*quantize_weight(v, 1), 1)
                 for g, v in zip(given, values, strict=True) if v is not None]
        self.weights[weight_key(fused, None)] = QuantizedWeight(
            np.concatenate([p.q for p in parts], axis=1),
            np.concatenate([p.scale for p in parts]), 1)

    def _node_precision(self, node: Any) -> Precision:
        """Precision of a node of the (possibly fused) graph."""
        if node.name in self._fused_members:
            return Precision.INT8
        if node.name in self._split_nodes:
            return Precision.FP32  # moves INT8 results, computes nothing
        return self._precision(node.name)

    # -- Q/DQ ------------------------------------------------------------------------------
    def _insert_qdq(self) -> None:
        from onnx import helper

        nodes: list[Any] = []
        for node in self.graph.node:
            if self._node_precision(node) != Precision.INT8:
                nodes.append(node)
                continue
            counts = {"activation": 0, "weight": 0}
            attrs = node_attrs(node)
            for index in range(min(2, len(node.input))):
                tensor = node.input[index]
                base = f"{node.name}/input_{index}"
                weight = self._constant_weight(tensor)
                if weight is not None:
                    q_name, scale, axis = self._quantized_weight(
                        node, index, weight, attrs, base)
                    s_name = self._add_init(scale, f"{base}/scale")
                    _, zero = stored_weight(np.zeros((), np.int8), self.options.weight_layout)
                    zp_name = self._add_init(np.full(scale.shape, zero), f"{base}/zero_point")
                    dq_out = self._unique(f"{base}/DequantizeLinear_output_0")
                    dq = helper.make_node(
                        "DequantizeLinear", [q_name, s_name, zp_name], [dq_out],
                        name=self._unique(f"{base}/DequantizeLinear"))
                    if scale.ndim == 1:  # per output channel
                        dq.attribute.append(helper.make_attribute("axis", axis))
                    nodes.append(dq)
                    counts["weight"] += 1
                else:
                    scale = symmetric_scale(float(self._amax(tensor)))
                    # own scale/zero-point initializers: identical Q/DQ nodes would be merged by
                    # ONNX Runtime's common-subexpression pass and lose the integer fusion
                    s_name = self._add_init(scale.reshape(()), f"{base}/scale")
                    zp_name = self._add_init(np.zeros((), np.int8), f"{base}/zero_point")
                    q_out = self._unique(f"{base}/QuantizeLinear_output_0")
                    dq_out = self._unique(f"{base}/DequantizeLinear_output_0")
                    nodes.append(helper.make_node(
                        "QuantizeLinear", [tensor, s_name, zp_name], [q_out],
                        name=self._unique(f"{base}/QuantizeLinear")))
                    nodes.append(helper.make_node(
                        "DequantizeLinear", [q_out, s_name, zp_name], [dq_out],
                        name=self._unique(f"{base}/DequantizeLinear")))
                    counts["activation"] += 1
                node.input[index] = dq_out
            nodes.append(node)
            if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
                nodes.extend(self._split_gemm_bias(node, attrs))
            members = self._fused_members.get(node.name, [node.name])
            for member in members:
                self.qdq[member] = dict(counts)
                self.as_built[member] = Precision.INT8.value
        del self.graph.node[:]
        self.graph.node.extend(nodes)

    def _split_gemm_bias(self, node: Any, attrs: Mapping[str, Any]) -> list[Any]:
        """Move an INT8 Gemm's float bias into an Add after it.

        ONNX Runtime fuses ``DQ -> Gemm`` into QGemm only without a float bias (it wants an
        int32-quantized one, which TensorRT cannot read); TensorRT fuses MatMul + bias Add itself.
        """
        from onnx import helper

        bias = node.input[2]
        beta = float(attrs.get("beta", 1.0))
        added: list[Any] = []
        value = self._const_value(bias)
        if value is not None:
            bias_name = bias if beta == 1.0 else self._add_init(
                (value.astype(np.float32) * np.float32(beta)), f"{node.name}/bias")
        else:
            bias_name = bias
            if beta != 1.0:
                beta_name = self._add_init(np.array(beta, np.float32), f"{node.name}/beta")
                bias_name = self._unique(f"{node.name}/bias/Mul_output_0")
                added.append(helper.make_node("Mul", [bias, beta_name], [bias_name],
                                              name=self._unique(f"{node.name}/bias/Mul")))
        out = node.output[0]
        pre_bias = self._unique(f"{node.name}/no_bias_output_0")
        node.output[0] = pre_bias
        del node.input[2]
        for attr in list(node.attribute):
            if attr.name == "beta":
                node.attribute.remove(attr)
        added.append(helper.make_node("Add", [pre_bias, bias_name], [out],
                                      name=self._unique(f"{node.name}/bias/Add")))
        return added

    def _amax(self, tensor: str) -> float:
        value = self._lookup_amax(tensor)
        assert value is not None
        if not math.isfinite(value) or value < 0:
            raise QuantkitError(f"calibrated range of {tensor} is {value}, not a finite amax")
        return value

    def _quantized_weight(self, node: Any, index: int, weight: tuple[str, tuple[int, ...] | None],
                          attrs: Mapping[str, Any], base: str) -> tuple[str, np.ndarray, int]:
        source, perm = weight
        value = self._const_value(source)
        assert value is not None
        if value.dtype != np.float32:
            raise QuantkitError(f"weight {source} of {node.name} is {value.dtype}, not float32")
        if perm is not None:
            value = np.transpose(value, perm)
        axis = weight_axis(node.op_type, index, value.ndim, attrs)
        per_axis = axis if self.options.per_channel else None
        key = (source, perm, per_axis)
        layout = self.options.weight_layout
        q, scale = self._given_weight(source, perm, value, per_axis) or \
            quantize_weight(value, per_axis, weight_qmax(layout))
        if key in self._weight_cache:
            q_name = self._weight_cache[key]
        else:
            stored, _ = stored_weight(q, layout)
            suffix = {"s8": "int8", "u8": "uint8", "s7": "int7"}[layout]
            q_name = self._add_init(stored, f"{source}_{suffix}" if perm is None
                                    else f"{source}_T_{suffix}")
            self._weight_cache[key] = q_name
        return q_name, scale, axis

    def _given_weight(self, source: str, perm: tuple[int, ...] | None, value: np.ndarray,
                      axis: int | None) -> tuple[np.ndarray, np.ndarray] | None:
        """The calibration's int8 weight (GPTQ) for this weight, checked against it."""
        from quantkit.calib.gptq import weight_key

        given = self.weights.get(weight_key(source, perm))
        if given is None:
            return None
        check_given_weights_layout(self.options.weight_layout)
        if axis is None:
            raise QuantkitError("the calibration table's int8 weights (GPTQ) are per output "
                                "channel; this build asks for per-tensor weights",
                                "build with per-channel weights, or calibrate without "
                                "--weights gptq")
        if given.q.shape != value.shape or given.axis != axis % value.ndim:
            raise QuantkitError(f"the calibration table's int8 weight for {source} has shape "
                                f"{given.q.shape} (axis {given.axis}); the model's is "
                                f"{value.shape} (axis {axis})",
                                "the table belongs to another export; recalibrate")
        return given.q, given.scale

    # -- FP16 ------------------------------------------------------------------------------
    def _fp16_regions(self) -> None:
        from onnx import TensorProto, helper

        float_t, half_t = TensorProto.FLOAT, TensorProto.FLOAT16
        consumers: dict[str, list[str]] = defaultdict(list)
        for node in self.graph.node:
            for tensor in node.input:
                consumers[tensor].append(node.name)
        graph_outputs = {o.name for o in self.graph.output}

        def is_float(tensor: str) -> bool:
            return self.types.get(tensor) == float_t

        def computes_fp16(node: Any) -> bool:
            return (self._node_precision(node) == Precision.FP16
                    and node.op_type not in _TYPE_FIXED_OPS
                    and not any(a.type in (5, 10) for a in node.attribute)  # GRAPH(S): If/Loop
                    and any(is_float(t) for t in node.input if t))

        fp16_nodes = {n.name for n in self.graph.node if computes_fp16(n)}
        self._fp16_nodes = fp16_nodes
        if not fp16_nodes:
            return
        if self.options.fp16 == "emulate":
            self._fp16_emulated(fp16_nodes, is_float)
            return
        half_name: dict[str, str] = {}  # fp32 tensor -> its fp16 twin
        converted_inits: set[str] = set()
        clamped = 0
        nodes: list[Any] = []
        for node in self.graph.node:
            if node.name not in fp16_nodes:
                nodes.append(node)
                continue
            for i, tensor in enumerate(node.input):
                if not tensor or not is_float(tensor):
                    continue
                if tensor in half_name:
                    node.input[i] = half_name[tensor]
                    continue
                only_fp16 = all(c in fp16_nodes for c in consumers[tensor])
                if (tensor in self.inits and only_fp16 and tensor not in graph_outputs
                        and tensor not in converted_inits):
                    half, over = self._fp16_constant(tensor)
                    clamped += over
                    self.inits[tensor].CopyFrom(self._tensor(half, tensor))
                    converted_inits.add(tensor)
                    half_name[tensor] = tensor
                    continue
                cast_out = self._unique(f"{tensor}/to_fp16")
                nodes.append(helper.make_node("Cast", [tensor], [cast_out], to=half_t,
                                              name=self._unique(f"{tensor}/Cast_to_fp16")))
                half_name[tensor] = cast_out
                node.input[i] = cast_out
            nodes.append(node)
            for i, tensor in enumerate(node.output):
                if not tensor or not is_float(tensor):
                    continue
                needs_fp32 = tensor in graph_outputs or any(
                    c not in fp16_nodes for c in consumers[tensor])
                if not needs_fp32:
                    half_name[tensor] = tensor
                    continue
                half_out = self._unique(f"{tensor}/fp16")
                node.output[i] = half_out
                half_name[tensor] = half_out
                nodes.append(helper.make_node("Cast", [half_out], [tensor], to=float_t,
                                              name=self._unique(f"{tensor}/Cast_to_fp32")))
        del self.graph.node[:]
        self.graph.node.extend(nodes)
        if clamped:
            self.notes.append(f"{clamped} float32 constant values clamped to the float16 range")

    def _fp16_constant(self, tensor: str) -> tuple[np.ndarray, int]:
        """An initializer in float16, clamped to its range, and how many values were clamped
        (what native and emulated FP16 regions both store)."""
        value = self._const_value(tensor)
        assert value is not None
        value = value.astype(np.float32)
        clamped = int(np.count_nonzero(np.abs(value) > FP16_MAX))
        return np.clip(value, -FP16_MAX, FP16_MAX).astype(np.float16), clamped

    def _fp16_emulated(self, fp16_nodes: set[str], is_float: Any) -> None:
        """FP16 regions in float32, every value rounded where a float16 engine stores it."""
        from onnx import TensorProto, helper

        def round_trip(tensor: str, rounded: str) -> list[Any]:
            half = self._unique(f"{tensor}/fp16")
            return [helper.make_node("Cast", [tensor], [half], to=TensorProto.FLOAT16,
                                     name=self._unique(f"{tensor}/Cast_to_fp16")),
                    helper.make_node("Cast", [half], [rounded], to=TensorProto.FLOAT,
                                     name=self._unique(f"{tensor}/Cast_to_fp32"))]

        rounded: dict[str, str] = {}  # float32 tensor -> its value rounded to float16
        rounded_inits: dict[str, str] = {}
        clamped = 0
        nodes: list[Any] = []
        for node in self.graph.node:
            if node.name not in fp16_nodes:
                nodes.append(node)
                continue
            for i, tensor in enumerate(node.input):
                if not tensor or not is_float(tensor):
                    continue
                if tensor in rounded:
                    node.input[i] = rounded[tensor]
                elif tensor in self.inits:
                    if tensor not in rounded_inits:
                        half, over = self._fp16_constant(tensor)
                        clamped += over
                        rounded_inits[tensor] = self._add_init(half.astype(np.float32),
                                                               f"{tensor}/fp16_rounded")
                    node.input[i] = rounded_inits[tensor]
                else:
                    name = self._unique(f"{tensor}/fp16_rounded")
                    nodes.extend(round_trip(tensor, name))
                    rounded[tensor] = node.input[i] = name
            nodes.append(node)
            for i, tensor in enumerate(node.output):
                if tensor and is_float(tensor):
                    raw = self._unique(f"{tensor}/fp32")
                    node.output[i] = raw
                    nodes.extend(round_trip(raw, tensor))  # consumers read the rounded value
                    rounded[tensor] = tensor
        del self.graph.node[:]
        self.graph.node.extend(nodes)
        if clamped:
            self.notes.append(f"{clamped} float32 constant values clamped to the float16 range")

    def _record_as_built(self) -> None:
        """as_built for every node of the plan not recorded yet (INT8 ones are): fp16 where it
        computes in float16, fp32 where it touches float32 tensors, none where it computes no
        floats (shape arithmetic), folded where the rewrite removed it."""
        float_t = 1
        present = set()
        for node in self.graph.node:
            name = node.name
            present.add(name)
            if name in self.as_built or name not in self.plan.decisions:
                continue
            if name in self._fp16_nodes:
                self.as_built[name] = Precision.FP16.value
            elif any(self.types.get(t) == float_t for t in list(node.input) + list(node.output)):
                self.as_built[name] = Precision.FP32.value
            else:
                self.as_built[name] = "none"
        for name in self.plan.decisions:
            if name not in present and name not in self.as_built:
                self.as_built[name] = "folded"  # e.g. the Transpose of a tied LM head weight

    # -- cleanup ---------------------------------------------------------------------------
    def _finish(self) -> None:
        self.graph.initializer.extend(self.new_inits)
        _remove_dead_nodes(self.graph)
        used = {t for n in self.graph.node for t in n.input}
        used |= {o.name for o in self.graph.output}
        keep = [t for t in self.graph.initializer if t.name in used]
        del self.graph.initializer[:]
        self.graph.initializer.extend(keep)
        # element types changed (fp16) and tensors were added: let inference recompute them
        del self.graph.value_info[:]


def _remove_dead_nodes(graph: Any) -> None:
    """Drop nodes whose outputs nobody reads (a Transpose folded into an int8 weight)."""
    outputs = {o.name for o in graph.output}
    while True:
        used = {t for n in graph.node for t in n.input} | outputs
        keep = [n for n in graph.node if any(o in used for o in n.output if o)]
        if len(keep) == len(graph.node):
            return
        del graph.node[:]
        graph.node.extend(keep)


def _fused_name(members: list[str]) -> str:
    """``/m/attn/q_proj/MatMul`` + ``/m/attn/k_proj/MatMul`` -> ``/m/attn/q_proj+k_proj/MatMul``."""
    parts = [m.split("/") for m in members]
    common: list[str] = []
    for segment in zip(*parts, strict=False):
        if len(set(segment)) != 1:
            break
        common.append(segment[0])
    tails = ["/".join(p[len(common):]) for p in parts]
    op = "MatMul"
    stems = [t[: -len("/MatMul")] if t.endswith("/MatMul") else t for t in tails]
    prefix = "/".join(common)
    return f"{prefix}/{'+'.join(stems)}/{op}"
