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
from quantkit.generation_check import DEFAULT_NEW_TOKENS, DEFAULT_PROMPTS
from quantkit.ray_tasks import DEFAULT_MAX_RETRIES
from quantkit.text_roles import ROLES

QUANTIZE_NAME = "quantize.json"
QUANTIZE_SCHEMA = "quantkit.quantize/1"
# one local file or folder is cut by record into these parts (percent)
LOCAL_PARTS = {"calibration": (0, 40), "tuning": (40, 50), "evaluation": (50, 100)}
# the bundled sample has two files: calibration and tuning share calibration.txt
SAMPLE_SPLITS = {"calibration": "train[:70%]", "tuning": "train[70%:]", "evaluation": "test"}
HUB_SPLITS = {"calibration": "train", "tuning": "validation", "evaluation": "test"}
EXIT_BUDGET_MISSED = 3
MIN_TIME_BUDGET_S = 180


def parse_duration(text: str) -> float:
    """'15m', '900s', '1h', '90' (seconds) -> seconds."""
    import re

    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*(s|m|min|h)?\s*", str(text))
    if match is None:
        raise QuantkitError(f"cannot read the time budget '{text}'",
                            "write e.g. 15m, 900s or 1h")
    unit = {"s": 1, None: 1, "m": 60, "min": 60, "h": 3600}[match.group(2)]
    return float(match.group(1)) * unit


@dataclass(frozen=True)
class TextPart:
    """Where one role's text comes from."""

    dataset: str
    split: str
    dataset_config: str | None = None
    text_column: str = "text"


def default_parts(dataset: str, dataset_config: str | None = None, text_column: str = "text",
                  overrides: dict[str, TextPart] | None = None) -> dict[str, TextPart]:
    """Disjoint calibration / tuning / evaluation parts of one dataset: record slices of a local
    file or folder, the sample's files, or a Hub dataset's train / validation / test splits."""
    from quantkit.data import resolve_text_source

    parts: dict[str, TextPart] = {}
    for role in ROLES:
        if dataset == "sample":
            split = SAMPLE_SPLITS[role]
        elif resolve_text_source(dataset, dataset_config).kind == "local":
            lo, hi = LOCAL_PARTS[role]
            split = f"{role}[{f'{lo}%' if lo else ''}:{f'{hi}%' if hi < 100 else ''}]"
        else:
            split = HUB_SPLITS[role]
        parts[role] = TextPart(dataset, split, dataset_config, text_column)
    parts.update(overrides or {})
    return parts


def parts_for(dataset: str, dataset_config: str | None = None, text_column: str = "text",
              calibration_split: str | None = None, tuning_split: str | None = None,
              evaluation_split: str | None = None,
              evaluation_dataset: str | None = None) -> dict[str, TextPart]:
    """``default_parts`` with the overrides the command line and recipes name."""
    overrides = {}
    for role, split in (("calibration", calibration_split), ("tuning", tuning_split)):
        if split:
            overrides[role] = TextPart(dataset, split, dataset_config, text_column)
    if evaluation_dataset or evaluation_split:
        overrides["evaluation"] = TextPart(evaluation_dataset or dataset,
                                           evaluation_split or "test",
                                           None if evaluation_dataset else dataset_config,
                                           text_column)
    return default_parts(dataset, dataset_config, text_column, overrides)


PART_KEYS = ("dataset", "dataset_config", "text_column", "calibration_split", "tuning_split",
             "evaluation_split", "evaluation_dataset")


