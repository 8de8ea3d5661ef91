"""ONNX Runtime backend: engines are ONNX files (FP32, or rewritten with Q/DQ and FP16 regions)
run by an InferenceSession; CPU by default, CUDA when ONNX Runtime has it."""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from quantkit.attention_fusion import (
    check_attention_mode,
    checked_fp32_fusion,
    fuse_cache_attention,
    fuse_rewritten,
    fusion_record,
    plan_fusion,
)
from quantkit.backends.base import Backend, BuildRequest, Engine, Runner
from quantkit.environment import CpuIsa, cpu_isa, weight_layout_for
from quantkit.errors import MissingDependencyError, QuantkitError, QuantkitWarning
from quantkit.export import ONNX_NAME, TOKENIZER_DIR, export_manifest, onnx_model_hash
from quantkit.graph_stats import float_node_precisions, int8_coverage, linear_layer_macs
from quantkit.plan import NodeDecision, PlanRecipe, Precision, PrecisionPlan, resolve_plan
from quantkit.qdq import QdqOptions, RewriteResult
from quantkit.weight_quant import WEIGHT_LAYOUTS

if TYPE_CHECKING:
    from quantkit.calib.table import CalibrationTable
    from quantkit.rewrite_io import RewriteSource

ENGINE_ONNX = "engine.onnx"


def _ort() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise MissingDependencyError("onnxruntime", "onnxruntime") from None
    return onnxruntime


def copy_export_context(onnx_path: Path, out_dir: Path) -> dict[str, Any]:
    """Copy the tokenizer saved beside the export and return what the engine should record
    about its source model (hash, vocab size, positions, tokenizer, and the KV-cache layout of a
    cache graph, which ``quantkit generate`` reads)."""
    manifest = export_manifest(onnx_path) or {}
    tokenizer_src = Path(onnx_path).parent / TOKENIZER_DIR
    if tokenizer_src.is_dir():
        shutil.copytree(tokenizer_src, out_dir / TOKENIZER_DIR)
    return {
        "source_model_hash": manifest.get("model_hash") or onnx_model_hash(onnx_path),
        "source_model": manifest.get("inputs", {}).get("model"),
        "vocab_size": manifest.get("vocab_size"),
        "max_positions": manifest.get("max_positions"),
        "tokenizer": TOKENIZER_DIR if tokenizer_src.is_dir() else None,
        **({"cache": manifest["cache"]} if manifest.get("cache") else {}),
    }


def engine_size_bytes(directory: Path, names: list[str]) -> int:
    total = 0
    for name in names:
        for path in (directory / name, directory / f"{name}.data"):
            if path.is_file():
                total += path.stat().st_size
    return total


PRECISION_LABELS = ("fp32", "fp16", "int8", "mixed")
# build options and their defaults (BuildRequest.options)
DEFAULT_OPTIONS: dict[str, Any] = {
    "per_channel": True,  # per-output-channel weight scales (False: per tensor)
    "shared_inputs": "fuse",  # fuse | dedicated: one activation feeding several INT8 MatMuls
    "fp16_fallback": False,  # keep ops without a float16 kernel in fp32 instead of failing
    # native: float16 kernels; emulate: float32 rounded to float16 where a float16 engine
    # stores values (FP16's accuracy on a CPU without float16 kernels; no FP16 latency)
    "fp16": "native",
    "provider": None,  # execution provider the engine is built for (default: CUDA if present)
    "coverage_seq": 512,  # reference sequence length for the INT8 MAC coverage (batch 1)
    "verify": True,  # load the engine in ONNX Runtime and record which Q/DQ ops it fused
    # INT8 weights: auto (for this machine's CPU) | s8 | u8 | s7 (quantkit.qdq's docstring)
    "weight_layout": "auto",
    # static: activation scales from the calibration table (Q/DQ, as TensorRT runs INT8);
    # dynamic: each INT8 MatMul measures its activation range at run time (quantkit.dynamic_quant)
    # blockwise: per block of 32 along each row, in MatMulNBits (x86 with VNNI, ARM)
    "activations": "static",
    # KV-cache graphs: auto | fused | graph: one ONNX Attention node per layer, float
    # (quantkit.attention_fusion); plain graphs are never changed
    "attention": "auto",
}
ACTIVATION_MODES = ("static", "dynamic", "blockwise")
ACCURACY_ONLY_FP16 = ("accuracy only: float16 rounding emulated in float32 (fp16=emulate); its "
                      "perplexity is an FP16 engine's, its speed is not")
