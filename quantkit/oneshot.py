"""``quantkit quantize`` / ``quantkit.quantize()``: from a model to a verified mixed-precision
engine within a perplexity budget, in one call, with the defaults that measured best.

Steps (each resumable, see ``quantkit.steps``): export (with the fused NLL output) -> the
transform that suits the architecture (RMSNorm / Llama family: rotation; LayerNorm / GPT-2
family: SmoothQuant with alpha per group, applied in calibration) -> calibration (entropy ranges
plus histograms for the per-tensor method search, GPTQ weights) -> autotune within the budget
(tuned and verified on windows of the deployment length) -> FP32 and naive INT8 engines of the
same graph -> evaluation of FP32, naive INT8 and the quantized engine on text no earlier step
read -> report (``with_cache``: then the plan's KV-cache engine, ``quantkit.cache_quantize``).
One dataset is cut into disjoint calibration, tuning and evaluation parts (or each role names
its own); the evaluation refuses any overlap (``quantkit.text_roles``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from quantkit.errors import QuantkitError
from quantkit.quantize_config import (
    EXIT_BUDGET_MISSED,
    QUANTIZE_NAME,
    QUANTIZE_SCHEMA,
    QuantizeConfig,
    TextPart,
    default_parts,
    parse_duration,
)


@dataclass
class QuantizeResult:
    """What ``quantize`` made and measured (``OUT/quantize.json``)."""

    out: Path
    engine: Path  # the quantized engine
    plan: Path
    transform: dict[str, Any]
    coverage: float | None  # share of linear-layer MACs in INT8 (the engine's manifest)
    perplexity: dict[str, float]  # engine label -> perplexity on the evaluation part
    delta_pct: dict[str, float]  # engine label -> % vs FP32
    p50_ms: dict[str, float]  # engine label -> p50 latency at 1 x max_length
    budget: str
    met_budget: bool
    max_length: int  # the windows perplexity and latency were measured on
    parts: dict[str, Any]  # role -> the text it read
    steps: list[dict[str, Any]]
    seconds: float
    notes: list[str] = field(default_factory=list)
    # with_cache: the quantized KV-cache engine and its greedy agreement with FP32's
    # (quantkit.generation_check; its engine paths and the cache graph as strings)
    cache_engine: str | None = None
    generation: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("out", "engine", "plan"):
            data[key] = str(data[key])
        return {"schema": QUANTIZE_SCHEMA, **data}


def choose_transform(onnx_path: Path, wanted: str) -> dict[str, Any]:
    """Rotation where the graph allows it (RMSNorm residual stream), else SmoothQuant with alpha
    per group; the reason is recorded."""
    import onnx

    from quantkit.rotation import trace_residual

    if wanted in ("none", "smoothquant"):
        return {"name": wanted, "why": "asked for"}
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    try:
        trace_residual(graph)
    except QuantkitError as error:
        if wanted == "rotate":
            raise
        return {"name": "smoothquant", "why": f"rotation does not apply: {error.message}"}
    return {"name": "rotate", "why": "RMSNorm residual stream: rotation spreads activation "
                                     "outliers (measured on SmolLM2-135M, README)"}


def planned_steps(config: QuantizeConfig, transform: str) -> int:
    """How many steps ``quantize`` runs with ``transform``: export (from a model), rotation,
    calibration, the search, three reference builds, evaluation and report, and with a cache
    the cache steps (``quantkit.cache_quantize.cache_step_count``)."""
    count = 7 + (config.model is not None) + (transform == "rotate")
    if config.with_cache:
        from quantkit.cache_quantize import cache_step_count

        count += cache_step_count(config, transform)
    return count


def quantize(config: QuantizeConfig, out: Path, *, force: bool = False,
             say: Callable[[str], None] = print, command: str | None = None,
             progress: bool = False) -> QuantizeResult:
    """Run (or resume) every step into ``out``; return the result (also ``OUT/quantize.json``).
    ``progress``: a rich progress line per step on stderr (a terminal), else a heartbeat line
    through ``say`` every 10 s of a long step."""
    from quantkit.artifacts import atomic_write_json
    from quantkit.data import resolve_text_source
    from quantkit.export import find_onnx
    from quantkit.steps import Steps, artifact_hash
    from quantkit.text_roles import check_roles_disjoint, role_of_source

    config.check()
    if config.ray is not None:  # a missing Ray is one clear error before anything is written
        from quantkit.ray_tasks import import_ray

        import_ray()
    out = Path(out)
    sources = {role: resolve_text_source(p.dataset, p.dataset_config, p.split, p.text_column)
               for role, p in config.parts.items()}
    check_roles_disjoint([role_of_source(role, s) for role, s in sources.items()],
                         allow_with=None)
    started = time.perf_counter()
    # counted from the transform expected (rotation unless another was asked for); corrected,
    # with the reason printed, once the export shows which transform applies
    expected = "rotate" if config.transform in ("auto", "rotate") else config.transform
    steps = Steps(out, total=planned_steps(config, expected), say=say, force=force,
                  tty=progress)

    export_dir = out / "export"
    if config.model is not None:
        def make_export(replace_: bool) -> None:
            from quantkit.export import export_model
            from quantkit.models import load_model

            export_model(load_model(config.model, trust_remote_code=config.trust_remote_code),
                         export_dir, with_nll=True, force=replace_)

        steps.run("export", {"model": config.model}, export_dir, make_export)
    else:
        assert config.onnx is not None
        export_dir = find_onnx(Path(config.onnx)).parent
    transform = choose_transform(find_onnx(export_dir), config.transform)
    say(f"transform: {transform['name']} ({transform['why']})")
    steps.total = planned_steps(config, transform["name"])
    if config.with_cache:
        from quantkit.cache_quantize import export_cache_step

        cache_export = export_cache_step(config, steps, out, transform["name"])

    source_dir = export_dir
    if transform["name"] == "rotate":
        rotated = out / "rotated"

        def make_rotation(replace_: bool) -> None:
            from quantkit.rotation import rotate_export

            rotate_export(find_onnx(export_dir), rotated, seed=config.seed, force=replace_)

        steps.run("rotate", {"onnx": artifact_hash(export_dir), "seed": config.seed}, rotated,
                  make_rotation)
        source_dir = rotated

    calib_dir = out / "calibration"
    cal_part = config.parts["calibration"]
    smoothquant = "auto" if transform["name"] == "smoothquant" else None

    def make_calibration(replace_: bool) -> None:
        from quantkit.calib.run import CalibrationRequest, run_calibration

        run_calibration(CalibrationRequest(
            onnx=source_dir, dataset=cal_part.dataset, dataset_config=cal_part.dataset_config,
            split=cal_part.split, text_column=cal_part.text_column,
            num_samples=config.num_samples, seq_len=config.seq_len, seed=config.seed,
            method="entropy", tensors="quantizable", smoothquant=smoothquant,
            weights="gptq" if config.gptq else "rtn"), calib_dir, force=replace_)

    steps.run("calibrate", {"onnx": artifact_hash(source_dir), "part": asdict(cal_part),
                            "samples": config.num_samples, "seq_len": config.seq_len,
                            "seed": config.seed, "gptq": config.gptq,
                            "smoothquant": smoothquant}, calib_dir, make_calibration)
    graph_dir = calib_dir / "smoothed" if smoothquant else source_dir  # engines read this graph

    tune_dir = out / "autotune"
    tune_part = config.parts["tuning"]
    tune = _tune_settings(config, graph_dir, calib_dir / "table.json", tune_part, out)

    def make_autotune(replace_: bool) -> None:
        from quantkit.tune.autotune import autotune
        from quantkit.tune.budget import AutotuneSettings, Budget

        time_limit = None
        if config.time_budget is not None:
            time_limit = parse_duration(config.time_budget) - (time.perf_counter() - started)
            if time_limit <= 0:
                raise QuantkitError(
                    f"the time budget ({config.time_budget}) was spent before the search "
                    f"began ({time.perf_counter() - started:.0f} s so far)",
                    "rerun with a larger --time-budget: the finished steps are reused")
        settings = AutotuneSettings(
            budget=Budget.parse(config.max_ppl_increase), objective=config.objective,
            max_evals=config.max_evals, method_groups=config.method_groups,
            greedy_runs=config.greedy_runs, time_limit_s=time_limit,
            reserve_windows=_windows_after_search(config, tune_part, out))
        autotune(tune, settings, tune_dir, force=replace_, say=say, ray_address=config.ray,
                 max_retries=config.max_retries)

    steps.run("autotune", {"calibration": artifact_hash(calib_dir), "tune": tune.to_dict(),
                           "budget": config.max_ppl_increase, "objective": config.objective,
                           "max_evals": config.max_evals, "method_groups": config.method_groups,
                           "greedy_runs": config.greedy_runs,
                           "time_budget": config.time_budget}, tune_dir, make_autotune)

    fp16_options = fp16_build_options()
    references = {"fp32": ("fp32", None, {}), "fp16": ("fp16", None, fp16_options),
                  "int8-naive": ("int8", calib_dir / "table.json", {})}
    engines: dict[str, Path] = {}
    for label, (precision, table, options) in references.items():
        engines[label] = path = out / "engines" / label
        steps.run(f"build {label}", {"onnx": artifact_hash(graph_dir),
                                     "table": artifact_hash(calib_dir) if table else None,
                                     "options": options,
                                     "plan": FP16_KEEP_FP32 if precision == "fp16" else None},
                  path,
                  _builder(path, graph_dir, precision, table, options))
    engines["quantized"] = tune_dir / "engine"

    results = out / "results.json"
    eval_config = evaluation_config(config)

    def make_results(replace_: bool) -> None:
        from quantkit.eval.evaluate import evaluate_engines
        from quantkit.eval.results import write_results

        evaluated = evaluate_engines(list(engines.values()), eval_config, command=command,
                                     names=list(engines))
        write_results(evaluated, results, force=True)

    steps.run("evaluate", {"engines": [artifact_hash(p) for p in engines.values()],
                           "part": asdict(config.parts["evaluation"]),
                           "max_length": config.max_length, "tokens": config.eval_tokens,
                           "spread": eval_config.spread, "threads": config.threads,
                           "iterations": config.latency_iterations}, results, make_results)

    report_dir = out / "report"

    def make_report(replace_: bool) -> None:
        from quantkit.report import build_report

        build_report([results], report_dir, calibration=calib_dir, tuning=tune_dir,
                     force=replace_, command=command)

    steps.run("report", {"results": artifact_hash(results)}, report_dir, make_report)
    generation = None
    if config.with_cache:
        from quantkit.cache_quantize import cache_steps

        generation = cache_steps(config, steps, out, cache_export=cache_export,
                                 transform=transform["name"], source_dir=source_dir,
                                 graph_dir=graph_dir, tune_dir=tune_dir)
    result = _result(config, out, engines, results, tune_dir, transform, steps, started)
    if generation is not None:
        result.cache_engine, result.generation = generation["cache_engine"], generation
    atomic_write_json(out / QUANTIZE_NAME, result.to_dict())
    return result


def evaluation_config(config: QuantizeConfig) -> Any:
    """The evaluation step's settings: ``eval_tokens`` tokens of the evaluation part in windows
    of ``max_length`` spread evenly over it (all of it when ``eval_tokens`` is 0), latency at
    1 x ``max_length``."""
    from quantkit.eval.evaluate import EvalConfig
    from quantkit.eval.latency import GridPoint

    part = config.parts["evaluation"]
    return EvalConfig(
        dataset=part.dataset, dataset_config=part.dataset_config, split=part.split,
        text_column=part.text_column, max_length=config.max_length, stride=config.max_length,
        limit_tokens=config.eval_tokens or None, spread=bool(config.eval_tokens),
        latency_grid=(GridPoint(1, config.max_length),), warmup=2,
        iterations=config.latency_iterations, threads=config.threads)


def _tune_settings(config: QuantizeConfig, onnx_dir: Path, table: Path, part: TextPart,
                   out: Path) -> Any:
    from quantkit.tune.context import TuneSettings

    return TuneSettings(onnx=onnx_dir, table=table, dataset=part.dataset,
                        dataset_config=part.dataset_config, split=part.split,
                        text_column=part.text_column, max_length=config.max_length,
                        rank_windows=config.rank_windows, search_windows=config.search_windows,
                        holdout_windows=config.holdout_windows, batch_size=1,
                        seed=config.seed if config.tuning_seed is None else config.tuning_seed,
                        threads=config.threads, cache_dir=out / "tune-cache")


def _windows_after_search(config: QuantizeConfig, part: TextPart, out: Path) -> int:
    """Model runs of ``max_length`` tokens left after the search, for a time budget: the
    engine's verification, three builds (about 10 windows each, measured), the evaluation of
    four engines and the latency runs of three (FP16 on a CPU is accuracy-only)."""
    eval_windows = -(-(config.eval_tokens or 40 * config.max_length) // config.max_length)
    builds = 0 if (out / "engines" / "int8-naive").is_dir() else 30
    builds += 40 if config.with_cache else 0  # quantkit.cache_quantize: 2 builds, generation
    return (10 + config.holdout_windows + builds + 4 * eval_windows
            + 3 * (2 + config.latency_iterations))


# normalization modules: Llama's input_layernorm / post_attention_layernorm / norm, GPT-2's
# ln_1 / ln_2 / ln_f. Their x^2 overflows float16 on models with large activations (SmolLM2-135M:
# perplexity 56.6 all-FP16 against 38.5 FP32 on 2,048 tokens; 38.6 with these FP32), which is
# why float16 deployments keep them in float32 (TensorRT warns about FP16 normalization layers).
FP16_KEEP_FP32 = "re:(norm|/ln_[^/]*)/"


def fp16_recipe(onnx_path: Path) -> Any:
    """The FP16 reference plan: FP16 everywhere but the normalizations (FP32), or uniform FP16
    for a graph whose normalizations are not named so."""
    from quantkit.plan import PlanRecipe, PlanRule, Precision, resolve_plan

    recipe = PlanRecipe(default=Precision.FP16,
                        rules=(PlanRule(precision=Precision.FP32, node=FP16_KEEP_FP32),),
                        fallback=Precision.FP32, name="fp16-norms-fp32",
                        description="FP16, normalizations FP32")
    try:
        resolve_plan(recipe, onnx_path)
    except QuantkitError:
        return PlanRecipe.uniform("fp16")
    return recipe


def fp16_build_options() -> dict[str, Any]:
    """The FP16 reference: a real float16 engine where ONNX Runtime has CUDA, else FP16's
    accuracy emulated in float32 (an accuracy-only engine, no latency)."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        return {}
    return {"fp16": "emulate"}


