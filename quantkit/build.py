"""Build an engine from an FP32 export, a precision recipe and a calibration table: the library
call behind ``quantkit build``.

``build_engine`` resolves the recipe against the graph (``quantkit.plan.resolve_plan``), loads the
table, and hands a ``BuildRequest`` to the named backend, which checks everything before it
writes anything.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from quantkit.artifacts import check_can_write
from quantkit.errors import QuantkitError
from quantkit.plan import PlanRecipe, Precision, PrecisionPlan, resolve_plan

if TYPE_CHECKING:
    from quantkit.backends.base import Engine
    from quantkit.calib.table import CalibrationTable

PRECISION_LABELS = ("fp32", "fp16", "int8", "mixed")


@dataclass(frozen=True)
class CalibrationData:
    """Token blocks for a TensorRT 10 INT8 build that calibrates itself (the implicit path):
    the same text settings as ``quantkit calibrate``, tokenized with the export's tokenizer."""

    dataset: str
    dataset_config: str | None = None
    split: str = "train"
    text_column: str = "text"
    num_samples: int = 512
    seq_len: int = 512
    batch_size: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("num_samples", "seq_len", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise QuantkitError(f"--{name.replace('_', '-')} must be at least 1, got "
                                    f"{getattr(self, name)}")

    def blocks(self, onnx_path: Path) -> Any:
        """The TokenBlocks, tokenized with the tokenizer saved beside ``onnx_path``."""
        from quantkit.data import TokenBlocks, resolve_text_source
        from quantkit.export import tokenizer_beside

        tokenizer = tokenizer_beside(onnx_path)
        source = resolve_text_source(self.dataset, self.dataset_config, self.split,
                                     self.text_column)
        blocks = TokenBlocks(source, tokenizer, seq_len=self.seq_len,
                             num_samples=self.num_samples, batch_size=self.batch_size,
                             seed=self.seed)
        blocks.describe()  # choose the blocks now: too little text fails before the build
        return blocks


def parse_options(pairs: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """``["mode=explicit", "workspace_gb=4"]`` -> ``{"mode": "explicit", "workspace_gb": 4}``."""
    import yaml

    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise QuantkitError(f"bad --option '{pair}'", "write KEY=VALUE")
        try:
            options[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            options[key.strip()] = value
    return options


def load_recipe(precision: str, plan: Path | PlanRecipe | None) -> PlanRecipe:
    """The recipe for ``--precision`` / ``--plan``: the plan file if given (its default must agree
    with the precision label unless the label is 'mixed'), else the uniform recipe."""
    if precision not in PRECISION_LABELS:
        raise QuantkitError(f"unknown precision '{precision}'",
                            f"use one of: {', '.join(PRECISION_LABELS)}")
    if plan is None:
        if precision == "mixed":
            raise QuantkitError("--precision mixed needs a plan",
                                "pass --plan, e.g. configs/mixed-safe.yaml")
        return PlanRecipe.uniform(precision)
    recipe = plan if isinstance(plan, PlanRecipe) else PlanRecipe.load(Path(plan))
    if precision != "mixed" and recipe.default.value != precision:
        raise QuantkitError(
            f"the plan's default is {recipe.default.value} but --precision is {precision}",
            "use --precision mixed for a plan that mixes precisions",
        )
    return recipe


def load_table(table: Path | CalibrationTable | None) -> CalibrationTable | None:
    if table is None or not isinstance(table, (str, Path)):
        return table
    from quantkit.calib.table import CalibrationTable

    return CalibrationTable.load(Path(table))


def plan_for(onnx_path: Path, precision: str, plan: Path | PlanRecipe | None) -> PrecisionPlan:
    """Resolve the recipe for ``precision``/``plan`` against the graph at ``onnx_path``."""
    recipe = load_recipe(precision, plan)
    resolved = resolve_plan(recipe, Path(onnx_path))
    source = dict(resolved.source)
    if isinstance(plan, (str, Path)):
        source["path"] = str(plan)
    return PrecisionPlan(resolved.default, resolved.decisions, source)


def build_engine(
    out: Path,
    *,
    precision: str,
    onnx: Path | None = None,
    model: str | None = None,
    table: Path | CalibrationTable | None = None,
    plan: Path | PlanRecipe | None = None,
    backend: str = "onnxruntime",
    options: Mapping[str, Any] | None = None,
    force: bool = False,
    trust_remote_code: bool = False,
    calibration: CalibrationData | None = None,
    table_onnx: Path | None = None,
) -> Engine:
    """Build one engine into ``out`` from ``onnx`` (an export directory or .onnx file) or from
    ``model`` (exported first, into a temporary directory that is removed afterwards).

    ``calibration``: text for TensorRT's own INT8 calibration (TensorRT 10, implicit path),
    instead of a ``table``. For ``backend="tensorrt"`` TensorRT and a CUDA GPU are checked before
    anything is exported, read or written. A KV-cache export takes the table of a plain export
    of the same model (``quantkit.cache_tables``); ``table_onnx`` names that export's ONNX where
    ``table`` is not a path whose calibration manifest says it."""
    from quantkit.backends import get_backend
    from quantkit.backends.base import BuildRequest
    from quantkit.export import find_onnx

    if (onnx is None) == (model is None):
        raise QuantkitError("give exactly one of --onnx and --model")
    check_can_write(Path(out), force)
    try:
        engine_backend = get_backend(backend)
    except ImportError as exc:  # the backend's module or its library is missing
        raise QuantkitError(f"the {backend} backend is not available here: {exc}") from None
    recipe = load_recipe(precision, plan)  # fail on a bad plan before any export
    if calibration is not None:
        check_calibration_request(backend, precision, recipe, table)
    calib_table = load_table(table)
    if backend == "tensorrt":
        from quantkit.backends.tensorrt import TensorRTBuildOptions, require_tensorrt_gpu
        from quantkit.backends.tensorrt.backend import check_int8_sources, graph_options

        trt_options = TensorRTBuildOptions.from_dict(options)  # unknown/bad options: now
        if onnx is not None:  # profiles against the graph's kind (KV cache or not): now too
            trt_options = graph_options(options, find_onnx(onnx))
        if _uses_int8(recipe):
            check_int8_sources(trt_options, table_given=table is not None, data=calibration)
        require_tensorrt_gpu()
    workdir: Path | None = None
    try:
        if model is not None:
            from quantkit.export import export_model
            from quantkit.models import load_model

            workdir = Path(tempfile.mkdtemp(prefix=".quantkit-build-export-",
                                            dir=Path(out).resolve().parent))
            loaded = load_model(model, trust_remote_code=trust_remote_code)
            onnx_path = export_model(loaded, workdir / "export", with_nll=True).onnx_path
        else:
            assert onnx is not None
            onnx_path = find_onnx(Path(onnx))
        if calib_table is not None:
            from quantkit.cache_tables import table_for_cache_graph

            if table_onnx is None and isinstance(table, (str, Path)):
                table_onnx = _calibrated_onnx(Path(table))
            calib_table = table_for_cache_graph(calib_table, onnx_path, table_onnx)
        resolved = plan_for(onnx_path, precision, recipe)
        if isinstance(plan, (str, Path)):
            resolved = PrecisionPlan(resolved.default, resolved.decisions,
                                     {**resolved.source, "path": str(plan)})
        if calibration is not None:
            from quantkit.backends.tensorrt import TensorRTBackend

            assert isinstance(engine_backend, TensorRTBackend)
            engine_backend.set_calibration_data(calibration.blocks(onnx_path))
        request = BuildRequest(onnx_path=onnx_path, precision=precision, plan=resolved,
                               table=calib_table, options=dict(options or {}))
        return engine_backend.build(request, Path(out), force=force)
    finally:
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)


def _calibrated_onnx(table: Path) -> Path | None:
    """The ONNX a table.json's calibration manifest names, or None for a table without one."""
    from quantkit.calib.run import calibration_onnx

    try:
        return calibration_onnx(table)
    except QuantkitError:
        return None


def check_calibration_request(backend: str, precision: str, recipe: PlanRecipe,
                              table: Path | CalibrationTable | None) -> None:
    """Calibration text in a build: TensorRT's calibrator only, INT8 only, never with a table."""
    if backend != "tensorrt":
        raise QuantkitError(
            f"calibration text (--dataset) is read by TensorRT's INT8 calibrator; {backend} "
            "builds take a table",
            "run 'quantkit calibrate' and pass --table OUT/table.json",
        )
    if table is not None:
        raise QuantkitError("give --table or calibration text (--dataset), not both",
                            "the table's scales would make TensorRT skip its calibration")
    if precision not in ("int8", "mixed") or not _uses_int8(recipe):
        raise QuantkitError(f"calibration text (--dataset) is for INT8 builds; this one is "
                            f"{precision} without INT8", "drop --dataset and its options")


def _uses_int8(recipe: PlanRecipe) -> bool:
    return recipe.default is Precision.INT8 or any(
        rule.precision is Precision.INT8 for rule in recipe.rules)
