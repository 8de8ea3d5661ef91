"""``quantkit run``: a whole recipe end to end (export -> [SmoothQuant] -> calibrate -> build each
engine -> eval -> report), resuming from the artifacts that already exist and still match.

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
    MANIFEST_NAME,
    atomic_write_json,
    read_json,
    sha256_file,
    sha256_json,
)
from quantkit.config import Recipe
from quantkit.errors import QuantkitError

STATE_NAME = "run-state.json"
RESULTS_NAME = "results.json"


@dataclass
class StepOutcome:
    name: str
    path: Path
    reused: bool
    seconds: float


@dataclass
class RunOutcome:
    workdir: Path
    steps: list[StepOutcome] = field(default_factory=list)

    @property
    def report_html(self) -> Path:
        return self.workdir / "report" / "report.html"

    @property
    def results(self) -> Path:
        return self.workdir / RESULTS_NAME


Say = Callable[[str], None]


class _State:
    """run-state.json: step name -> {key, artifact (manifest or file hash)}."""

    def __init__(self, workdir: Path) -> None:
        self.path = workdir / STATE_NAME
        self.steps: dict[str, dict[str, str]] = {}
        if self.path.is_file():
            data = read_json(self.path)
            self.steps = dict(data.get("steps", {}))

    def matches(self, step: str, key: str, artifact: Path) -> bool:
        entry = self.steps.get(step)
        return bool(entry) and entry.get("key") == key and artifact.exists() \
            and entry.get("artifact") == _artifact_hash(artifact)

    def owns(self, step: str) -> bool:
        return step in self.steps

    def record(self, step: str, key: str, artifact: Path) -> None:
        self.steps[step] = {"key": key, "artifact": _artifact_hash(artifact)}
        atomic_write_json(self.path, {"schema": "quantkit.run-state/1", "steps": self.steps})


def _artifact_hash(path: Path) -> str:
    """A directory artifact is identified by its manifest, a file by its content."""
    if path.is_dir():
        manifest = path / MANIFEST_NAME
        return sha256_file(manifest) if manifest.is_file() else ""
    return sha256_file(path) if path.is_file() else ""


def _plan_digest(plan: str | None) -> str | None:
    if plan is None:
        return None
    path = Path(plan)
    if not path.is_file():
        raise QuantkitError(f"plan recipe {path} not found")
    return sha256_file(path)


def run_recipe(recipe: Recipe, *, workdir: Path | None = None, force: bool = False,
               say: Say = print, progress: bool = False,
               command: str | None = None) -> RunOutcome:
    """Run (or resume) ``recipe``; return where everything is and which steps were reused.

    ``command`` is the command line to record in the results and the report.
    """
    command = command or f"quantkit run (recipe '{recipe.name}')"
    work = Path(workdir or recipe.workdir)
    work.mkdir(parents=True, exist_ok=True)
    state = _State(work)
    outcome = RunOutcome(work)

    def step(name: str, key_parts: Any, artifact: Path, make: Callable[[bool], None]) -> None:
        key = sha256_json(key_parts)
        start = time.perf_counter()
        if state.matches(name, key, artifact):
            outcome.steps.append(StepOutcome(name, artifact, True, 0.0))
            say(f"{name}: reused {artifact}")
            return
        replace = artifact.exists()
        if replace and not (force or state.owns(name)):
            raise QuantkitError(f"{artifact} exists but was not made by this recipe's run",
                                "pass --force to replace it, or use another workdir")
        say(f"{name}: running ...")
        make(replace)
        state.record(name, key, artifact)
        seconds = time.perf_counter() - start
        outcome.steps.append(StepOutcome(name, artifact, False, seconds))
        say(f"{name}: done in {seconds:.0f} s -> {artifact}")

    # 1. export ---------------------------------------------------------------------------
    export_dir = work / "export"

    def make_export(replace: bool) -> None:
        from quantkit.export import export_model
        from quantkit.models import load_model

        loaded = load_model(recipe.model, trust_remote_code=recipe.trust_remote_code)
        export_model(loaded, export_dir, opset=recipe.export.opset,
                     with_nll=recipe.export.with_nll, force=replace)

    step("export", {"model": recipe.model, "trust_remote_code": recipe.trust_remote_code,
                    "export": asdict(recipe.export)}, export_dir, make_export)
    onnx_dir = export_dir
    cal = recipe.calibration

    # 2. SmoothQuant (optional): a smoothed export, recalibrated below --------------------------
    if cal.smoothquant is not None:
        smooth_dir = work / "smoothed"

        def make_smooth(replace: bool) -> None:
            from quantkit.data import TokenBlocks, resolve_text_source
            from quantkit.models import load_tokenizer
            from quantkit.smoothquant import smooth_export

            blocks = TokenBlocks(
                resolve_text_source(cal.dataset, cal.dataset_config, cal.split, cal.text_column),
                load_tokenizer(export_dir / "tokenizer"), seq_len=cal.seq_len,
                num_samples=cal.num_samples, batch_size=cal.batch_size, seed=cal.seed)
            smooth_export(export_dir / "model.onnx", blocks, smooth_dir, alpha=cal.smoothquant,
                          data_description=blocks.describe(), force=replace)

        step("smoothquant", {"export": _artifact_hash(export_dir), "alpha": cal.smoothquant,
                             "data": _calibration_data_key(recipe)}, smooth_dir, make_smooth)
        onnx_dir = smooth_dir

    # 3. calibration -----------------------------------------------------------------------
    calib_dir = work / "calibration"

    def make_calibration(replace: bool) -> None:
        from quantkit.calib.run import CalibrationRequest, run_calibration

        request = CalibrationRequest(
            onnx=onnx_dir, dataset=cal.dataset, dataset_config=cal.dataset_config,
            split=cal.split, text_column=cal.text_column, num_samples=cal.num_samples,
            seq_len=cal.seq_len, batch_size=cal.batch_size, seed=cal.seed, method=cal.method,
            params=dict(cal.params), tensors=cal.tensors)
        run_calibration(request, calib_dir, force=replace)

    needs_table = any(e.precision in ("int8", "mixed") for e in recipe.engines)
    if needs_table:
        step("calibrate", {"onnx": _artifact_hash(onnx_dir), "calibration": asdict(cal)},
             calib_dir, make_calibration)
    table = calib_dir / "table.json" if needs_table else None

    # 4. engines ---------------------------------------------------------------------------
    engine_dirs: list[Path] = []
    for engine in recipe.engines:
        engine_dir = work / "engines" / engine.name
        engine_dirs.append(engine_dir)
        uses_table = engine.precision in ("int8", "mixed")

        def make_engine(replace: bool, engine: Any = engine, engine_dir: Path = engine_dir,
                        uses_table: bool = uses_table) -> None:
            from quantkit.build import build_engine

            engine_dir.parent.mkdir(parents=True, exist_ok=True)
            build_engine(engine_dir, precision=engine.precision, onnx=onnx_dir,
                         table=table if uses_table else None,
                         plan=Path(engine.plan) if engine.plan else None,
                         backend=engine.backend, options=dict(engine.options), force=replace)

        step(f"build {engine.name}", {
            "onnx": _artifact_hash(onnx_dir),
            "table": _artifact_hash(calib_dir) if uses_table else None,
            "engine": asdict(engine), "plan": _plan_digest(engine.plan),
        }, engine_dir, make_engine)

    # 5. evaluation ------------------------------------------------------------------------
    results = work / RESULTS_NAME

    def make_results(replace: bool) -> None:
        from quantkit.eval.evaluate import EvalConfig, evaluate_engines
        from quantkit.eval.results import write_results

        config = EvalConfig.from_recipe(recipe.evaluation)
        evaluated = evaluate_engines(engine_dirs, config, command=command,
                                     progress=progress)
        write_results(evaluated, results, force=True)

    if engine_dirs:
        step("eval", {"engines": [_artifact_hash(d) for d in engine_dirs],
                      "names": [e.name for e in recipe.engines],
                      "evaluation": asdict(recipe.evaluation)}, results, make_results)

        # 6. report ------------------------------------------------------------------------
        report_dir = work / "report"

        def make_report(replace: bool) -> None:
            from quantkit.report import build_report

            build_report([results], report_dir,
                         calibration=calib_dir if needs_table else None,
                         force=replace, command=command)

        step("report", {"results": _artifact_hash(results),
                        "calibration": _artifact_hash(calib_dir) if needs_table else None},
             report_dir, make_report)
    return outcome


def _calibration_data_key(recipe: Recipe) -> dict[str, Any]:
    cal = recipe.calibration
    return {k: getattr(cal, k) for k in ("dataset", "dataset_config", "split", "text_column",
                                         "num_samples", "seq_len", "batch_size", "seed")}
