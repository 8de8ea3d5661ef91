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
from pathlib import Path
from typing import TYPE_CHECKING, Any

from quantkit.artifacts import check_can_write
from quantkit.errors import QuantkitError
from quantkit.plan import PlanRecipe, PrecisionPlan, resolve_plan

if TYPE_CHECKING:
    from quantkit.backends.base import Engine
    from quantkit.calib.table import CalibrationTable

PRECISION_LABELS = ("fp32", "fp16", "int8", "mixed")


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
) -> Engine:
    """Build one engine into ``out`` from ``onnx`` (an export directory or .onnx file) or from
    ``model`` (exported first, into a temporary directory that is removed afterwards)."""
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
    calib_table = load_table(table)
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
        resolved = plan_for(onnx_path, precision, recipe)
        if isinstance(plan, (str, Path)):
            resolved = PrecisionPlan(resolved.default, resolved.decisions,
                                     {**resolved.source, "path": str(plan)})
        request = BuildRequest(onnx_path=onnx_path, precision=precision, plan=resolved,
                               table=calib_table, options=dict(options or {}))
        return engine_backend.build(request, Path(out), force=force)
    finally:
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