INTEGER_OPS = frozenset({"MatMulIntegerToFloat", "QLinearMatMul", "QGemm", "MatMulInteger",
                         "DynamicQuantizeMatMul", "QAttention", "MatMulNBits"})
FLOAT_MATMUL_OPS = frozenset({"MatMul", "Gemm", "FusedMatMul", "FusedGemm"})


class OnnxRuntimeBackend(Backend):
    """Builds engines for ONNX Runtime: the FP32 export as is, or the graph rewritten by
    ``quantkit.qdq`` (Q/DQ for INT8 nodes, Cast-bounded FP16 regions) for the request's plan."""

    name = "onnxruntime"

    def _check_request(self, request: BuildRequest) -> None:
        _ort()
        options = build_options(request.options)
        if request.precision not in PRECISION_LABELS:
            raise QuantkitError(f"unknown precision '{request.precision}'",
                                f"use one of: {', '.join(PRECISION_LABELS)}")
        graph = _load_graph(request.onnx_path, with_weights=False)
        plan = effective_plan(request, graph)
        check_plan_label(request.precision, plan)
        if plan.nodes_with(Precision.INT8):
            check_table(request.table, request.onnx_path, graph)
        elif options["activations"] != "static":
            raise QuantkitError(f"activations={options['activations']} needs INT8 nodes, and "
                                "this plan has none",
                                "build --precision int8 or mixed, or leave --activations out")
        if options["activations"] == "blockwise" and cpu_isa().u8s8_saturates:
            raise QuantkitError(
                f"activations=blockwise is measured only on CPUs with VNNI (and ARM); this one "
                f"is {cpu_isa().name} without VNNI",
                "build with --activations static (u8 weights here) or dynamic")
        provider = options["provider"]
        if provider is not None and provider not in _ort().get_available_providers():
            raise QuantkitError(f"execution provider {provider} is not available",
                                f"available: {', '.join(_ort().get_available_providers())}")

    def _build_impl(self, request: BuildRequest, out_dir: Path) -> dict[str, Any]:
        ort = _ort()
        options = build_options(request.options)
        fields = copy_export_context(request.onnx_path, out_dir)
        target = out_dir / ENGINE_ONNX
        graph = _load_graph(request.onnx_path, with_weights=False)
        plan = effective_plan(request, graph)
        provider = options["provider"] or _default_provider(ort.get_available_providers())
        float_only = not plan.nodes_with(Precision.INT8) and not plan.nodes_with(Precision.FP16)
        mode = str(options["attention"])
        attention = plan_fusion(request.onnx_path, graph, mode, bool(fields.get("cache")),
                                out_dir, check=not float_only)
        fusion = None
        if float_only:
            as_built = float_node_precisions(graph)
            fields["rewrite"] = None
            if attention["fuse"]:  # FP32: the export with its attention fused, then checked
                from quantkit.rewrite_io import open_for_rewrite

                with open_for_rewrite(request.onnx_path, out_dir) as source:
                    fusion = fuse_cache_attention(source.model)
                    source.save(source.model, target)
                    fields["external_data"] = source.streamed
                attention = checked_fp32_fusion(request.onnx_path, target, fusion, mode)
                if not attention["fuse"]:
                    fusion = None
                    Path(f"{target}.data").unlink(missing_ok=True)
            if not attention["fuse"]:  # FP32: the export itself, bit for bit
                fields["external_data"] = _copy_onnx(request.onnx_path, target) is not None
        else:
            from quantkit.rewrite_io import open_for_rewrite

            with open_for_rewrite(request.onnx_path, out_dir) as source:
                result, plan_used, fallback = rewrite_for_provider(
                    request, plan, options, provider, source)
                if attention["fuse"]:
                    fusion, attention = fuse_rewritten(result.model, attention, mode)
                if options["activations"] == "dynamic":
                    from quantkit.dynamic_quant import to_dynamic_activations

                    fields["activations"] = {"mode": "dynamic",
                                             "matmuls": to_dynamic_activations(result.model)}
                elif options["activations"] == "blockwise":
                    from quantkit.dynamic_quant import (
                        BLOCK_SIZE,
                        BLOCKWISE_KERNEL,
                        to_blockwise_activations,
                    )

                    fields["activations"] = {
                        "mode": "blockwise", "block_size": BLOCK_SIZE,
                        "kernel": BLOCKWISE_KERNEL,
                        "matmuls": to_blockwise_activations(result.model)}
                source.save(result.model, target)
                fields["external_data"] = source.streamed
            result.model = None  # the graph's protobuf: gone before the sessions below
            _check_onnx(target)
            as_built = result.as_built
            fields["rewrite"] = {**result.summary(), "options": {
                k: options[k] for k in ("per_channel", "shared_inputs")}}
            fields["rewrite"]["options"]["weight_layout"] = resolve_weight_layout(
                options, provider)[0]
            fields["fp16"] = {
                "provider": provider,
                "nodes": sum(1 for v in as_built.values() if v == "fp16"),
                "fallback_to_fp32": fallback,
                "mode": options["fp16"],
            }
            if options["fp16"] == "emulate" and fields["fp16"]["nodes"]:
                fields["accuracy_only"] = ACCURACY_ONLY_FP16
            if fallback:
                fields["plan_as_built"] = plan_used.to_dict()
        as_built = dict(as_built)
        fields["attention"] = (fusion_record(fusion, attention, as_built) if fusion is not None
                               else {"fused": False, "reason": attention["reason"]})
        fields["as_built_counts"] = dict(sorted(Counter(as_built.values()).items()))
        fields["weight_layout"] = (layout_record(options, provider)
                                   if "int8" in as_built.values() else None)
        fields.update(coverage_fields(request.onnx_path, as_built, options, fields))
        fields["provider"] = provider
        if request.table is not None:
            fields["table"] = {"method": request.table.method,
                               "model_hash": request.table.model_hash,
                               "num_tensors": len(request.table.amax)}
        if options["verify"]:
            fields["onnxruntime_fusion"] = inspect_fusion(target, provider)
        fields["onnx"] = ENGINE_ONNX
        fields["size_bytes"] = engine_size_bytes(out_dir, [ENGINE_ONNX]) + sum(
            p.stat().st_size for p in out_dir.glob("*.onnx.data")
            if p.name != f"{ENGINE_ONNX}.data")  # an FP32 engine keeps the export's data name
        return fields

    def _runner_impl(self, engine: Engine, **options: Any) -> Runner:
        return OnnxRuntimeRunner(engine, **options)


