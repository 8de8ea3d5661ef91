"""``quantkit sweep``: several recipes, one unit of work each, locally or as Ray tasks, gathered
into one results file and one report.

A recipe file with a ``sweep:`` section stands for the cross product of its axes
(``quantkit.recipe_sweep``): each combination is one recipe of the sweep, named by its axis
values, and the axis values are columns of the gathered results (``engines[i].axes``,
``sweep.axes``) and of the report's sweep table.

Each recipe runs through ``quantkit.pipeline.run_recipe`` into ``OUT/<recipe name>`` (so a rerun
reuses every finished step of every recipe). Without Ray the recipes run one after another in
this process; with Ray each is a plain ``ray.remote`` task (``max_retries`` covers a worker or
node that dies; a recipe that raises is not retried: the same inputs would fail the same way),
asking for a GPU where the recipe builds GPU engines (``gpus_needed``).
The driver gathers in recipe order, never in completion order, so the outputs are the same
whichever way the recipes ran:

* ``OUT/results.json`` (``quantkit.results/1``): every finished recipe's engines, each named
  ``<recipe>/<engine>``, with the recipe's own Δ against its own references; additive keys:
  ``engines[i].recipe`` and ``sweep`` (one entry per recipe: status, error, its results file);
* ``OUT/report/``: ``quantkit report`` over the recipes' own ``results.json`` files;
* ``OUT/sweep.json``: the recipes, their axis values, their status and why a failed one
  failed.

A failed recipe does not stop the others; the sweep says which failed and why.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from quantkit.artifacts import atomic_write_json, make_dirs, read_json
from quantkit.config import Recipe
from quantkit.errors import QuantkitError
from quantkit.ray_tasks import DEFAULT_MAX_RETRIES, import_ray, ray_session
from quantkit.recipe_sweep import SweepPoint, axis_paths, load_points

SWEEP_SCHEMA = "quantkit.sweep/1"
SWEEP_STATE = "sweep.json"
RESULTS_NAME = "results.json"
REPORT_DIR = "report"

Say = Callable[[str], None]


@dataclass(frozen=True)
class RecipeOutcome:
    """What one recipe's unit of work came back with (plain data: it crosses Ray's wire)."""

    name: str
    workdir: str
    ok: bool
    error: str | None = None  # "<ExceptionType>: message" of a failed recipe
    steps: int = 0
    reused: int = 0
    results: str | None = None  # the recipe's results.json, where it wrote one

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "status": "ok" if self.ok else "failed",
                "error": self.error, "workdir": self.workdir, "steps": self.steps,
                "reused": self.reused, "results": self.results}


@dataclass
class SweepOutcome:
    out: Path
    recipes: list[RecipeOutcome] = field(default_factory=list)
    results: Path | None = None  # OUT/results.json, where at least one recipe has results
    report: Path | None = None  # OUT/report/report.html
    gather_error: str | None = None  # why the combined results or report could not be made

    @property
    def failed(self) -> list[RecipeOutcome]:
        return [r for r in self.recipes if not r.ok]

    @property
    def ok(self) -> bool:
        return not self.failed and self.gather_error is None


def load_sweep(paths: Sequence[Path]) -> list[SweepPoint]:
    """Load and validate every recipe (each combination of a ``sweep:`` section) before any
    work; names must be unique because each names its workdir (``OUT/<name>``) and prefixes its
    engines."""
    if not paths:
        raise QuantkitError("no recipes given", "pass at least one recipe file")
    points = [point for p in paths for point in load_points(Path(p))]
    seen: dict[str, Path] = {}
    for point in points:
        recipe, path = point.recipe, point.source
        if recipe.name in seen:
            raise QuantkitError(
                f"recipes {seen[recipe.name]} and {path} have the same name '{recipe.name}'",
                "each recipe's name is its folder under OUT: give every recipe its own name")
        if "/" in recipe.name or recipe.name in ("", ".", "..", REPORT_DIR) \
                or recipe.name.endswith(".json"):
            raise QuantkitError(f"recipe {path}: name '{recipe.name}' cannot be a folder of a "
                                "sweep", f"avoid '/', '{REPORT_DIR}' and names ending in .json")
        seen[recipe.name] = path
    return points


def load_recipes(paths: Sequence[Path]) -> list[Recipe]:
    """The recipes of ``load_sweep``."""
    return [point.recipe for point in load_sweep(paths)]


def run_one(recipe_data: dict[str, Any], workdir: str, force: bool,
            command: str) -> RecipeOutcome:
    """One recipe, run or resumed in ``workdir``: the unit of work, locally and on Ray.

    Any exception becomes a failed outcome (with its type and message) so that one recipe's
    failure cannot lose the others' results; KeyboardInterrupt still stops the sweep.
    """
    from quantkit.pipeline import run_recipe
    from quantkit.ray_tasks import die_once_if_asked

    die_once_if_asked()
    name = str(recipe_data.get("name"))
    try:
        recipe = Recipe.from_dict(recipe_data, where=f"recipe '{name}'")
        outcome = run_recipe(recipe, workdir=Path(workdir), force=force,
                             say=lambda line: print(f"[{name}] {line}", flush=True),
                             command=command)
    except Exception as exc:  # reported per recipe, the sweep goes on
        error = str(exc) if isinstance(exc, QuantkitError) else \
            traceback.format_exception_only(type(exc), exc)[-1].strip()
        return RecipeOutcome(name, workdir, False, error=error)
    results = outcome.results if outcome.results.is_file() else None
    return RecipeOutcome(name, workdir, True, steps=len(outcome.steps),
                         reused=sum(s.reused for s in outcome.steps),
                         results=str(results) if results else None)


def gpus_needed(recipe: Recipe) -> int:
    """GPUs a recipe's task asks Ray for: one where an engine is built for TensorRT or for ONNX
    Runtime's CUDA provider (so the task lands on a GPU worker), none otherwise."""
    gpu = any(e.backend == "tensorrt" or e.options.get("provider") == "CUDAExecutionProvider"
              for e in recipe.engines)
    return 1 if gpu else 0


