"""Building a TensorRT engine from ONNX, on either quantization path.

* implicit (TensorRT 10): a plain network, ``INT8``/``FP16`` builder flags for the precisions
  asked for, the PrecisionPlan applied as ``layer.precision`` / ``set_output_type`` with OBEY or
  PREFER precision constraints, and an INT8 calibrator with a calibration profile;
* explicit (TensorRT 10 and 11): the Q/DQ / FP16 ONNX parsed into a strongly typed network
  (``NetworkDefinitionCreationFlag.STRONGLY_TYPED``; TensorRT 11 always types strongly), no
  precision flags, no constraints, no calibrator.

Both share the parser, optimization profiles, the workspace limit, the timing cache (read before,
merged and written back atomically after) and ``ProfilingVerbosity.DETAILED``, so the engine
inspector can report each layer's precision.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from quantkit.artifacts import atomic_write_bytes
from quantkit.backends.tensorrt._trt import require_tensorrt
from quantkit.backends.tensorrt.calibrator import (
    CalibrationSession,
    CalibrationSource,
    make_calibrator,
)
from quantkit.backends.tensorrt.diagnostics import (
    LogBook,
    ParserIssue,
    diagnose_build_failure,
    make_logger,
    parser_error,
)
from quantkit.backends.tensorrt.dtypes import numpy_dtype
from quantkit.backends.tensorrt.layers import (
    EngineLayer,
    NetworkLayer,
    PlanMapping,
    check_explicit_network,
    map_plan_to_layers,
    parse_engine_information,
)
from quantkit.backends.tensorrt.options import (
    Constraints,
    InputSpec,
    ProfileShapes,
    TensorRTBuildOptions,
    calibration_profile_shapes,
    profile_shapes,
)
from quantkit.backends.tensorrt.version import QuantPath, TrtVersion, check_supported
from quantkit.errors import QuantkitError
from quantkit.plan import Precision, PrecisionPlan

if TYPE_CHECKING:
    import tensorrt as trt


@dataclass
class BuildSpec:
    """One build: which ONNX, which path, what precisions, with what calibration."""

    onnx_path: Path
    path: QuantPath
    wanted: set[Precision]
    options: TensorRTBuildOptions
    plan: PrecisionPlan | None = None
    calibration: CalibrationSource | None = None


@dataclass
class BuildOutcome:
    engine: bytes
    version: TrtVersion
    path: QuantPath
    strongly_typed: bool
    inputs: list[InputSpec]
    io: list[dict[str, Any]]
    flags: list[str]
    inspector_json: str
    engine_layers: list[EngineLayer]
    log: LogBook
    plan_mapping: PlanMapping | None = None
    calibration: CalibrationSession | None = None
    timing_cache: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)


def network_layers(network: trt.INetworkDefinition) -> list[NetworkLayer]:
    layers = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        outputs = [layer.get_output(j) for j in range(layer.num_outputs)]
        outputs = [t for t in outputs if t is not None]
        inputs = [layer.get_input(j) for j in range(layer.num_inputs)]
        inputs = [t for t in inputs if t is not None]  # optional inputs may be absent
        layers.append(
            NetworkLayer(
                index=i,
                name=layer.name,
                type=layer.type.name,
                # ILayer.metadata: the ONNX parser's "[ONNX Layer: <node>]" (TensorRT 10)
                metadata=str(getattr(layer, "metadata", "") or ""),
                output_dtypes=tuple(t.dtype.name for t in outputs),
                shape_outputs=any(t.is_shape_tensor for t in outputs),
                input_dtypes=tuple(t.dtype.name for t in inputs),
            )
        )
    return layers


def network_inputs(network: trt.INetworkDefinition) -> list[InputSpec]:
    specs = []
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        dims = tensor.shape
        specs.append(
            InputSpec(tensor.name, tensor.dtype.name, tuple(int(dims[k]) for k in range(len(dims))))
        )
    return specs


def _add_profile(
    builder: trt.Builder, shapes: ProfileShapes
) -> trt.IOptimizationProfile:
    import tensorrt as trt

    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in shapes.items():
        profile.set_shape(name, trt.Dims(list(low)), trt.Dims(list(opt)), trt.Dims(list(high)))
    return profile


def _parse(
    network: trt.INetworkDefinition, logger: trt.ILogger, onnx_path: Path
) -> trt.OnnxParser:
    import tensorrt as trt

    parser = trt.OnnxParser(network, logger)
    # parse_from_file resolves external data (models over 2 GB) relative to the model's folder
    if not parser.parse_from_file(str(onnx_path)):
        issues = []
        for i in range(parser.num_errors):
            err = parser.get_error(i)
            issues.append(
                ParserIssue(
                    node=_call_or_none(err, "node_name"),
                    operator=_call_or_none(err, "node_operator"),
                    description=str(err.desc()),
                    code=getattr(err.code(), "name", None),
                )
            )
        raise parser_error(str(onnx_path), issues)
    return parser


def _call_or_none(obj: Any, method: str) -> str | None:
    fn = getattr(obj, method, None)
    if fn is None:
        return None
    value = fn()
    return str(value) if value else None


def _enable(config: trt.IBuilderConfig, flag_name: str, flags: list[str]) -> None:
    import tensorrt as trt

    config.set_flag(getattr(trt.BuilderFlag, flag_name))
    flags.append(flag_name)


def load_timing_cache(
    config: trt.IBuilderConfig, path: Path | None, notes: list[str]
) -> trt.ITimingCache | None:
    """Attach the timing cache at ``path`` (a new one if the file does not exist yet)."""
    if path is None:
        return None
    data = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(data)
    if not config.set_timing_cache(cache, False):
        notes.append(f"timing cache {path} was made on another device or TensorRT; started anew")
        cache = config.create_timing_cache(b"")
        if not config.set_timing_cache(cache, False):
            raise QuantkitError("TensorRT refused a new, empty timing cache")
    return cache


def save_timing_cache(
    config: trt.IBuilderConfig, path: Path, loaded_digest: str | None
) -> dict[str, Any]:
    """Write the build's timing cache back to ``path`` atomically, first merging entries another
    build wrote there meanwhile (so concurrent builds only add to the cache)."""
    cache = config.get_timing_cache()
    if path.is_file():
        current = path.read_bytes()
        if hashlib.sha256(current).hexdigest() != loaded_digest:
            on_disk = config.create_timing_cache(current)
            cache.combine(on_disk, False)
    data = bytes(memoryview(cache.serialize()))
    atomic_write_bytes(path, data)
    return {"path": str(path), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def build_engine(spec: BuildSpec) -> BuildOutcome:
    trt_mod = require_tensorrt()
    import tensorrt as trt

    version = TrtVersion.parse(trt_mod.__version__)
    check_supported(version)
    opts = spec.options
    book = LogBook()
    logger = make_logger(book)
    builder = trt.Builder(logger)
    notes: list[str] = []

    strongly_typed = spec.path is QuantPath.EXPLICIT
    creation_flags = 0
    if strongly_typed:
        # on TensorRT 11 the flag is accepted and ignored (networks are always strongly typed)
        flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
        if flag is not None:
            creation_flags |= 1 << int(flag)
    network = builder.create_network(creation_flags)
    parser = _parse(network, logger, spec.onnx_path)
    inputs = network_inputs(network)
    layers = network_layers(network)

    config = builder.create_builder_config()
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if opts.workspace_mib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(opts.workspace_mib) << 20)
    if opts.optimization_level is not None:
        config.builder_optimization_level = int(opts.optimization_level)
    flags: list[str] = []
    if not opts.tf32 and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)
        flags.append("-TF32")
    for shape_range in opts.profiles:
        profile = _add_profile(builder, profile_shapes(inputs, shape_range))
        if config.add_optimization_profile(profile) < 0:
            raise QuantkitError(f"TensorRT rejected the optimization profile {shape_range}")

    plan_mapping: PlanMapping | None = None
    calibrator: trt.IInt8Calibrator | None = None
    session: CalibrationSession | None = None
    constraints: str | None = None
    if spec.path is QuantPath.IMPLICIT:
        if not version.has_implicit_quantization:
            from quantkit.backends.tensorrt.version import implicit_unavailable_error

            raise implicit_unavailable_error(version)
        wanted = set(spec.wanted)
        if spec.plan is not None:
            plan_mapping = map_plan_to_layers(layers, spec.plan)
            wanted |= plan_mapping.precisions
        if Precision.INT8 in wanted:
            _enable(config, "INT8", flags)
        if Precision.FP16 in wanted:
            _enable(config, "FP16", flags)
        if plan_mapping is not None and plan_mapping.assignments:
            constraints = opts.constraints.value
            _enable(
                config,
                "OBEY_PRECISION_CONSTRAINTS" if opts.constraints is Constraints.OBEY
                else "PREFER_PRECISION_CONSTRAINTS",
                flags,
            )
            for assignment in plan_mapping.assignments:
                layer = network.get_layer(assignment.index)
                layer.precision = getattr(trt.DataType, assignment.trt_precision)
                for index, type_name in assignment.output_types:
                    layer.set_output_type(index, getattr(trt.DataType, type_name))
        if Precision.INT8 in wanted:
            if spec.calibration is None:
                raise QuantkitError(
                    "implicit INT8 needs calibration: token batches, a CalibrationTable or a "
                    "TensorRT calibration cache",
                    "pass calibration data or a table, or use the explicit path with a Q/DQ ONNX",
                )
            shape = spec.calibration.shape
            cal_profile = _add_profile(builder, calibration_profile_shapes(inputs, shape))
            session = spec.calibration.session_for(
                {i.name: numpy_dtype(i.dtype) for i in inputs}
            )
            calibrator = make_calibrator(session)
            config.int8_calibrator = calibrator
            if not config.set_calibration_profile(cal_profile):
                raise QuantkitError(f"TensorRT rejected the calibration profile at {list(shape)}")
    else:
        check_explicit_network(layers, spec.wanted)

    timing_path = Path(opts.timing_cache) if opts.timing_cache else None
    loaded_digest = None
    if timing_path is not None and timing_path.is_file():
        loaded_digest = hashlib.sha256(timing_path.read_bytes()).hexdigest()
    timing_cache = load_timing_cache(config, timing_path, notes)

    try:
        serialized = builder.build_serialized_network(network, config)
    except MemoryError:
        serialized = None
        book.add("ERROR", "out of memory (MemoryError raised by build_serialized_network)")
    if serialized is None:
        if session is not None:
            # a failure inside the calibrator's callbacks, or no data, explains it best
            session.raise_callback_errors()
            if session.get_batch_calls and not session.batches_fed and not session.used_cache:
                session.check_after_build()
        raise diagnose_build_failure(
            book.records,
            constraints=constraints,
            known_nodes=spec.plan.decisions if spec.plan is not None else (),
            workspace_mib=opts.workspace_mib,
        )
    engine_bytes = bytes(memoryview(serialized))
    del serialized
    if session is not None:
        session.check_after_build()  # zero batches: refuse the engine

    timing_info = None
    if timing_path is not None and timing_cache is not None:
        timing_info = save_timing_cache(config, timing_path, loaded_digest)

    inspector_json, io = inspect_engine(engine_bytes, logger, book)
    del parser
    return BuildOutcome(
        engine=engine_bytes,
        version=version,
        path=spec.path,
        strongly_typed=strongly_typed,
        inputs=inputs,
        io=io,
        flags=flags,
        inspector_json=inspector_json,
        engine_layers=parse_engine_information(inspector_json),
        log=book,
        plan_mapping=plan_mapping,
        calibration=session,
        timing_cache=timing_info,
        notes=notes,
    )


def inspect_engine(
    engine_bytes: bytes, logger: trt.ILogger, book: LogBook
) -> tuple[str, list[dict[str, Any]]]:
    """Deserialize the engine: the inspector's per-layer JSON and the I/O tensors' description."""
    import tensorrt as trt

    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(engine_bytes)
    if engine is None:
        raise QuantkitError(
            "TensorRT could not deserialize the engine it just built: "
            + " | ".join(r.message for r in book.errors()[-3:])
        )
    inspector = engine.create_engine_inspector()
    info = str(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    io = engine_io(engine)
    # TensorRT objects go before what made them: inspector, engine, then the runtime
    del inspector
    del engine
    del runtime
    return info, io


def engine_io(engine: trt.ICudaEngine) -> list[dict[str, Any]]:
    import tensorrt as trt

    io = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        mode = engine.get_tensor_mode(name)
        dims = engine.get_tensor_shape(name)
        entry: dict[str, Any] = {
            "name": name,
            "mode": mode.name.lower(),
            "dtype": engine.get_tensor_dtype(name).name,
            "shape": [int(dims[k]) for k in range(len(dims))],
        }
        if mode == trt.TensorIOMode.INPUT:
            entry["profiles"] = [
                [[int(d[k]) for k in range(len(d))]
                 for d in engine.get_tensor_profile_shape(name, p)]
                for p in range(engine.num_optimization_profiles)
            ]
        io.append(entry)
    return io

