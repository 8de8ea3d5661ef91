"""The TensorRT backend: ``BuildRequest`` -> engine directory, and runners over it.

An engine directory holds ``engine.plan`` (the serialized engine), ``layers.json`` (what every
engine layer runs in, from the engine inspector, and how the plan was applied), ``build_log.txt``
(TensorRT's warnings and errors), the tokenizer of the export, and, after a TensorRT calibration,
``calibration.cache`` (TensorRT's bytes) and ``calibration_table.json`` (the same scales as a
quantkit CalibrationTable). ``manifest.json`` records the inputs and a summary of all of it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sized
from pathlib import Path
from typing import Any

from quantkit.artifacts import atomic_write_bytes, atomic_write_json, atomic_write_text
from quantkit.backends.base import Backend, BuildRequest, Engine, Runner
from quantkit.backends.tensorrt._trt import require_tensorrt
from quantkit.backends.tensorrt.calibrator import (
    TRT_ALGORITHM_NAMES,
    CalibrationSession,
    CalibrationSource,
)
from quantkit.backends.tensorrt.layers import compare_with_plan, summarize_engine_layers
from quantkit.backends.tensorrt.options import (
    CalibratorKind,
    TensorRTBuildOptions,
    resolve_cache_profiles,
)
from quantkit.backends.tensorrt.runner import ENGINE_FILE, TensorRTRunner
from quantkit.backends.tensorrt.version import BuildMode, QuantPath, TrtVersion, select_path
from quantkit.errors import QuantkitError
from quantkit.plan import Precision, PrecisionPlan

LAYERS_FILE = "layers.json"
LOG_FILE = "build_log.txt"
CACHE_FILE = "calibration.cache"
TABLE_FILE = "calibration_table.json"
QDQ_FILE = "model.qdq.onnx"


def wanted_precisions(precision: str, plan: PrecisionPlan | None) -> set[Precision]:
    """The precisions an engine must realise: the plan's, else the label's."""
    if plan is not None and plan.decisions:
        return {d.precision for d in plan.decisions.values()}
    if precision == "mixed":
        raise QuantkitError("a 'mixed' engine needs a precision plan")
    return {Precision.parse(precision)}


def choose_calibrator(
    options: TensorRTBuildOptions, table_algorithm: str | None
) -> CalibratorKind:
    """The calibrator named in the options, else the one whose cache header the table's scales
    go out under (``MinMaxCalibration`` for minmax tables, ``EntropyCalibration2`` for every
    other method: with a cache TensorRT uses the scales as given), else entropy."""
    from_table = None
    if table_algorithm is not None:
        by_algorithm = {name: kind for kind, name in TRT_ALGORITHM_NAMES.items()}
        if table_algorithm not in by_algorithm:
            raise QuantkitError(f"no TensorRT calibrator reads '{table_algorithm}' caches")
        from_table = by_algorithm[table_algorithm]
    if options.calibrator is not None:
        if from_table is not None and from_table is not options.calibrator:
            raise QuantkitError(
                f"the calibration table goes to TensorRT as a {table_algorithm} cache, the "
                f"options ask for the {options.calibrator.value} calibrator",
                "TensorRT only takes a cache whose algorithm matches its calibrator: drop the "
                "calibrator option",
            )
        return options.calibrator
    return from_table or CalibratorKind.ENTROPY


def calibration_shape(
    options: TensorRTBuildOptions, data: Any
) -> tuple[int, int]:
    """The calibration (batch, seq): the option, else the data's batch_size/seq_len, else the
    first profile's opt shape."""
    if options.calibration_shape is not None:
        return options.calibration_shape
    batch, seq = getattr(data, "batch_size", None), getattr(data, "seq_len", None)
    if isinstance(batch, int) and isinstance(seq, int):
        return (batch, seq)
    return options.profiles[0].opt


def graph_options(options: Mapping[str, Any] | None, onnx_path: Path) -> TensorRTBuildOptions:
    """Build options with the profiles the graph at ``onnx_path`` needs (a KV-cache export:
    prefill and decode profiles with past lengths, ``resolve_cache_profiles``)."""
    from quantkit.export import export_manifest

    manifest = export_manifest(Path(onnx_path)) or {}
    return resolve_cache_profiles(TensorRTBuildOptions.from_dict(options),
                                  bool(manifest.get("cache")), manifest.get("max_positions"))


def _graph_options(request: BuildRequest) -> TensorRTBuildOptions:
    return graph_options(request.options, Path(request.onnx_path))