def build_options(given: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(given) - set(DEFAULT_OPTIONS))
    if unknown:
        raise QuantkitError(f"unknown onnxruntime build option(s): {', '.join(unknown)}",
                            f"known: {', '.join(DEFAULT_OPTIONS)}")
    options = {**DEFAULT_OPTIONS, **given}
    if options["weight_layout"] not in ("auto", *WEIGHT_LAYOUTS):
        raise QuantkitError(f"unknown weight_layout '{options['weight_layout']}'",
                            f"use one of: auto, {', '.join(WEIGHT_LAYOUTS)}")
    if options["activations"] not in ACTIVATION_MODES:
        raise QuantkitError(f"unknown activations mode '{options['activations']}'",
                            f"use one of: {', '.join(ACTIVATION_MODES)}")
    QdqOptions(per_channel=bool(options["per_channel"]),
               shared_inputs=str(options["shared_inputs"]), fp16=str(options["fp16"]))
    check_attention_mode(str(options["attention"]))
    if int(options["coverage_seq"]) < 1:
        raise QuantkitError("coverage_seq must be at least 1")
    return options


def resolve_weight_layout(options: Mapping[str, Any], provider: str,
                          isa: CpuIsa | None = None) -> tuple[str, str]:
    """The INT8 weight layout of a build and why: the option when it names one, else for the CPU
    provider the layout ``quantkit.environment.weight_layout_for`` gives this machine's (or
    ``isa``'s) instruction set, and ``s8`` for other providers (GPUs have no such kernels)."""
    layout = str(options.get("weight_layout", "auto"))
    if layout != "auto":
        return layout, "weight_layout option"
    if provider != "CPUExecutionProvider":
        return "s8", f"{provider}: symmetric int8 weights"
    return weight_layout_for(isa or cpu_isa())