def _builder(path: Path, onnx_dir: Path, precision: str, table: Path | None,
             options: dict[str, Any]) -> Callable[[bool], None]:
    def make(replace_: bool) -> None:
        from quantkit.build import build_engine
        from quantkit.export import find_onnx

        path.parent.mkdir(parents=True, exist_ok=True)
        plan = fp16_recipe(find_onnx(onnx_dir)) if precision == "fp16" else None
        build_engine(path, precision=precision, onnx=onnx_dir, table=table, force=replace_,
                     options=options, plan=plan)
    return make


def _result(config: QuantizeConfig, out: Path, engines: dict[str, Path], results: Path,
            tune_dir: Path, transform: dict[str, Any], steps: Any, started: float
            ) -> QuantizeResult:
    from quantkit.artifacts import read_json
    from quantkit.eval.results import load_results
    from quantkit.tune.budget import AUTOTUNE_NAME, PLAN_NAME, Budget

    evaluated = load_results(results)
    by_name = {e.name: e for e in evaluated.engines}
    labelled = {label: by_name[label] for label in engines}
    fp32 = labelled["fp32"].perplexity
    budget = Budget.parse(config.max_ppl_increase)
    quantized = labelled["quantized"]
    met = quantized.perplexity <= budget.limit(fp32)
    notes = []
    if not met:
        notes.append(f"the quantized engine misses the {budget} budget on the evaluation text "
                     f"({quantized.perplexity:.4f} vs FP32 {fp32:.4f}, allowed "
                     f"{budget.limit(fp32):.4f})")
    tuned = read_json(tune_dir / AUTOTUNE_NAME)
    notes += [n for n in tuned.get("notes", []) if "time limit" in n]
    if transform["name"] != "none":
        notes.append(f"FP32 and naive INT8 are engines of the {transform['name']} graph (the "
                     "same function as the export, checked when it was written)")
    return QuantizeResult(
        out=out, engine=engines["quantized"], plan=tune_dir / PLAN_NAME, transform=transform,
        coverage=quantized.int8_coverage,
        perplexity={k: e.perplexity for k, e in labelled.items()},
        delta_pct={k: 100.0 * (e.perplexity / fp32 - 1.0) for k, e in labelled.items()},
        p50_ms={k: e.latency[0].p50_ms for k, e in labelled.items() if e.latency},
        budget=str(budget), met_budget=met, max_length=config.max_length,
        parts={r["label"].split(":", 1)[0]: r for r in evaluated.dataset.get("roles") or []},
        steps=[s.to_dict() for s in steps.records],
        seconds=time.perf_counter() - started, notes=notes)


__all__ = ["EXIT_BUDGET_MISSED", "QuantizeConfig", "QuantizeResult", "TextPart",
           "choose_transform", "default_parts", "quantize"]