def check_int8_sources(options: TensorRTBuildOptions, *, table_given: bool, data: Any) -> None:
    """An INT8 build needs scales from somewhere, and calibration data must make at least one
    calibration batch. ``data``: token blocks, or anything with their ``num_samples``,
    ``seq_len`` and ``batch_size`` (the CLI checks its options with this before any work)."""
    scales_given = table_given or options.calibration_cache is not None
    if options.qdq_onnx is None and not scales_given and data is None:
        raise QuantkitError(
            "an INT8 TensorRT build needs scales: calibration data (token blocks), a "
            "calibration table or cache, or a Q/DQ ONNX; none was given",
            "pass --table from 'quantkit calibrate', or --dataset (with --num-samples, "
            "--seq-len, --batch-size) to let TensorRT 10 calibrate",
        )
    if data is None or scales_given or options.qdq_onnx is not None:
        return
    if options.mode is BuildMode.EXPLICIT:
        raise QuantkitError(
            "the explicit (Q/DQ) path takes its scales from a calibration table; calibration "
            "data is only read by TensorRT 10's calibrator (implicit path)",
            "run 'quantkit calibrate' and pass --table, or use mode 'auto'/'implicit'",
        )
    batch, seq = calibration_shape(options, data)
    rows, data_seq = getattr(data, "num_samples", None), getattr(data, "seq_len", None)
    if isinstance(data_seq, int) and data_seq != seq:
        raise QuantkitError(
            f"the calibration shape's seq is {seq}, the token blocks are {data_seq} tokens "
            "long",
            "make calibration_shape's seq equal to --seq-len, or drop calibration_shape",
        )
    if isinstance(rows, int) and rows < batch:
        raise QuantkitError(
            f"INT8 calibration would receive zero batches: {rows} token block(s), fewer than "
            f"one calibration batch of {batch}",
            f"use --num-samples {batch} or more, or a smaller calibration batch "
            "(--batch-size / calibration_shape)",
        )