def _run_on_ray(ray: Any, work: list[tuple[dict[str, Any], str]], force: bool, command: str,
                max_retries: int, gpus: list[int]) -> list[RecipeOutcome]:
    """Each recipe as a Ray task (``gpus``: each one's GPUs); results taken in recipe order
    (``ray.get`` per reference)."""
    from quantkit.ray_tasks import hook_env

    task = ray.remote(max_retries=max_retries, **hook_env())(run_one)
    refs = [task.options(num_gpus=n).remote(data, workdir, force, command)
            for (data, workdir), n in zip(work, gpus, strict=True)]
    outcomes = []
    for (data, workdir), ref in zip(work, refs, strict=True):
        try:
            outcomes.append(ray.get(ref))
        except ray.exceptions.RayError as exc:  # the task's worker or node died, retries spent
            outcomes.append(RecipeOutcome(str(data["name"]), workdir, False,
                                          error=f"{type(exc).__name__}: {exc}"))
    return outcomes


def run_sweep(recipe_paths: Sequence[Path], out: Path, *, ray_address: str | None = None,
              force: bool = False, say: Say = print, command: str | None = None,
              max_retries: int = DEFAULT_MAX_RETRIES,
              ray_init: dict[str, Any] | None = None) -> SweepOutcome:
    """Run (or resume) every recipe into ``out/<name>``, then gather results and report.

    ``ray_address``: None runs the recipes here, one after another; otherwise ``ray.init``'s
    address as Ray defines it ("auto": the running cluster; "local": start one here;
    "ray://host:10001"). ``ray_init``: extra ``ray.init`` arguments (tests start a one-CPU
    local Ray with ``address="local"``).
    """
    points = load_sweep(recipe_paths)
    ray = import_ray() if ray_address is not None else None
    if Path(out).exists() and any(Path(out).iterdir()) and \
            not (Path(out) / SWEEP_STATE).is_file() and not force:
        raise QuantkitError(f"{out} exists and is not a sweep's folder",
                            "pass --force to use it anyway, or another --out")
    with ray_session(ray, str(ray_address), ray_init) if ray is not None else nullcontext():
        return _sweep(points, recipe_paths, Path(out).resolve(), ray, ray_address, force, say,
                      command, max_retries)


def _sweep(points: list[SweepPoint], recipe_paths: Sequence[Path], out: Path, ray: Any,
           ray_address: str | None, force: bool, say: Say, command: str | None,
           max_retries: int) -> SweepOutcome:
    """run_sweep once Ray (where asked for) is connected."""
    make_dirs(out)
    command = command or "quantkit sweep " + " ".join(str(p) for p in recipe_paths)
    recipes = [p.recipe for p in points]
    work = [(r.to_dict(), str(out / r.name)) for r in recipes]
    say(f"{len(recipes)} recipes -> {out}" + (f" (Ray, address {ray_address})" if ray else ""))
    if ray is None:
        outcomes = []
        for data, workdir in work:
            say(f"{data['name']}: running ...")
            outcomes.append(run_one(data, workdir, force, command))
    else:
        outcomes = _run_on_ray(ray, work, force, command, max_retries,
                               [gpus_needed(r) for r in recipes])
    sweep = SweepOutcome(out, outcomes)
    for o in outcomes:
        say(f"{o.name}: " + (f"done ({o.steps} steps, {o.reused} reused)" if o.ok
                             else f"FAILED: {o.error}"))
    _gather(sweep, points, command, say)
    return sweep


