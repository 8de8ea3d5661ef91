"""``quantkit run``: a whole recipe end to end (export -> calibrate [with SmoothQuant] -> build
each engine -> eval -> report), resuming from the artifacts that already exist and still match.

Each step has a key: the hash of its own settings and of the artifacts it reads. ``run-state.json``
in the work directory records, per step, the key it was made with and the manifest hash of what it
wrote. A step is reused only when both still match, so a changed setting (or an artifact edited
or replaced by hand) reruns that step and everything after it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from quantkit.artifacts import (
    make_dirs,
    sha256_file,
    sha256_json,
)
from quantkit.config import Recipe
from quantkit.errors import QuantkitError
from quantkit.progress import StepProgress
from quantkit.steps import StepState, artifact_hash

STATE_NAME = "run-state.json"
RESULTS_NAME = "results.json"


@dataclass
class StepOutcome:
    name: str
    path: Path
    reused: bool
    seconds: float
    skipped: str | None = None  # why an optional step was not done


@dataclass
class RunOutcome:
    workdir: Path
    steps: list[StepOutcome] = field(default_factory=list)
    quantized: Any = None  # the QuantizeResult of a 'quantize' recipe

    @property
    def report_html(self) -> Path:
        return self.workdir / "report" / "report.html"

    @property
    def results(self) -> Path:
        return self.workdir / RESULTS_NAME


Say = Callable[[str], None]


def _environment_key() -> dict[str, Any]:
    """What an optional step's "cannot be done here" verdict depends on besides its settings:
    the installed libraries (an ONNX Runtime with CUDA, TensorRT) and the machine."""
    from quantkit.environment import cpu_model, library_versions

    return {"libraries": library_versions(), "cpu": cpu_model()}


def _plan_digest(plan: str | None) -> str | None:
    if plan is None:
        return None
    path = Path(plan)
    if not path.is_file():
        raise QuantkitError(f"plan recipe {path} not found")
    return sha256_file(path)


def check_recipe_texts(recipe: Recipe) -> None:
    """Refuse, before any work, a recipe whose evaluation text shares records with its
    calibration text (unless ``evaluation.allow_overlap``)."""
    from quantkit.data import resolve_text_source
    from quantkit.text_roles import check_roles_disjoint, role_of_source

    roles = [role_of_source(role, resolve_text_source(cfg.dataset, cfg.dataset_config, cfg.split,
                                                      cfg.text_column))
             for role, cfg in (("calibration", recipe.calibration),
                               ("evaluation", recipe.evaluation))]
    check_roles_disjoint(roles, recipe.evaluation.allow_overlap,
                         allow_with="'allow_overlap: true' in the recipe's evaluation section")


def run_quantize_recipe(recipe: Recipe, *, workdir: Path | None, force: bool, say: Say,
                        progress: bool, command: str) -> RunOutcome:
    """A recipe with a ``quantize:`` section: ``quantkit quantize`` into the workdir."""
    from quantkit.oneshot import quantize
    from quantkit.quantize_config import QuantizeConfig

    config = QuantizeConfig.from_recipe(recipe.model, recipe.quantize,
                                        recipe.trust_remote_code)
    work = Path(workdir or recipe.workdir)
    result = quantize(config, work, force=force, say=say, command=command, progress=progress)
    outcome = RunOutcome(work, quantized=result)
    outcome.steps = [StepOutcome(s["name"], Path(s["path"]), bool(s["reused"]),
                                 float(s["seconds"])) for s in result.steps]
    return outcome


def run_recipe(recipe: Recipe, *, workdir: Path | None = None, force: bool = False,
               say: Say = print, progress: bool = False, heartbeat: float = 10.0,
               command: str | None = None) -> RunOutcome:
    """Run (or resume) ``recipe``; return where everything is and which steps were reused.

    ``progress``: draw rich progress on stderr (a terminal); otherwise long steps report
    through ``say``: each phase, and a line every ``heartbeat`` seconds (0: every batch).
    ``command`` is the command line to record in the results and the report.
    An optional step that could not be done here is remembered with its reason (keyed by its
    settings and the installed libraries), so a rerun does not check it again.
    """

    command = command or f"quantkit run (recipe '{recipe.name}')"
    if recipe.quantize is not None:
        return run_quantize_recipe(recipe, workdir=workdir, force=force, say=say,
                                   progress=progress, command=command)
    check_recipe_texts(recipe)
    work = Path(workdir or recipe.workdir)
    make_dirs(work)  # an unwritable workdir: one clear error before any step runs
    state = StepState(work / STATE_NAME, "quantkit.run-state/1")
    outcome = RunOutcome(work)

    def step(name: str, key_parts: Any, artifact: Path,
             make: Callable[[bool, StepProgress], None], optional: bool = False) -> bool:
        """Run or reuse one step; False when an optional step could not be done here."""
        key = sha256_json(key_parts)
        start = time.perf_counter()
        if state.matches(name, key, artifact):
            outcome.steps.append(StepOutcome(name, artifact, True, 0.0))
            say(f"{name}: reused {artifact}")
            return True
        skip_key = sha256_json({"step": key, "environment": _environment_key()}) \
            if optional else ""
        earlier = state.skipped(name, skip_key) if optional else None
        if earlier is not None and not artifact.exists():
            outcome.steps.append(StepOutcome(name, artifact, True, 0.0, skipped=earlier))
            say(f"{name}: skipped (optional; same settings and libraries as the run that "
                f"found it cannot be built here, reason in {state.path.name})")
            return False
        replace = artifact.exists()
        if replace and not (force or state.owns(name)):
            raise QuantkitError(f"{artifact} exists but was not made by this recipe's run",
                                "pass --force to replace it, or use another workdir")
        say(f"{name}: running ...")
        try:
            with StepProgress(name, say, tty=progress, every=heartbeat) as reporter:
                make(replace, reporter)
        except QuantkitError as exc:
            if not optional:
                raise
            state.record_skip(name, skip_key, str(exc))
            outcome.steps.append(StepOutcome(name, artifact, False, 0.0, skipped=str(exc)))
            say(f"{name}: skipped (optional): {exc}")
            return False
        state.record(name, key, artifact)
        seconds = time.perf_counter() - start
        outcome.steps.append(StepOutcome(name, artifact, False, seconds))
        say(f"{name}: done in {seconds:.0f} s -> {artifact}")
        return True

    # 1. export ---------------------------------------------------------------------------
    export_dir = work / "export"

    def make_export(replace: bool, reporter: StepProgress) -> None:
        from quantkit.export import export_model
        from quantkit.models import load_model

        reporter.phase(f"loading {recipe.model}")
        loaded = load_model(recipe.model, trust_remote_code=recipe.trust_remote_code)
        export_model(loaded, export_dir, opset=recipe.export.opset,
                     with_nll=recipe.export.with_nll, force=replace, on_phase=reporter.phase)

    step("export", {"model": recipe.model, "trust_remote_code": recipe.trust_remote_code,
                    "export": {"opset": recipe.export.opset,
                               "with_nll": recipe.export.with_nll}}, export_dir, make_export)
    if recipe.export.rotate:  # every later step reads the rotated export
        rotated_dir = work / "rotated"

        def make_rotation(replace: bool, reporter: StepProgress,
                          source: Path = export_dir) -> None:
            from quantkit.export import find_onnx
            from quantkit.rotation import rotate_export

            rotate_export(find_onnx(source), rotated_dir,
                          down_block=recipe.export.down_block, force=replace)

        step("rotate", {"onnx": artifact_hash(export_dir),
                        "down_block": recipe.export.down_block}, rotated_dir, make_rotation)
        export_dir = rotated_dir
    cal = recipe.calibration
    calib_dir = work / "calibration"
    # SmoothQuant rewrites the export inside the calibration step (calibration/smoothed/); every
    # engine is then built from that graph, so they all share one source model
    onnx_dir = calib_dir / "smoothed" if cal.smoothquant is not None else export_dir

    # 2. calibration (with SmoothQuant when the recipe asks) ------------------------------------
    def make_calibration(replace: bool, reporter: StepProgress) -> None:
        from quantkit.calib.run import CalibrationRequest, run_calibration

        request = CalibrationRequest(
            onnx=export_dir, smoothquant=cal.smoothquant, dataset=cal.dataset,
            dataset_config=cal.dataset_config,
            split=cal.split, text_column=cal.text_column, num_samples=cal.num_samples,
            seq_len=cal.seq_len, batch_size=cal.batch_size, seed=cal.seed, method=cal.method,
            params=dict(cal.params), tensors=cal.tensors, weights=cal.weights,
            gptq_samples=cal.gptq_samples)
        def on_blocks(blocks: Any) -> None:
            reporter.phase("collecting activation statistics")
            reporter.total(len(blocks), "batches")

        reporter.phase("reading the text and choosing token blocks")
        run_calibration(request, calib_dir, force=replace, progress=reporter.advance,
                        on_blocks=on_blocks)

    needs_table = cal.smoothquant is not None or any(
        e.precision in ("int8", "mixed") for e in recipe.engines)
    if needs_table:
        step("calibrate", {"onnx": artifact_hash(export_dir), "calibration": asdict(cal)},
             calib_dir, make_calibration)
    table = calib_dir / "table.json" if needs_table else None

    # 3. engines ---------------------------------------------------------------------------
    engine_dirs: list[Path] = []
    built_names: list[str] = []
    for engine in recipe.engines:
        engine_dir = work / "engines" / engine.name
        uses_table = engine.precision in ("int8", "mixed")

        def make_engine(replace: bool, reporter: StepProgress, engine: Any = engine,
                        engine_dir: Path = engine_dir, uses_table: bool = uses_table) -> None:
            from quantkit.build import build_engine

            make_dirs(engine_dir.parent)
            build_engine(engine_dir, precision=engine.precision, onnx=onnx_dir,
                         table=table if uses_table else None,
                         plan=Path(engine.plan) if engine.plan else None,
                         backend=engine.backend, options=dict(engine.options), force=replace)

        if step(f"build {engine.name}", {
            "onnx": artifact_hash(onnx_dir),
            "table": artifact_hash(calib_dir) if uses_table else None,
            "engine": asdict(engine), "plan": _plan_digest(engine.plan),
        }, engine_dir, make_engine, optional=engine.optional):
            engine_dirs.append(engine_dir)
            built_names.append(engine.name)

    # 4. evaluation ------------------------------------------------------------------------
    results = work / RESULTS_NAME

    def make_results(replace: bool, reporter: StepProgress) -> None:
        from quantkit.eval.evaluate import EvalConfig, evaluate_engines
        from quantkit.eval.results import write_results

        config = EvalConfig.from_recipe(recipe.evaluation)
        evaluated = evaluate_engines(engine_dirs, config, command=command,
                                     progress=progress)
        write_results(evaluated, results, force=True)

    if engine_dirs:
        step("eval", {"engines": [artifact_hash(d) for d in engine_dirs],
                      "names": built_names,
                      "evaluation": asdict(recipe.evaluation)}, results, make_results)

        # 5. report ------------------------------------------------------------------------
        report_dir = work / "report"

        def make_report(replace: bool, reporter: StepProgress) -> None:
            from quantkit.report import build_report

            build_report([results], report_dir,
                         calibration=calib_dir if needs_table else None,
                         force=replace, command=command)

        step("report", {"results": artifact_hash(results),
                        "calibration": artifact_hash(calib_dir) if needs_table else None},
             report_dir, make_report)
    return outcome