class TensorRTBackend(Backend):
    """Builds TensorRT engines (implicit calibrator path on TensorRT 10, explicit strongly typed
    Q/DQ path on 10 and 11). ``calibration_data``: re-iterable token batches (``TokenBlocks``)
    for the implicit INT8 path; they are not serialisable, so they are given here rather than in
    ``BuildRequest.options``."""

    name = "tensorrt"

    def __init__(self, calibration_data: Iterable[Any] | None = None) -> None:
        self.calibration_data = calibration_data
        self._sources: dict[tuple[Any, ...], CalibrationSource] = {}

    def set_calibration_data(self, data: Iterable[Any] | None) -> None:
        self.calibration_data = data
        self._sources.clear()

    # -- checks before anything is written --------------------------------------------------------
    def _check_request(self, request: BuildRequest) -> None:
        options = _graph_options(request)
        wanted_precisions(request.precision, request.plan)
        for key in ("qdq_onnx", "calibration_cache"):
            value = getattr(options, key)
            if value is not None and not Path(value).is_file():
                raise QuantkitError(f"{key} {value} does not exist")
        if options.calibration_cache is not None and request.table is not None:
            raise QuantkitError(
                "both a calibration table and a calibration cache were given", "give one of them"
            )
        if options.qdq_onnx is not None and options.mode.value == "implicit":
            raise QuantkitError(
                "a Q/DQ ONNX builds on the explicit path, not with the calibrator",
                "use mode 'explicit' (or 'auto') with qdq_onnx",
            )
        if Precision.INT8 in wanted_precisions(request.precision, request.plan):
            check_int8_sources(options, table_given=request.table is not None,
                               data=self.calibration_data)
        # last, so that every check above also runs (and is tested) where TensorRT is missing;
        # still before anything is written
        require_tensorrt()

    # -- the build --------------------------------------------------------------------------------
    def _build_impl(self, request: BuildRequest, out_dir: Path) -> dict[str, Any]:
        from quantkit.backends.onnxruntime import copy_export_context
        from quantkit.backends.tensorrt.builder import BuildSpec, build_engine

        options = _graph_options(request)
        trt_mod = require_tensorrt()
        version_text = str(trt_mod.__version__)
        version = TrtVersion.parse(version_text)
        path = select_path(version, options.mode, has_qdq_onnx=options.qdq_onnx is not None)
        wanted = wanted_precisions(request.precision, request.plan)
        onnx_path = Path(request.onnx_path)
        onnx_built = str(onnx_path)
        qdq_rewrite: dict[str, Any] | None = None
        if path is QuantPath.EXPLICIT and options.qdq_onnx is not None:
            onnx_path = Path(options.qdq_onnx)
            onnx_built = str(onnx_path)
        elif path is QuantPath.EXPLICIT and wanted & {Precision.INT8, Precision.FP16}:
            # no Q/DQ ONNX given: write the plan's own (the form ONNX Runtime also runs)
            qdq_rewrite = write_qdq_onnx(request, out_dir / QDQ_FILE, version)
            onnx_path, onnx_built = out_dir / QDQ_FILE, QDQ_FILE

        fields = copy_export_context(Path(request.onnx_path), out_dir)
        model_hash = fields.get("source_model_hash")
        source = None
        if path is QuantPath.IMPLICIT and Precision.INT8 in wanted:
            source = self._calibration_source(request, options, version_text, model_hash)

        outcome = build_engine(
            BuildSpec(
                onnx_path=onnx_path,
                path=path,
                wanted=wanted,
                options=options,
                plan=request.plan if path is QuantPath.IMPLICIT else None,
                calibration=source,
            )
        )
        atomic_write_bytes(out_dir / ENGINE_FILE, outcome.engine)
        atomic_write_text(out_dir / LOG_FILE, outcome.log.text("WARNING"))

        engine_layers = outcome.engine_layers
        layer_summary = summarize_engine_layers(engine_layers)
        comparison = compare_with_plan(engine_layers, request.plan) if request.plan else None
        atomic_write_json(
            out_dir / LAYERS_FILE,
            {
                "summary": layer_summary,
                "plan_comparison": comparison,
                "plan_mapping": outcome.plan_mapping.to_dict() if outcome.plan_mapping else None,
                "layers": [layer.to_dict() for layer in engine_layers],
            },
        )

        calibration: dict[str, Any] | None = None
        session = outcome.calibration
        if session is not None:
            calibration = session.describe()
            if session.written is not None and not session.used_cache:
                atomic_write_bytes(out_dir / CACHE_FILE, session.written)
                calibration["cache_file"] = CACHE_FILE
                calibration["table_file"] = self._write_table(
                    session, out_dir, version_text, model_hash
                )

        fields.update(
            engine_file=ENGINE_FILE,
            layers_file=LAYERS_FILE,
            size_bytes=len(outcome.engine),
            int8_coverage=_int8_coverage(comparison),
            tensorrt={
                "version": version_text,
                "path": path.value,
                "strongly_typed": outcome.strongly_typed,
                "onnx_built": onnx_built,
                "qdq_rewrite": qdq_rewrite,
                "flags": outcome.flags,
                "constraints": _constraints_used(outcome.flags),
                "profiles": [p.to_dict() for p in options.profiles],
                "io": outcome.io,
                "calibration": calibration,
                "timing_cache": outcome.timing_cache,
                "layer_precisions": layer_summary,
                "plan_mapping": outcome.plan_mapping.summary() if outcome.plan_mapping else None,
                "plan_comparison": (
                    {k: v for k, v in comparison.items() if k != "differ"}
                    | {"differ": len(comparison["differ"])}
                    if comparison else None
                ),
                "warnings": len(outcome.log.warnings()),
                "notes": outcome.notes,
            },
        )
        describe = getattr(self.calibration_data, "describe", None)
        if source is not None and source.data is not None and callable(describe):
            fields["calibration_data"] = describe()
        return fields

    def _calibration_source(
        self,
        request: BuildRequest,
        options: TensorRTBuildOptions,
        trt_version: str,
        model_hash: str | None,
    ) -> CalibrationSource:
        from quantkit.backends.tensorrt import cache_io

        table = request.table
        if table is not None and table.weights:
            raise QuantkitError(
                "the calibration table holds GPTQ int8 weights, which TensorRT's calibrator "
                "(implicit INT8) would ignore: it rounds the FP32 weights itself",
                "build on the explicit Q/DQ path (mode 'explicit'), or use a table calibrated "
                "without --weights gptq",
            )
        table_algorithm = cache_io.calibrator_algorithm_for_table(table) if table else None
        kind = choose_calibrator(options, table_algorithm)
        algorithm = TRT_ALGORITHM_NAMES[kind]
        cache: bytes | None = None
        if table is not None or options.calibration_cache is not None:
            names = cache_io.onnx_tensor_names(Path(request.onnx_path))
            if table is not None:
                cache = cache_io.cache_bytes_from_table(
                    table, algorithm, trt_version, model_hash=model_hash, tensor_names=names
                )
            elif options.calibration_cache is not None:
                cache = cache_io.cache_bytes_from_file(
                    Path(options.calibration_cache),
                    algorithm,
                    trt_version,
                    accept_version_mismatch=options.accept_cache_version_mismatch,
                    tensor_names=names,
                )
        data = self.calibration_data
        if data is None and cache is None:
            raise QuantkitError(
                "implicit INT8 needs calibration data, a CalibrationTable or a TensorRT "
                "calibration cache; none was given",
                "pass calibration data (token blocks) or a table, or build the Q/DQ ONNX and "
                "use mode 'explicit'",
            )
        if isinstance(data, Sized) and len(data) == 0:
            raise QuantkitError("the calibration data holds zero batches")
        shape = calibration_shape(options, data)
        key = (kind, shape, id(data), cache)
        source = self._sources.get(key)
        if source is None:
            source = CalibrationSource(kind, shape, data=data, cache=cache)
            self._sources[key] = source
        return source

    def _write_table(
        self,
        session: CalibrationSession,
        out_dir: Path,
        trt_version: str,
        model_hash: str | None,
    ) -> str:
        from quantkit.backends.tensorrt import cache_io

        assert session.written is not None
        describe = getattr(self.calibration_data, "describe", None)
        feeder = session.feeder
        table = cache_io.table_from_cache_bytes(
            session.written,
            TRT_ALGORITHM_NAMES[session.kind],
            trt_version,
            model_hash=model_hash,
            data_description=describe() if callable(describe) else None,
            num_samples=feeder.rows_fed if feeder is not None else 0,
            num_tokens=feeder.rows_fed * feeder.shape[1] if feeder is not None else 0,
        )
        table.save(out_dir / TABLE_FILE)
        return TABLE_FILE

    def _runner_impl(self, engine: Engine, **options: Any) -> Runner:
        return TensorRTRunner(engine, **options)