def layout_record(options: Mapping[str, Any], provider: str) -> dict[str, Any]:
    """What the manifest says about the INT8 weight layout: the layout, why, and the instruction
    set of the machine that built it (the runner compares it with its own)."""
    layout, reason = resolve_weight_layout(options, provider)
    return {"layout": layout, "requested": str(options.get("weight_layout", "auto")),
            "reason": reason, "built_on": cpu_isa().to_dict()}


def effective_plan(request: BuildRequest, graph: Any) -> PrecisionPlan:
    """The request's plan, or the uniform plan its precision label implies."""
    if request.plan is not None:
        return request.plan
    if request.precision == "mixed":
        raise QuantkitError("a mixed-precision build needs a plan",
                            "pass --plan, e.g. configs/mixed-safe.yaml")
    return resolve_plan(PlanRecipe.uniform(request.precision), graph)


def check_plan_label(label: str, plan: PrecisionPlan) -> None:
    """The engine's label must say what the plan does (an 'int8' engine with no INT8 node, or an
    'fp32' engine with FP16 nodes, would be reported as what it is not)."""
    counts = Counter(d.precision for d in plan.decisions.values())
    int8, fp16 = counts.get(Precision.INT8, 0), counts.get(Precision.FP16, 0)
    consistent = {
        "fp32": not int8 and not fp16,
        "fp16": not int8 and fp16 > 0,
        "int8": int8 > 0 and not fp16,
        "mixed": True,
    }[label]
    problem = None if consistent else f"it puts {int8} nodes in int8 and {fp16} in fp16"
    if problem:
        raise QuantkitError(f"--precision {label} does not describe the plan: {problem}",
                            "use --precision mixed for a plan with several precisions")


def check_table(table: CalibrationTable | None, onnx_path: Path, graph: Any) -> None:
    """An INT8 build needs a table made for this model, naming tensors of this graph."""
    if table is None:
        raise QuantkitError("an INT8 build needs a calibration table",
                            "pass --table (written by 'quantkit calibrate')")
    manifest = export_manifest(onnx_path) or {}
    model_hash = manifest.get("model_hash") or onnx_model_hash(onnx_path)
    if table.model_hash is not None and table.model_hash != model_hash:
        raise QuantkitError(
            "the calibration table was made for another model "
            f"(table: {table.model_hash[:12]}, ONNX: {model_hash[:12]})",
            "calibrate this ONNX model ('quantkit calibrate') or pass its own table; a "
            "SmoothQuant table belongs to the calibration's smoothed/ export",
        )
    tensors = {o for n in graph.graph.node for o in n.output} | {i.name for i in graph.graph.input}
    present = [t for t in table.amax if t in tensors]
    if table.amax and not present:
        sample = ", ".join(sorted(table.amax)[:3])
        raise QuantkitError(
            f"the ONNX model has none of the {len(table.amax)} tensors the table calibrated "
            f"(e.g. {sample})",
            "the table belongs to another export; calibrate this ONNX model",
        )


def rewrite_for_provider(
    request: BuildRequest, plan: PrecisionPlan, options: Mapping[str, Any], provider: str,
    source: RewriteSource,
) -> tuple[RewriteResult, PrecisionPlan, dict[str, Any]]:
    """Rewrite the graph of ``source`` (the request's export, opened by
    ``quantkit.rewrite_io.open_for_rewrite``); check that ``provider`` has float16 kernels for
    the FP16 nodes (ONNX Runtime would otherwise wrap them in Casts and silently compute in
    float32). Unsupported nodes fail the build, or with ``fp16_fallback`` are planned fp32 and
    the rewrite redone."""
    table = request.table
    qdq_options = QdqOptions(per_channel=bool(options["per_channel"]),
                             shared_inputs=str(options["shared_inputs"]),
                             weight_layout=resolve_weight_layout(options, provider)[0],
                             fp16=str(options["fp16"]))
    amax = table.amax if table is not None else None
    skipped = table.skipped if table is not None else None
    weights = table.weights if table is not None else None
    result = source.rewrite(plan, amax, qdq_options, skipped, weights)
    fp16_nodes = [n for n, v in result.as_built.items() if v == "fp16"]
    if not fp16_nodes or qdq_options.fp16 == "emulate":  # emulated: float32 kernels
        return result, plan, {}
    unsupported = fp16_unsupported(result.model, fp16_nodes, provider)
    if not unsupported:
        return result, plan, {}
    ops = Counter(plan.decisions[n].op_type for n in unsupported)
    op_list = ", ".join(f"{op} ({count})" for op, count in ops.most_common())
    if not options["fp16_fallback"]:
        raise QuantkitError(
            f"ONNX Runtime's {provider} has no float16 kernel for {len(unsupported)} of "
            f"{len(fp16_nodes)} fp16 nodes: {op_list}; it would cast them to float32 and the "
            "engine would not be FP16",
            "build fp16 for TensorRT (--backend tensorrt) or CUDA, pass --fp16-emulate for "
            "FP16's accuracy here (float16 rounding in float32, no FP16 speed), keep these ops "
            "fp32 in the plan, or pass --fp16-fallback to do that automatically",
        )
    reason = f"fp16 -> fp32: no float16 kernel in {provider}"
    decisions = dict(plan.decisions)
    for name in unsupported:
        old = decisions[name]
        decisions[name] = NodeDecision(name, old.op_type, Precision.FP32, f"{old.rule} ({reason})")
    fallback_plan = PrecisionPlan(plan.default, decisions, plan.source)
    result = source.rewrite(fallback_plan, amax, qdq_options, skipped, weights)
    return result, fallback_plan, {"nodes": len(unsupported), "op_types": dict(ops)}