def _gather(sweep: SweepOutcome, points: Sequence[SweepPoint], command: str, say: Say) -> None:
    """Write OUT/results.json and OUT/report/ from the finished recipes, then OUT/sweep.json."""
    out = sweep.out
    axes = axis_paths(points)
    values = {p.recipe.name: p.axes for p in points}
    finished = [o for o in sweep.recipes if o.ok and o.results]
    combined = out / RESULTS_NAME
    report_dir = out / REPORT_DIR
    # what an earlier sweep wrote would now describe other recipes: never leave it behind
    for stale in (combined, report_dir):
        if stale.is_file():
            stale.unlink()
        elif stale.is_dir():
            import shutil

            shutil.rmtree(stale)
    if finished:
        try:
            write_combined_results(finished, sweep.recipes, combined, command,
                                   axes=axes, values=values)
            sweep.results = combined
            from quantkit.report import build_report

            table = {"axes": axes, "sources": [{"recipe": o.name, "axes": values[o.name]}
                                               for o in finished]}
            report = build_report([Path(str(o.results)) for o in finished], report_dir,
                                  force=True, command=command, sweep=table)
            sweep.report = report.html
        except QuantkitError as exc:
            sweep.gather_error = str(exc)
            say(f"gather: FAILED: {exc}")
    atomic_write_json(out / SWEEP_STATE, {
        "schema": SWEEP_SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "axes": axes,
        "recipes": [{**o.to_dict(), "recipe": str(p.source), "axes": p.axes}
                    for o, p in zip(sweep.recipes, points, strict=True)],
        "results": RESULTS_NAME if sweep.results else None,
        "report": f"{REPORT_DIR}/report.html" if sweep.report else None,
        "gather_error": sweep.gather_error,
    })


def write_combined_results(finished: Sequence[RecipeOutcome], every: Sequence[RecipeOutcome],
                           path: Path, command: str, axes: Sequence[str] = (),
                           values: Mapping[str, Mapping[str, Any]] | None = None) -> Path:
    """One ``quantkit.results/1`` file with every finished recipe's engines as
    ``<recipe>/<engine>``; refused (QuantkitError) when the recipes scored different text or
    windows, as ``quantkit report`` refuses to merge them. ``axes``: the sweep's axis paths;
    ``values``: recipe name -> its axis values (each engine's ``axes``, where there are axes)."""
    values = values or {}
    from quantkit.eval.results import _parse_results
    from quantkit.report.inputs import check_comparable, read_results

    files = [read_results(Path(str(o.results))) for o in finished]
    check_comparable(files)
    first = files[0].data
    engines: list[dict[str, Any]] = []
    commands: list[str] = []
    for outcome, f in zip(finished, files, strict=True):
        commands += [c for c in f.commands if c not in commands]
        for engine in f.engines:
            engines.append({**engine, "name": f"{outcome.name}/{engine['name']}",
                            "recipe": outcome.name,
                            **({"axes": dict(values.get(outcome.name, {}))} if axes else {})})
    first_name = finished[0].name
    data = {
        "schema": first["schema"],
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commands": [command, *commands],
        "environment": first["environment"],
        "dataset": first["dataset"],
        "settings": first["settings"],
        # each engine keeps its Δ against its own recipe's references; these are the first's
        "reference": {p: (f"{first_name}/{n}" if n else None)
                      for p, n in first["reference"].items()},
        "engines": engines,
        "sweep": {"axes": list(axes), "recipes": [
            {**o.to_dict(), "results": _relative(o.results, path.parent),
             "axes": dict(values.get(o.name, {})),
             "dataset": _dataset_of(o, files, finished)} for o in every]},
    }
    _parse_results(data)  # never write a file the reader rejects
    atomic_write_json(path, data)
    return path


def _relative(value: str | None, root: Path) -> str | None:
    if value is None:
        return None
    try:
        return str(Path(value).relative_to(root))
    except ValueError:
        return value


def _dataset_of(outcome: RecipeOutcome, files: Sequence[Any],
                finished: Sequence[RecipeOutcome]) -> dict[str, Any] | None:
    """The evaluated tokens of one recipe (they differ between tokenizers)."""
    for o, f in zip(finished, files, strict=True):
        if o.name == outcome.name:
            return {k: f.dataset.get(k) for k in ("tokenizer_sha256", "tokens_sha256",
                                                  "num_tokens", "num_scored_tokens")}
    return None


def read_sweep(out: Path) -> dict[str, Any]:
    """OUT/sweep.json as written by ``run_sweep``."""
    return dict(read_json(Path(out) / SWEEP_STATE))
