"""A switchable fake-quantized copy of the FP32 graph: one ONNX Runtime session that evaluates any
choice of INT8 groups and activation ranges without being rebuilt.

For every MatMul/Gemm of a group, each operand is routed through ``Where(flag, dequantized, x)``:

* activations: ``DequantizeLinear(QuantizeLinear(x, s, 0), s, 0)`` with the scale ``s`` a graph
  input per calibrated tensor (per-tensor symmetric int8, as ``quantkit.qdq`` builds it), so
  ranges from another calibration method are a feed, not a rebuild;
* ``flag`` is a boolean graph input per group: False gives the FP32 operand unchanged.

Constant weights are not switched in the graph: each becomes a graph input, fed either the FP32
weight or its dequantized int8 weight (per output channel, as ``quantkit.qdq`` stores it), both
computed once. Dequantizing and selecting every weight in every run cost more than the MatMuls
themselves (SmolLM2-135M, 1 x 512: 1.3 s of a 2.2 s run).

The values a switched-on group sees are the ones its Q/DQ engine computes (quantize, round, clip,
dequantize); only the order of the float accumulation differs from an integer kernel. The
weight layout (``quantkit.qdq``: ``s8``/``u8`` store the same 8-bit values, ``s7`` 7-bit ones)
must be the engine's: ``weight_layout``. The probe is exact, so it matches an engine whose
integer kernels are exact on the machine, which is what the layout ``auto`` chooses. Engines
that autotune writes are still built by the ONNX Runtime backend and verified on their own.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from quantkit.calib.gptq import weight_key
from quantkit.errors import QuantkitError
from quantkit.graph_edit import constant_weight, drop_unused, node_attrs, range_source
from quantkit.tune.groups import QuantGroup
from quantkit.weight_quant import (
    check_given_weights_layout,
    check_weight_layout,
    dequantize,
    quantize_weight,
    symmetric_scale,
    weight_axis,
    weight_qmax,
)

FLAG_PREFIX = "quantkit_probe/flag/"
SCALE_PREFIX = "quantkit_probe/scale/"
WEIGHT_PREFIX = "quantkit_probe/weight/"


@dataclass
class ProbeWeight:
    """A weight graph input of the probe: the group that switches it and its two values."""

    group: str
    fp32: np.ndarray
    int8: np.ndarray  # the dequantized int8 weight: what the engine's DequantizeLinear gives


@dataclass
class ProbeGraph:
    model: Any  # the switchable ModelProto
    group_tensors: dict[str, list[str]]  # group -> the calibrated tensors whose scales it reads
    weights: dict[str, ProbeWeight]  # weight graph input -> its values


def build_probe_model(
    model: Any,
    groups: Sequence[QuantGroup],
    amax: Mapping[str, float],
    *,
    per_channel: bool = True,
    weights: Mapping[str, Any] | None = None,
    weight_layout: str = "s8",
) -> ProbeGraph:
    """The switchable graph (a new ModelProto), per group the calibrated tensors whose scale
    inputs it reads, and the values of its weight inputs. ``model`` must hold its weights;
    ``weights`` (``CalibrationTable.weights``, GPTQ) replaces round-to-nearest where given;
    ``weight_layout`` is the engine's (``s7``: 7-bit weights)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    qmax = weight_qmax(check_weight_layout(weight_layout))
    if weights:
        check_given_weights_layout(weight_layout)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    inits = {t.name: t for t in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    owner = {node: g for g in groups for node in g.nodes}
    names = {n.name for n in graph.node} | set(inits) | {o for n in graph.node for o in n.output}
    scale_inputs: dict[str, str] = {}  # table key -> graph input
    given_weights = dict(weights or {})
    probe_weights: dict[str, ProbeWeight] = {}
    weight_inputs: dict[tuple[str, str, tuple[int, ...] | None], str] = {}
    group_tensors: dict[str, list[str]] = {g.name: [] for g in groups}
    missing: list[str] = []

    def unique(name: str) -> str:
        candidate, i = name, 1
        while candidate in names:
            candidate, i = f"{name}_{i}", i + 1
        names.add(candidate)
        return candidate

    def weight_input(node: Any, index: int, group: str, source: str,
                     perm: tuple[int, ...] | None) -> str:
        key = (group, source, perm)
        if key in weight_inputs:
            return weight_inputs[key]
        value = np.asarray(numpy_helper.to_array(inits[source]))
        if value.dtype != np.float32:
            raise QuantkitError(f"weight {source} of {node.name} is {value.dtype}, not float32")
        if perm is not None:
            value = np.ascontiguousarray(np.transpose(value, perm))
        axis = weight_axis(node.op_type, index, value.ndim, node_attrs(node))
        per_axis = axis if per_channel else None
        given = given_weights.get(weight_key(source, perm))
        if given is not None and (per_axis is None or given.q.shape != value.shape):
            raise QuantkitError(f"the calibration table's int8 weight for {source} does not fit "
                                "this probe (per-tensor weights, or another export)",
                                "tune with per-channel weights and the table of this export")
        q, scale = (given.q, given.scale) if given is not None else \
            quantize_weight(value, per_axis, qmax)
        name = unique(f"{WEIGHT_PREFIX}{group}/{source}")
        probe_weights[name] = ProbeWeight(group, value, dequantize(q, scale, per_axis))
        weight_inputs[key] = name
        return name

    zero = unique("quantkit_probe/zero_point")
    graph.initializer.append(numpy_helper.from_array(np.zeros((), np.int8), zero))
    nodes: list[Any] = []
    for node in graph.node:
        group = owner.get(node.name)
        if group is None:
            nodes.append(node)
            continue
        flag = FLAG_PREFIX + group.name
        for index in range(min(2, len(node.input))):
            tensor = node.input[index]
            weight = constant_weight(tensor, inits, producers)
            if weight is not None:
                node.input[index] = weight_input(node, index, group.name, *weight)
                continue
            table_key = range_source(tensor, amax, producers)
            if table_key is None:
                missing.append(tensor)
                continue
            if table_key not in scale_inputs:
                scale_inputs[table_key] = SCALE_PREFIX + table_key
            if table_key not in group_tensors[group.name]:
                group_tensors[group.name].append(table_key)
            s_name = scale_inputs[table_key]
            base = f"{node.name}/probe_input_{index}"
            q_out, dq_out = unique(f"{base}/q"), unique(f"{base}/dq")
            selected = unique(f"{base}/selected")
            nodes += [
                helper.make_node("QuantizeLinear", [tensor, s_name, zero], [q_out],
                                 name=unique(f"{base}/QuantizeLinear")),
                helper.make_node("DequantizeLinear", [q_out, s_name, zero], [dq_out],
                                 name=unique(f"{base}/DequantizeLinear")),
                helper.make_node("Where", [flag, dq_out, tensor], [selected],
                                 name=unique(f"{base}/Where")),
            ]
            node.input[index] = selected
        nodes.append(node)
    if missing:
        missing = list(dict.fromkeys(missing))
        raise QuantkitError(
            f"the calibration table has no range for {len(missing)} activation tensor(s) of "
            f"quantizable nodes: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}",
            "calibrate this ONNX model (quantkit calibrate --tensors all or quantizable)",
        )
    del graph.node[:]
    graph.node.extend(nodes)
    for g in groups:
        graph.input.append(helper.make_tensor_value_info(FLAG_PREFIX + g.name, TensorProto.BOOL,
                                                         []))
    for input_name in scale_inputs.values():
        graph.input.append(helper.make_tensor_value_info(input_name, TensorProto.FLOAT, []))
    for input_name, weight in probe_weights.items():
        graph.input.append(helper.make_tensor_value_info(input_name, TensorProto.FLOAT,
                                                         list(weight.fp32.shape)))
    outputs = [o for o in graph.output if o.name == "nll"] or \
              [o for o in graph.output if o.name == "logits"]
    if not outputs:
        raise QuantkitError("the model has neither an 'nll' nor a 'logits' output")
    del graph.output[:]
    graph.output.extend(outputs)
    del graph.value_info[:]
    drop_unused(graph)  # the weights now fed as inputs (and a tied head's Transpose)
    return ProbeGraph(out, group_tensors, probe_weights)


class ProbeSession:
    """Runner-like (``output_names``, ``run``) view of the probe graph, so
    ``quantkit.eval.perplexity.evaluate_perplexity`` scores any configuration of it.

    ``configure(int8_groups, amax)`` chooses which groups are INT8 and the activation ranges
    (defaults: none, and the table the probe was built with)."""

    def __init__(self, onnx_path: Path, groups: Sequence[QuantGroup], amax: Mapping[str, float],
                 *, per_channel: bool = True, threads: int | None = None,
                 weights: Mapping[str, Any] | None = None, weight_layout: str = "s8") -> None:
        import onnx
        import onnxruntime as ort

        from quantkit.onnx_io import load_model

        model = load_model(onnx_path)
        built = build_probe_model(model, groups, amax, per_channel=per_channel, weights=weights,
                                  weight_layout=weight_layout)
        self.weight_layout = weight_layout
        del model
        probe, self.group_tensors, self.weights = built.model, built.group_tensors, built.weights
        self.groups = list(groups)
        self.base_amax = dict(amax)
        self._tmp = Path(tempfile.mkdtemp(prefix="quantkit-probe-"))
        try:
            path = self._tmp / "probe.onnx"
            onnx.save(probe, str(path), save_as_external_data=True, location="probe.onnx.data")
            del probe
            options = ort.SessionOptions()
            if threads is not None:
                options.intra_op_num_threads = threads
                options.inter_op_num_threads = 1
            options.log_severity_level = 3
            self.session = ort.InferenceSession(str(path), options,
                                                providers=["CPUExecutionProvider"])
        except BaseException:
            shutil.rmtree(self._tmp, ignore_errors=True)
            raise
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.scale_tensors = sorted({t for ts in self.group_tensors.values() for t in ts})
        self._extra: dict[str, np.ndarray] = {}
        self.configure(())

    def configure(self, int8_groups: Iterable[str],
                  amax: Mapping[str, float] | None = None) -> None:
        chosen = set(int8_groups)
        unknown = chosen - {g.name for g in self.groups}
        if unknown:
            raise QuantkitError(f"unknown quantization group(s): {', '.join(sorted(unknown))}")
        ranges = {**self.base_amax, **(amax or {})}
        extra: dict[str, np.ndarray] = {FLAG_PREFIX + g.name: np.array(g.name in chosen)
                                        for g in self.groups}
        for name, weight in self.weights.items():
            extra[name] = weight.int8 if weight.group in chosen else weight.fp32
        for tensor in self.scale_tensors:
            extra[SCALE_PREFIX + tensor] = symmetric_scale(float(ranges[tensor])).reshape(())
        self._extra = extra

    def run(self, feeds: Mapping[str, np.ndarray],
            outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        names = list(outputs) if outputs is not None else self.output_names
        values = self.session.run(names, {**feeds, **self._extra})
        return dict(zip(names, values, strict=True))

    def close(self) -> None:
        self.session = None  # type: ignore[assignment]
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> ProbeSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