def fp16_unsupported(model: Any, nodes: list[str], provider: str) -> list[str]:
    """The nodes among ``nodes`` (float16 in ``model``) for which ``provider`` has no float16
    kernel. Each distinct (op, input types) is probed once with a one-node model: ONNX Runtime
    inserts Cast nodes around a node it cannot run in float16."""
    import onnx
    from onnx import helper

    ort = _ort()
    types = _types_of(model)
    wanted = set(nodes)
    verdict: dict[tuple[Any, ...], bool] = {}
    unsupported: list[str] = []
    opsets = list(model.opset_import)
    with tempfile.TemporaryDirectory(prefix="quantkit-fp16-probe-") as tmp:
        for node in model.graph.node:
            if node.name not in wanted:
                continue
            in_types = tuple(types.get(t, 0) if t else 0 for t in node.input)
            key = (node.domain, node.op_type, in_types, len(node.output))
            if key not in verdict:
                inputs, names = [], []
                for i, (tensor, elem) in enumerate(zip(node.input, in_types, strict=True)):
                    if not tensor:
                        names.append("")
                        continue
                    names.append(f"in{i}")
                    inputs.append(helper.make_tensor_value_info(f"in{i}", elem or 1, None))
                outs = [f"out{i}" for i in range(len(node.output))]
                probe = helper.make_node(node.op_type, names, outs, domain=node.domain,
                                         name="probe")
                probe.attribute.extend(node.attribute)
                graph = helper.make_graph([probe], "probe", inputs,
                                          [onnx.ValueInfoProto(name=o) for o in outs])
                proto = helper.make_model(graph, opset_imports=opsets)
                proto.ir_version = model.ir_version
                path = Path(tmp) / "optimized.onnx"
                options = ort.SessionOptions()
                options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
                options.optimized_model_filepath = str(path)
                try:
                    ort.InferenceSession(proto.SerializeToString(), options,
                                         providers=[provider])
                    optimized = onnx.load(str(path))
                    casts = sum(1 for n in optimized.graph.node if n.op_type == "Cast")
                    verdict[key] = casts <= (1 if node.op_type == "Cast" else 0)
                except Exception:  # no kernel at all, or a node the probe cannot stand alone
                    verdict[key] = False
            if not verdict[key]:
                unsupported.append(node.name)
    return unsupported


def coverage_fields(onnx_path: Path, as_built: Mapping[str, str], options: Mapping[str, Any],
                    fields: Mapping[str, Any]) -> dict[str, Any]:
    """INT8 coverage: share of all MatMul/Gemm multiply-accumulates (attention batched MatMuls
    included) that run in INT8, for one batch-1 forward pass at the reference length
    (``coverage_seq``, capped at the model's positions)."""
    seq = int(options["coverage_seq"])
    if isinstance(fields.get("max_positions"), int):
        seq = min(seq, int(fields["max_positions"]))
    macs = linear_layer_macs(onnx_path, seq_len=seq)
    total = sum(macs.values())
    int8_macs = sum(v for k, v in macs.items() if as_built.get(k) == "int8")
    return {
        "int8_coverage": int8_coverage(macs, as_built),
        "coverage": {"definition": "INT8 share of MatMul/Gemm MACs", "batch": 1, "seq": seq,
                     "total_macs": total, "int8_macs": int8_macs, "linear_nodes": len(macs)},
    }


