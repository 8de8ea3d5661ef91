"""``quantkit eval`` as a library call: perplexity and latency of one or more engines on one text.

Everything that can be wrong with the input is checked before the first engine runs: every path is
an engine, all engines come from the same model (``source_model_hash``) and tokenize the same way
(vocabulary fingerprint), the window settings fit the model, the text is not empty. Each engine
then runs alone (one runner at a time) for its perplexity over the windows, with its peak memory
measured around it. The latency grid follows: one engine is timed alone; several are loaded
together and timed interleaved, a few runs of each in turn (``quantkit.eval.latency``), so that a
change of load on the machine during the run falls on every engine alike and the ratios between
them hold (timed one after another, a 2-core machine's background load made an INT8 engine look
2.7x slower than FP32 in one run and faster in the next).

KV-cache engines (``export --with-cache``) are scored through their cache, token by token (the
same perplexity as the full-sequence engine, ``quantkit.eval.decode``); the full-pass latency grid
does not apply to them. Instead, after every engine's perplexity, all cache engines are loaded
together and their generation latency (TTFT, time per output token) is measured interleaved, and
their greedy tokens compared with the FP32 cache engine's (``quantkit.eval.generation``). One run
holds cache engines or full-sequence engines, not both (their graphs differ, and so do their
source-model hashes).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from quantkit.errors import QuantkitError
from quantkit.eval.engines import EngineInfo, check_shapes, engine_text_roles, load_engines
from quantkit.eval.generation import (
    GenerationConfig,
    agreement_prompts,
    check_agreement_fits,
    evaluate_generation,
    generation_settings,
    resolve_grid,
)
from quantkit.eval.latency import (
    LATENCY_SEED,
    GridPoint,
    PeakMemory,
    check_grid,
    measure_latency,
    measure_latency_interleaved,
)
from quantkit.eval.perplexity import (
    TokenizedText,
    check_window_settings,
    evaluate_perplexity,
    plan_windows,
    tokenize_text,
    window_batches,
)
from quantkit.eval.results import EngineResult, EvalResults, with_deltas

DEFAULT_MAX_LENGTH = 512
CPU_THREADED_BACKENDS = ("onnxruntime",)  # runners that take a ``threads`` option


@dataclass(frozen=True)
class EvalConfig:
    dataset: str = "wikitext"
    dataset_config: str | None = None
    split: str = "test"
    text_column: str = "text"
    max_length: int | None = None  # None: min(512, the model's max positions)
    stride: int | None = None  # None: max_length (non-overlapping windows)
    limit_tokens: int | None = None
    spread: bool = False  # limit_tokens as windows spread evenly over the text, not its start
    batch_size: int = 1
    latency_grid: tuple[GridPoint, ...] = (GridPoint(1, 128), GridPoint(1, 512))
    warmup: int = 2
    iterations: int = 10
    threads: int | None = None  # None: every core
    use_nll: bool | None = None  # None: fused nll output when the engine has it
    allow_overlap: bool = False  # evaluate on text the engines' calibration/tuning read
    generation: GenerationConfig = GenerationConfig()  # KV-cache engines only

    @classmethod
    def from_recipe(cls, evaluation: Any, **overrides: Any) -> EvalConfig:
        """From a recipe's ``quantkit.config.EvaluationConfig`` (same field names; its latency
        grid strings become grid points); ``overrides`` replace fields."""
        from quantkit.eval.latency import parse_grid

        values = {f: getattr(evaluation, f) for f in (
            "dataset", "dataset_config", "split", "text_column", "max_length", "stride",
            "limit_tokens", "spread", "batch_size", "warmup", "iterations", "threads",
            "allow_overlap")}
        values["latency_grid"] = tuple(parse_grid(",".join(evaluation.latency_grid)))
        values.update(overrides)
        return cls(**values)

    def check(self) -> None:
        if self.batch_size < 1:
            raise QuantkitError(f"batch-size must be at least 1, got {self.batch_size}")
        if self.threads is not None and self.threads < 1:
            raise QuantkitError(f"threads must be at least 1, got {self.threads}")
        if self.warmup < 0:
            raise QuantkitError(f"warmup must be 0 or more, got {self.warmup}")
        if self.iterations < 1:
            raise QuantkitError(f"iterations must be at least 1, got {self.iterations}")
        if self.limit_tokens is not None and self.limit_tokens < 2:
            raise QuantkitError(f"limit-tokens must be at least 2, got {self.limit_tokens}")
        if self.spread and self.limit_tokens is None:
            raise QuantkitError("--spread needs --limit-tokens",
                                "name how many tokens to score, spread over the text")
        self.generation.check()


def resolve_windows(config: EvalConfig, max_positions: int | None) -> tuple[int, int]:
    max_length = config.max_length
    if max_length is None:
        max_length = min(DEFAULT_MAX_LENGTH, max_positions or DEFAULT_MAX_LENGTH)
    stride = config.stride if config.stride is not None else max_length
    check_window_settings(max_length, stride, max_positions)
    return max_length, stride


def gpu_info() -> list[dict[str, Any]] | None:
    """NVIDIA GPUs as ``nvidia-smi`` sees them, or None where there is none."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run(
            [exe, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    gpus = []
    for line in out.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3:
            memory = int(parts[1]) if parts[1].isdigit() else None
            gpus.append({"name": parts[0], "memory_total_mib": memory, "driver": parts[2]})
    return gpus or None


def results_environment() -> dict[str, Any]:
    from quantkit.environment import environment_info

    return {**environment_info(), "gpu": gpu_info()}


class _Progress:
    """A rich progress bar over windows on stderr; a no-op when disabled."""

    def __init__(self, enabled: bool) -> None:
        self._progress: Any = None
        if enabled:
            from quantkit.progress import progress_bar

            self._progress = progress_bar("[bold]{task.description}", "windows")

    def __enter__(self) -> _Progress:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def task(self, description: str, total: int) -> Callable[[int], None] | None:
        if self._progress is None:
            return None
        task_id = self._progress.add_task(description, total=total)
        progress = self._progress

        def advance(n: int) -> None:
            progress.advance(task_id, n)

        return advance


def evaluate_engine(
    info: EngineInfo,
    tokens: TokenizedText,
    max_length: int,
    stride: int,
    config: EvalConfig,
    on_batch: Callable[[int], None] | None = None,
    time_it: bool = True,
) -> EngineResult:
    """Perplexity and latency of one engine, with its peak memory (deltas left empty);
    ``time_it=False``: perplexity only (``timed_together`` times several engines)."""
    options = runner_options(info, config)
    vocab = info.vocab_size or len(info.tokenizer)
    layout = info.cache_layout
    with PeakMemory() as memory, info.engine.runner(**options) as runner:
        ppl = evaluate_perplexity(
            runner, tokens, max_length, stride, config.batch_size,
            use_nll=None if layout is not None else config.use_nll, vocab_size=vocab,
            on_batch=on_batch, cache_layout=layout,
        )
        accuracy_only = info.manifest.get("accuracy_only")
        latency = [] if accuracy_only or layout is not None or not time_it else measure_latency(
            runner, config.latency_grid, vocab, config.warmup, config.iterations
        )
        described = runner.describe()
    manifest = info.manifest
    coverage = manifest.get("int8_coverage")
    size = manifest.get("size_bytes")
    return EngineResult(
        name=info.name,
        path=str(Path(info.engine.path).resolve()),
        backend=info.engine.backend,
        precision=info.engine.precision,
        int8_coverage=float(coverage) if isinstance(coverage, (int, float)) else None,
        source_model_hash=str(manifest["source_model_hash"]),
        size_bytes=int(size) if isinstance(size, int) else None,
        perplexity=ppl.perplexity,
        nll_mean=ppl.nll_mean,
        nll_sum=ppl.nll_sum,
        num_scored_tokens=ppl.num_scored_tokens,
        eval_output=ppl.output,
        eval_batch_size=ppl.batch_size,
        eval_seconds=ppl.seconds,
        eval_tokens_per_s=ppl.num_input_tokens / ppl.seconds if ppl.seconds > 0 else 0.0,
        delta_vs_fp32=None,
        delta_vs_fp16=None,
        latency=tuple(latency),
        peak_rss_bytes=memory.peak_bytes,
        rss_baseline_bytes=memory.baseline_bytes,
        peak_rss_delta_bytes=memory.delta_bytes,
        peak_rss_method=memory.method,
        runner=dict(described),
        accuracy_only=str(accuracy_only) if accuracy_only else None,
    )


def is_timed(info: EngineInfo) -> bool:
    """Full-pass latency applies: not accuracy-only, not a KV-cache engine."""
    return not info.manifest.get("accuracy_only") and info.cache_layout is None


def timed_together(infos: Sequence[EngineInfo], config: EvalConfig) -> list[list[Any]]:
    """The latency grid of every engine of ``infos``, loaded at once and timed interleaved."""
    from contextlib import ExitStack

    with ExitStack() as stack:
        runners = [stack.enter_context(info.engine.runner(**runner_options(info, config)))
                   for info in infos]
        vocab = infos[0].vocab_size or len(infos[0].tokenizer)
        return measure_latency_interleaved(runners, config.latency_grid, vocab, config.warmup,
                                           config.iterations)


def runner_options(info: EngineInfo, config: EvalConfig) -> dict[str, Any]:
    if config.threads is not None and info.engine.backend in CPU_THREADED_BACKENDS:
        return {"threads": config.threads}
    return {}


def evaluate_engines(
    engine_dirs: Sequence[Path],
    config: EvalConfig,
    *,
    command: str | None = None,
    progress: bool = False,
    names: Sequence[str] | None = None,
) -> EvalResults:
    """Check everything, then evaluate each engine on the same tokens; return the results."""
    from quantkit.data import resolve_text_source
    from quantkit.eval.text import load_evaluation_text
    from quantkit.text_roles import check_roles_disjoint, role_text

    config.check()
    infos = load_engines(engine_dirs, names)
    limits = [i.max_positions for i in infos if i.max_positions is not None]
    max_positions = min(limits) if limits else None
    max_length, stride = resolve_windows(config, max_positions)
    if config.spread and stride != max_length:
        raise QuantkitError("--spread scores windows that do not overlap",
                            f"leave --stride at --max-length ({max_length})")
    layout = infos[0].cache_layout
    if layout is None:  # cache engines are not timed on the full-pass grid
        check_grid(config.latency_grid, max_positions)
    gen_config = replace(config.generation, warmup=config.warmup)
    gen_grid = resolve_grid(gen_config, max_positions) if layout is not None else None
    if layout is not None:
        check_agreement_fits(gen_config, max_positions)

    source = resolve_text_source(config.dataset, config.dataset_config, config.split,
                                 config.text_column)
    text = load_evaluation_text(source)
    roles = [role_text("evaluation", text.describe())]
    for info in infos:
        roles += engine_text_roles(info.name, info.manifest)
    overlaps = check_roles_disjoint(roles, config.allow_overlap, focus="evaluation")
    tokens = tokenize_text(infos[0].tokenizer, text.text, config.limit_tokens,
                           text.num_documents,
                           spread_length=max_length if config.spread else None)
    windows = plan_windows(tokens.num_tokens, max_length, stride)
    prompts, offsets = (agreement_prompts(tokens.ids, gen_config.agreement_prompts,
                                          gen_config.agreement_prompt_tokens)
                        if layout is not None else (None, []))
    shapes = [(len(b), b[0].length) for b in window_batches(windows, config.batch_size)]
    shapes += [(p.batch, p.seq) for p in config.latency_grid if layout is None]
    for info in infos:
        check_shapes(info.name, info.manifest, shapes)

    engines = []
    timed = [i for i, info in enumerate(infos) if is_timed(info)]
    with _Progress(progress) as bar:
        for info in infos:
            advance = bar.task(f"{info.name} ({info.engine.precision})", len(windows))
            engines.append(evaluate_engine(info, tokens, max_length, stride, config, advance,
                                           time_it=len(timed) < 2))
    if len(timed) > 1 and config.latency_grid:
        points = timed_together([infos[i] for i in timed], config)
        for i, latency in zip(timed, points, strict=True):
            engines[i] = replace(engines[i], latency=tuple(latency))
    generation: dict[str, Any] | None = None
    if layout is not None and gen_grid is not None and prompts is not None:
        vocab = infos[0].vocab_size or len(infos[0].tokenizer)
        metrics = evaluate_generation(infos, layout, gen_grid, gen_config, vocab, prompts,
                                      [runner_options(info, config) for info in infos])
        engines = [replace(e, generation=m) for e, m in zip(engines, metrics, strict=True)]
        generation = generation_settings(gen_grid, gen_config, offsets)
    engines_with_deltas, reference = with_deltas(engines)
    dataset = {
        "source": source.describe(),
        "split": source.split,
        **{k: v for k, v in text.describe().items() if k in ("num_documents", "num_chars",
                                                                 "joined_with")},
        "text_sha256": tokens.text_sha256,
        "tokenizer_sha256": infos[0].tokenizer_sha256,
        "add_special_tokens": False,
        "total_tokens": tokens.total_tokens,
        "limit_tokens": config.limit_tokens,
        "spread": config.spread,
        "num_tokens": tokens.num_tokens,
        "tokens_sha256": tokens.tokens_sha256,
        "max_length": max_length,
        "stride": stride,
        "num_windows": len(windows),
        "num_scored_tokens": sum(w.num_scored for w in windows),
        "read": text.read,
        "roles": [r.describe() for r in roles if r is not None],
        "overlaps": overlaps,
    }
    settings = {
        "batch_size": config.batch_size,
        "threads": config.threads,
        "warmup": config.warmup,
        "iterations": config.iterations,
        "latency_grid": [str(p) for p in config.latency_grid],
        "latency_seed": LATENCY_SEED,
        "cpu_threads_available": os.cpu_count(),
        **({"generation": generation} if generation is not None else {}),
    }
    return EvalResults(
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        commands=(command,) if command else (),
        environment=results_environment(),
        dataset=dataset,
        settings=settings,
        reference=reference,
        engines=engines_with_deltas,
    )


__all__ = [
    "EvalConfig",
    "evaluate_engine",
    "evaluate_engines",
    "resolve_windows",
]