@dataclass(frozen=True)
class QuantizeConfig:
    """Everything ``quantize`` does; the defaults are the measured best (README)."""

    model: str | None = None  # a model for 'quantkit export' ...
    onnx: Path | None = None  # ... or an existing export
    parts: dict[str, TextPart] = field(default_factory=dict)  # role -> text
    max_ppl_increase: str = "1%"
    objective: str = "coverage"
    max_length: int = 512  # deployment context: tuning windows and evaluation windows
    transform: str = "auto"  # auto | rotate | smoothquant | none
    num_samples: int = 128
    seq_len: int = 256
    gptq: bool = True
    # the search: sensitivity ranks on one window (it only orders the groups; the few that
    # matter stand out by 10x), budget checks on 6 and the held-out check on 12, each at the
    # upper 90 % confidence bound of the increase (AutotuneSettings.confidence)
    rank_windows: int = 1
    search_windows: int = 6
    holdout_windows: int = 12
    method_groups: int = 3
    greedy_runs: int = 10
    max_evals: int = 120
    time_budget: str | None = None  # '15m', '900s', '1h': the search stops to finish in time
    eval_tokens: int | None = 20480  # tokens of the evaluation part scored; 0 or None: all
    seed: int = 0  # calibration blocks, rotation, and (unless tuning_seed) the tuning windows
    tuning_seed: int | None = None  # the windows the search draws; None: seed
    threads: int | None = None
    latency_iterations: int = 10
    trust_remote_code: bool = False
    # the search's measurements as Ray tasks: 'local', 'auto' or a cluster address (None: here);
    # the plan is the same either way, so it is not part of the autotune step's key
    ray: str | None = None
    max_retries: int = DEFAULT_MAX_RETRIES  # Ray's retries of a task whose worker died
    # a KV-cache engine of the verified plan for 'quantkit generate', checked against FP32's
    # greedy tokens (quantkit.cache_quantize); cache_onnx: the cache export with --onnx
    with_cache: bool = False
    cache_onnx: Path | None = None
    generation_prompts: tuple[str, ...] = DEFAULT_PROMPTS
    generation_tokens: int = DEFAULT_NEW_TOKENS

    def check(self) -> None:
        if (self.model is None) == (self.onnx is None):
            raise QuantkitError("give either --model or --onnx",
                                "--model M exports M first; --onnx X uses an existing export")
        if self.transform not in ("auto", "rotate", "smoothquant", "none"):
            raise QuantkitError(f"unknown transform '{self.transform}'",
                                "use auto, rotate, smoothquant or none")
        missing = [r for r in ROLES if r not in self.parts]
        if missing:
            raise QuantkitError(f"no text for {', '.join(missing)}", "pass --dataset")
        for name in ("max_length", "num_samples", "seq_len", "search_windows", "max_evals",
                     "latency_iterations"):
            if int(getattr(self, name)) < 1:
                raise QuantkitError(f"{name.replace('_', '-')} must be at least 1")
        if int(self.max_retries) < 0:
            raise QuantkitError("max-retries must not be negative")
        from quantkit.tune.budget import OBJECTIVES, Budget

        Budget.parse(self.max_ppl_increase)
        if self.time_budget is not None:
            seconds = parse_duration(self.time_budget)
            if seconds < MIN_TIME_BUDGET_S:
                raise QuantkitError(
                    f"--time-budget {self.time_budget} is too small: export, calibration, "
                    f"builds and the evaluation alone take minutes, and the search needs at "
                    f"least one measurement",
                    f"give at least {MIN_TIME_BUDGET_S // 60} minutes, e.g. --time-budget 15m")
        if self.objective not in OBJECTIVES:
            raise QuantkitError(f"unknown objective '{self.objective}'",
                                f"use one of: {', '.join(OBJECTIVES)}")
        from quantkit.cache_quantize import check_cache_settings

        check_cache_settings(self)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("onnx", "cache_onnx"):
            out[key] = None if out[key] is None else str(out[key])
        return out

    @classmethod
    def from_recipe(cls, model: str, section: Any, trust_remote_code: bool = False,
                    where: str = "recipe.quantize") -> QuantizeConfig:
        """A recipe's ``quantize:`` section: ``QuantizeConfig`` fields and the text keys of
        ``parts_for`` (``dataset`` defaults to wikitext, as on the command line)."""
        import dataclasses

        if not isinstance(section, dict):
            raise QuantkitError(f"{where} must be a mapping")
        fields = {f.name for f in dataclasses.fields(cls)} - {"model", "onnx", "parts",
                                                                "trust_remote_code"}
        unknown = sorted(set(section) - set(quantize_section_keys()))
        if unknown:
            raise QuantkitError(f"{where}: unknown key(s) {', '.join(unknown)}",
                                f"known: {', '.join(quantize_section_keys())}")
        texts = {k: section[k] for k in PART_KEYS if k in section}
        texts.setdefault("dataset", "wikitext")
        settings = {k: v for k, v in section.items() if k in fields}
        if "max_ppl_increase" in settings:
            settings["max_ppl_increase"] = str(settings["max_ppl_increase"])
        if "generation_prompts" in settings:
            settings["generation_prompts"] = tuple(settings["generation_prompts"])
        if settings.get("cache_onnx") is not None:
            settings["cache_onnx"] = Path(settings["cache_onnx"])
        try:
            return cls(model=model, parts=parts_for(**texts),
                       trust_remote_code=trust_remote_code, **settings)
        except TypeError as exc:
            raise QuantkitError(f"{where}: {exc}") from None


def quantize_section_keys() -> list[str]:
    """The keys a recipe's ``quantize:`` section takes: ``QuantizeConfig``'s settings and the
    text keys of ``parts_for``."""
    import dataclasses

    fields = {f.name for f in dataclasses.fields(QuantizeConfig)} - {
        "model", "onnx", "parts", "trust_remote_code"}
    return sorted(fields | set(PART_KEYS))


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
    steps = Steps(out, total=7 + (config.model is not None), say=say, force=force, tty=progress)

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
    steps.total += transform["name"] == "rotate"
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
    eval_part = config.parts["evaluation"]

    def make_results(replace_: bool) -> None:
        from quantkit.eval.evaluate import EvalConfig, evaluate_engines
        from quantkit.eval.latency import GridPoint
        from quantkit.eval.results import write_results

        eval_config = EvalConfig(
            dataset=eval_part.dataset, dataset_config=eval_part.dataset_config,
            split=eval_part.split, text_column=eval_part.text_column,
            max_length=config.max_length, stride=config.max_length,
            limit_tokens=config.eval_tokens or None,
            latency_grid=(GridPoint(1, config.max_length),),
            warmup=2, iterations=config.latency_iterations, threads=config.threads)
        evaluated = evaluate_engines(list(engines.values()), eval_config, command=command,
                                     names=list(engines))
        write_results(evaluated, results, force=True)

    steps.run("evaluate", {"engines": [artifact_hash(p) for p in engines.values()],
                           "part": asdict(eval_part), "max_length": config.max_length,
                           "tokens": config.eval_tokens, "threads": config.threads,
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