def inspect_fusion(onnx_path: Path, provider: str) -> dict[str, Any]:
    """Load the engine with ONNX Runtime's full graph optimizations and report what its Q/DQ
    became: integer kernels, and float MatMul/Gemm still reading DequantizeLinear outputs (Q/DQ
    that ONNX Runtime did not fuse and runs as dequantize + float GEMM).

    The session only writes its optimized graph: its weights go to a file of their own (an
    inline graph past 2 GB cannot be written at all) and are not prepacked (prepacking reads
    every weight in, for a session that never multiplies: 1.38 against 0.34 GB peak on the
    TinyLlama-1.1B-shaped engine, ``benchmarks/ort_session_memory.py``; the graph is the
    same)."""
    import onnx

    ort = _ort()
    with tempfile.TemporaryDirectory(prefix="quantkit-ort-opt-") as tmp:
        path = Path(tmp) / "optimized.onnx"
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = str(path)
        options.log_severity_level = 3  # not the "hardware specific optimizations" warning
        for key, value in (
                ("session.optimized_model_external_initializers_file_name", f"{path.name}.data"),
                ("session.optimized_model_external_initializers_min_size_in_bytes", "1024"),
                ("session.disable_prepacking", "1")):
            options.add_session_config_entry(key, value)
        try:
            ort.InferenceSession(str(onnx_path), options, providers=[provider])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise QuantkitError(
                f"ONNX Runtime cannot load the built engine: {str(exc).splitlines()[0]}"
            ) from None
        optimized = onnx.load(str(path), load_external_data=False)
    return fusion_report(optimized)


def fusion_report(optimized: Any) -> dict[str, Any]:
    producers = {o: n for n in optimized.graph.node for o in n.output}
    integer = Counter(n.op_type for n in optimized.graph.node if n.op_type in INTEGER_OPS)
    unfused = [n.name for n in optimized.graph.node if n.op_type in FLOAT_MATMUL_OPS and any(
        producers.get(t) is not None and producers[t].op_type == "DequantizeLinear"
        for t in n.input)]
    return {"integer_ops": dict(integer), "unfused_dequantized_matmuls": unfused}