def write_qdq_onnx(request: BuildRequest, target: Path, version: TrtVersion) -> dict[str, Any]:
    """The explicit path's ONNX when none was given: the FP32 export rewritten for the plan by
    :mod:`quantkit.qdq` (Q/DQ on INT8 MatMul/Gemm inputs with the table's scales, per-channel
    int8 weights, Cast-bounded FP16 regions). ``shared_inputs="dedicated"`` keeps every ONNX node
    name, so the engine inspector's layers map back onto the plan. Returns the rewrite summary."""
    from quantkit.backends.onnxruntime import check_table, effective_plan
    from quantkit.onnx_io import load_model
    from quantkit.qdq import QdqOptions
    from quantkit.rewrite_io import open_for_rewrite

    source = Path(request.onnx_path)
    graph = load_model(source, with_weights=False)
    plan = effective_plan(request, graph)
    table = request.table
    if plan.nodes_with(Precision.INT8):
        if table is None:
            why = (f"TensorRT {version.major} has no INT8 calibrator"
                   if not version.has_implicit_quantization
                   else "the explicit path does not calibrate")
            raise QuantkitError(
                f"{why}: an explicit INT8 build takes its scales from a calibration table",
                "run 'quantkit calibrate' (CPU is fine) and pass --table OUT/table.json",
            )
        check_table(table, source, graph)
    options = QdqOptions(per_channel=True, shared_inputs="dedicated")
    with open_for_rewrite(source, target.parent) as rewrite:  # streamed past 2 GB
        result = rewrite.rewrite(plan, table.amax if table is not None else None, options,
                                 table.skipped if table is not None else None,
                                 table.weights if table is not None else None)
        rewrite.save(result.model, target)
    return {"file": target.name, "options": options.to_dict(), **result.summary()}


def _constraints_used(flags: list[str]) -> str | None:
    for flag, name in (("OBEY_PRECISION_CONSTRAINTS", "obey"),
                       ("PREFER_PRECISION_CONSTRAINTS", "prefer")):
        if flag in flags:
            return name
    return None


def _int8_coverage(comparison: dict[str, Any] | None) -> float | None:
    """Of the plan's INT8 nodes, the share the inspector shows in an INT8 engine layer."""
    if not comparison or not comparison["planned_int8"]:
        return None
    return comparison["realized_int8"] / comparison["planned_int8"]