def _check_onnx(path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:  # onnx raises ValidationError / InferenceError
        raise QuantkitError(
            f"the rewritten graph fails onnx.checker: {str(exc).splitlines()[0]}",
            "this is a quantkit bug: report it with the model and plan",
        ) from None


def _load_graph(onnx_path: Path, with_weights: bool) -> Any:
    from quantkit.onnx_io import load_model

    try:
        return load_model(onnx_path, with_weights)
    except Exception as exc:  # protobuf DecodeError and friends
        raise QuantkitError(f"cannot read ONNX model {onnx_path}: {exc}") from None


def _types_of(model: Any) -> dict[str, int]:
    from quantkit.graph_stats import _elem_types

    return _elem_types(model)


def _default_provider(available: list[str]) -> str:
    return "CUDAExecutionProvider" if "CUDAExecutionProvider" in available else (
        "CPUExecutionProvider")


def _copy_onnx(src: Path, dst: Path) -> Path | None:
    """Copy the export (and its data file, if any, returned)."""
    shutil.copyfile(src, dst)
    data = Path(f"{src}.data")
    if not data.is_file():
        return None
    # external data is referenced by file name: keep the name the model expects
    shutil.copyfile(data, dst.parent / data.name)
    return dst.parent / data.name


# measured with benchmarks/int8_cpu_layouts.py on an AMD EPYC (family 25, AVX2, no VNNI), ONNX
# Runtime 1.32, SmolLM2-135M, WikiText-2 (README "INT8 on CPUs without VNNI")
S8_ON_AVX2_CONSEQUENCE = ("measured on SmolLM2-135M: perplexity 490.1 against 360.1 for the "
                          "same engine's Q/DQ computed exactly, 186.6 against 157.0 with the "
                          "down projections FP32")


def saturation_warning(path: Path, manifest: Mapping[str, Any], isa: CpuIsa) -> str | None:
    """One line when an INT8 engine with ``s8`` weights (built for a CPU with VNNI, or for
    TensorRT) runs on ``isa`` whose u8 x s8 kernels saturate; None when it is exact here."""
    record = manifest.get("weight_layout")
    if record is None and "weight_layout" not in manifest and \
            (manifest.get("as_built_counts") or {}).get("int8"):
        record = {"layout": "s8"}  # built before quantkit recorded layouts: always s8
    if not isa.u8s8_saturates or not record or record.get("layout") != "s8":
        return None
    built_on = (record.get("built_on") or {}).get("name", "another CPU")
    return (f"{path} has s8 INT8 weights (built on {built_on}); this CPU ({isa.name}, no VNNI) "
            f"runs them on ONNX Runtime's saturating u8 x s8 kernels, so its numbers are wrong "
            f"here ({S8_ON_AVX2_CONSEQUENCE}); rebuild it on this machine with 'quantkit build "
            f"... --weight-layout auto' (or u8)")


OPTIMIZATION_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
                       "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}


class OnnxRuntimeRunner(Runner):
    """An InferenceSession over the engine's ONNX. ``threads=None`` uses every core.

    ``optimization`` is ONNX Runtime's graph optimization level; the default ``all`` includes the
    passes that fuse Q/DQ into integer kernels (they run from ``extended`` up).
    """

    def __init__(
        self,
        engine: Engine,
        threads: int | None = None,
        providers: list[str] | None = None,
        optimization: str = "all",
    ) -> None:
        super().__init__(engine)
        if optimization not in OPTIMIZATION_LEVELS:
            raise QuantkitError(f"unknown optimization level '{optimization}'",
                                f"use one of: {', '.join(OPTIMIZATION_LEVELS)}")
        self.threads = threads
        self.providers = providers
        self.optimization = optimization
        self._session: Any = None

    def _activate_impl(self) -> None:
        ort = _ort()
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads or os.cpu_count() or 1
        options.inter_op_num_threads = 1
        options.graph_optimization_level = getattr(
            ort.GraphOptimizationLevel, OPTIMIZATION_LEVELS[self.optimization])
        available = ort.get_available_providers()
        providers = self.providers or [
            p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available
        ]
        self._check_fp16(providers)
        if providers and providers[0] == "CPUExecutionProvider" and \
                self.optimization in ("extended", "all"):
            message = saturation_warning(self.engine.path, self.engine.manifest, cpu_isa())
            if message:
                warnings.warn(message, QuantkitWarning, stacklevel=3)
        path = self.engine.path / str(self.engine.manifest.get("onnx", ENGINE_ONNX))
        try:
            self._session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise QuantkitError(
                f"ONNX Runtime cannot load {path}: {str(exc).splitlines()[0]}"
            ) from None
        self._threads_used = options.intra_op_num_threads

    def _check_fp16(self, providers: list[str]) -> None:
        """An engine with FP16 nodes runs as FP16 only on the provider it was checked for; on
        another one ONNX Runtime may cast them to float32 without a word."""
        fp16 = self.engine.manifest.get("fp16") or {}
        if fp16.get("mode") == "emulate":
            return  # float32 kernels everywhere
        if fp16.get("nodes") and providers and providers[0] != fp16.get("provider"):
            raise QuantkitError(
                f"{self.engine.path} has {fp16['nodes']} fp16 nodes checked for "
                f"{fp16.get('provider')}, but would run on {providers[0]}",
                "run it with that provider, or rebuild the engine for this one",
            )

    def _deactivate_impl(self) -> None:
        self._session = None

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self._session.get_inputs()]

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self._session.get_outputs()]

    def _run_impl(
        self, feeds: Mapping[str, np.ndarray], outputs: list[str] | None
    ) -> dict[str, np.ndarray]:
        names = outputs or self.output_names
        values = self._session.run(names, {k: feeds[k] for k in self.input_names})
        return dict(zip(names, values, strict=True))

    def describe(self) -> dict[str, Any]:
        return {
            "backend": "onnxruntime",
            "providers": self._session.get_providers() if self._session else self.providers,
            "intra_op_threads": getattr(self, "_threads_used", self.threads),
            "inter_op_threads": 1,
            "graph_optimization": OPTIMIZATION_LEVELS[self.optimization],
            "onnxruntime": _ort().__version__,
        }


__all__ = ["OnnxRuntimeBackend", "OnnxRuntimeRunner", "ONNX_NAME"]
