"""Generation latency and greedy-token agreement of KV-cache engines, for ``quantkit eval``.

What is timed (host to host, ``Runner.benchmark`` one iteration at a time, every output fetched —
the logits and all present tensors, as a generation loop needs them):

* **Time to first token (TTFT)** at each prompt length L: one prefill of L random token ids
  (seeded; every engine gets the same) at batch 1 with an empty past. Its tokens/s is the
  prompt's tokens per second of prefill (L / mean).
* **Time per output token** at each point batch B x past N: one decode step of one token per row
  against a cache of N positions. The past is zeros of the cache's shape and dtype
  (``quantkit.eval.decode.synthetic_past``): the kernels' time does not depend on the values,
  and N real positions would cost N steps to make. Its tokens/s is the batch's output tokens per
  second, B / mean.

Engines are interleaved: every engine is loaded at once and, at each point, after ``warmup``
untimed runs each (dropped), the timed runs go round the engines a few at a time after one
untimed settling run (``quantkit.eval.latency.interleaved_times``), the order rotated each
round, so load from other processes falls on every engine alike. p50/p90/p99 are
numpy's linear percentiles over the runs.

**Token agreement** (``quantkit.agreement`` defines the numbers). ``prompts`` prompts of
``prompt_tokens`` tokens, cut from the evaluation text at evenly spaced offsets, are
greedy-decoded for ``new_tokens`` tokens by each engine on its own (one unpadded batch;
end-of-text does not stop a row, so every row has exactly ``new_tokens``). Against the reference
engine (the first FP32 cache engine): ``token_match`` (free-running), ``mean_common_prefix`` and
``identical_share``; and ``teacher_forced``: each other engine reads the reference's tokens after
each prompt alone (batch 1, ``quantkit.agreement.forced_top1``) and the share of them that are
its top-1 is counted. The reference's own greedy tokens are its top-1 on its own continuation,
so its shares are 1 without another pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from quantkit.agreement import Agreement, compare_tokens, forced_top1
from quantkit.errors import QuantkitError

DEFAULT_PROMPT_LENGTHS = (128, 512, 2048)
DEFAULT_DECODE_BATCHES = (1, 8)
DEFAULT_PAST_LENGTHS = (128, 512, 2048)
DEFAULT_ITERATIONS = 20
DEFAULT_AGREEMENT_PROMPTS = 8
DEFAULT_AGREEMENT_PROMPT_TOKENS = 64
DEFAULT_AGREEMENT_NEW_TOKENS = 32
GENERATION_SEED = 0


@dataclass(frozen=True)
class DecodePoint:
    """One decode step of ``batch`` rows against a cache of ``past`` positions."""

    batch: int
    past: int

    def __str__(self) -> str:
        return f"{self.batch}x{self.past}"


def parse_prompt_lengths(text: str) -> list[int] | None:
    """``"128,512"`` -> prompt lengths; ``"none"`` -> []; ``"default"`` or ``""`` -> None (the
    defaults that fit the model)."""
    text = text.strip().lower()
    if text in ("", "default"):
        return None
    if text == "none":
        return []
    lengths: list[int] = []
    for item in text.split(","):
        if not item.strip().isdigit() or int(item) < 1:
            raise QuantkitError(f"prompt length '{item.strip()}' is not a positive integer",
                                "e.g. --ttft-lengths 128,512")
        if int(item) not in lengths:
            lengths.append(int(item))
    return lengths


def parse_decode_grid(text: str) -> list[DecodePoint] | None:
    """``"1x128,8x512"`` (BATCHxPAST) -> decode points; ``"none"`` -> []; ``"default"`` or ``""``
    -> None (the defaults that fit the model)."""
    text = text.strip().lower()
    if text in ("", "default"):
        return None
    if text == "none":
        return []
    from quantkit.eval.latency import parse_pairs

    return [DecodePoint(b, p) for b, p in parse_pairs(text, "decode grid", "past",
                                                      "e.g. --decode-grid 1x128,8x512")]


@dataclass(frozen=True)
class GenerationConfig:
    """What ``eval`` measures on cache engines; ``None`` grids are the defaults that fit."""

    prompt_lengths: tuple[int, ...] | None = None
    decode_grid: tuple[DecodePoint, ...] | None = None
    warmup: int = 2
    iterations: int = DEFAULT_ITERATIONS
    agreement_prompts: int = DEFAULT_AGREEMENT_PROMPTS
    agreement_prompt_tokens: int = DEFAULT_AGREEMENT_PROMPT_TOKENS
    agreement_new_tokens: int = DEFAULT_AGREEMENT_NEW_TOKENS

    def check(self) -> None:
        if self.warmup < 0:
            raise QuantkitError(f"warmup must be 0 or more, got {self.warmup}")
        if self.iterations < 1:
            raise QuantkitError(
                f"--generation-iterations must be at least 1, got {self.iterations}")
        if self.agreement_prompts < 0:
            raise QuantkitError(
                f"--agreement-prompts must be 0 or more, got {self.agreement_prompts}")
        if self.agreement_prompts and (self.agreement_prompt_tokens < 1
                                       or self.agreement_new_tokens < 1):
            raise QuantkitError("agreement prompts and new tokens must be at least 1 token",
                                "or pass --agreement-prompts 0 to skip the agreement")


@dataclass(frozen=True)
class ResolvedGrid:
    prompt_lengths: tuple[int, ...]
    decode: tuple[DecodePoint, ...]
    dropped: tuple[str, ...]  # default points beyond the model's positions, left out


def resolve_grid(config: GenerationConfig, max_positions: int | None) -> ResolvedGrid:
    """The grid to measure: explicit points beyond the model's positions are refused (a prefill
    of L needs L positions, a decode step at past N needs N + 1); default points beyond them
    are left out and named in ``dropped``."""
    limit = max_positions if max_positions is not None else None

    def fits(needed: int) -> bool:
        return limit is None or needed <= limit

    dropped: list[str] = []
    if config.prompt_lengths is None:
        lengths = [n for n in DEFAULT_PROMPT_LENGTHS if fits(n)]
        dropped += [f"prompt {n}" for n in DEFAULT_PROMPT_LENGTHS if not fits(n)]
    else:
        lengths = list(config.prompt_lengths)
        beyond = [str(n) for n in lengths if not fits(n)]
        if beyond:
            raise QuantkitError(f"prompt length {', '.join(beyond)} is beyond the model's limit "
                                f"of {limit} positions", f"use --ttft-lengths of {limit} or less")
    if config.decode_grid is None:
        default = [DecodePoint(b, n) for b in DEFAULT_DECODE_BATCHES for n in DEFAULT_PAST_LENGTHS]
        points = [p for p in default if fits(p.past + 1)]
        dropped += [f"decode {p}" for p in default if not fits(p.past + 1)]
    else:
        points = list(config.decode_grid)
        beyond = [str(p) for p in points if not fits(p.past + 1)]
        if beyond:
            raise QuantkitError(
                f"decode grid {', '.join(beyond)}: a past of that many positions plus the new "
                f"token is beyond the model's limit of {limit} positions",
                f"use a past of {None if limit is None else limit - 1} or less")
    return ResolvedGrid(tuple(lengths), tuple(points), tuple(dropped))


@dataclass(frozen=True)
class StepLatency:
    """Timing of one kind of engine run: ``kind`` "prefill" (``tokens`` = prompt length, past 0)
    or "decode" (``tokens`` = 1, ``past`` = cache length); times per run, in ms."""

    kind: str
    batch: int
    tokens: int
    past: int
    warmup: int
    iterations: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    max_ms: float
    tokens_per_s: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def step_latency(kind: str, batch: int, tokens: int, past: int, warmup: int,
                 seconds: Sequence[float]) -> StepLatency:
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    mean = float(ms.mean())
    return StepLatency(kind, batch, tokens, past, warmup, len(seconds), float(p50), float(p90),
                       float(p99), mean, float(ms.min()), float(ms.max()),
                       batch * tokens / (mean / 1e3) if mean > 0 else float("inf"))


@dataclass(frozen=True)
class GenerationMetrics:
    """One cache engine's generation numbers: ``ttft`` (prefill) and ``decode`` timings, its
    greedy ``tokens`` [prompt][new token] on the agreement prompts, and their ``agreement`` with
    the reference engine (the reference's own is 100 %; None where the run had no FP32 cache
    engine or skipped the agreement)."""

    ttft: tuple[StepLatency, ...]
    decode: tuple[StepLatency, ...]
    tokens: tuple[tuple[int, ...], ...]
    agreement: Agreement | None

    def decode_at(self, batch: int, past: int) -> StepLatency | None:
        return next((p for p in self.decode if (p.batch, p.past) == (batch, past)), None)

    def to_dict(self) -> dict[str, Any]:
        return {"ttft": [p.to_dict() for p in self.ttft],
                "decode": [p.to_dict() for p in self.decode],
                "tokens": [list(row) for row in self.tokens],
                "agreement": None if self.agreement is None else self.agreement.to_dict()}


def agreement_prompts(ids: np.ndarray, count: int, length: int
                      ) -> tuple[np.ndarray, list[int]]:
    """``count`` prompts of ``length`` tokens of ``ids`` at evenly spaced offsets: the prompts
    [count, length] and their offsets in ``ids``."""
    if count == 0:
        return np.zeros((0, length), dtype=np.int64), []
    if ids.shape[0] < length:
        raise QuantkitError(
            f"the evaluation text has {ids.shape[0]} tokens, fewer than one agreement prompt of "
            f"{length}", "raise --limit-tokens or lower --agreement-prompt-tokens")
    last = int(ids.shape[0]) - length
    starts = [0] if count == 1 else [round(k * last / (count - 1)) for k in range(count)]
    return np.stack([ids[s:s + length] for s in starts]).astype(np.int64), starts


def check_agreement_fits(config: GenerationConfig, max_positions: int | None) -> None:
    if not config.agreement_prompts or max_positions is None:
        return
    needed = config.agreement_prompt_tokens + config.agreement_new_tokens
    if needed > max_positions:
        raise QuantkitError(
            f"agreement prompts of {config.agreement_prompt_tokens} tokens plus "
            f"{config.agreement_new_tokens} new tokens exceed the model's {max_positions} "
            "positions", "lower --agreement-prompt-tokens or --agreement-new-tokens")


def measure_generation(runners: Sequence[Any], layout: Any, grid: ResolvedGrid,
                       config: GenerationConfig, vocab_size: int,
                       prompts: np.ndarray) -> list[tuple[list[StepLatency], list[StepLatency],
                                                          np.ndarray]]:
    """TTFT and decode timings and greedy tokens of each active cache-graph runner (same
    layout), interleaved; per runner ``(ttft, decode, tokens [prompts, new_tokens])``."""
    from quantkit.eval.decode import decode_feeds, prefill_feeds, synthetic_past
    from quantkit.eval.latency import interleaved_times
    from quantkit.generate import greedy_decode

    ttft: list[list[StepLatency]] = [[] for _ in runners]
    decode: list[list[StepLatency]] = [[] for _ in runners]
    for length in grid.prompt_lengths:
        rng = np.random.default_rng([GENERATION_SEED, 1, length])
        ids = rng.integers(0, vocab_size, size=(1, length), dtype=np.int64)
        feeds = prefill_feeds(layout, ids)
        for j, seconds in enumerate(interleaved_times(runners, feeds, config.warmup,
                                                 config.iterations)):
            ttft[j].append(step_latency("prefill", 1, length, 0, config.warmup, seconds))
    for point in grid.decode:
        rng = np.random.default_rng([GENERATION_SEED, point.batch, point.past])
        next_ids = rng.integers(0, vocab_size, size=point.batch, dtype=np.int64)
        feeds = decode_feeds(layout, next_ids, synthetic_past(layout, point.batch, point.past),
                             point.past)
        for j, seconds in enumerate(interleaved_times(runners, feeds, config.warmup,
                                                 config.iterations)):
            decode[j].append(step_latency("decode", point.batch, 1, point.past, config.warmup,
                                          seconds))
        del feeds
    tokens = []
    for runner in runners:
        if prompts.shape[0]:
            rows, _ = greedy_decode(runner, layout, prompts.tolist(),
                                    config.agreement_new_tokens, pad_id=0, eos_ids=())
            tokens.append(np.asarray(rows, dtype=np.int64))
        else:
            tokens.append(np.zeros((0, config.agreement_new_tokens), dtype=np.int64))
    return [(ttft[j], decode[j], tokens[j]) for j in range(len(runners))]


def teacher_forced_rows(runner: Any, layout: Any, prompts: np.ndarray,
                        reference_rows: Sequence[Sequence[int]]) -> list[list[int]]:
    """``runner``'s top-1 at each of the reference's tokens after each prompt, one prompt at a
    time (batch 1, as ``quantkit quantize``'s generation check does)."""
    return [forced_top1(runner, layout, prompt, row)
            for prompt, row in zip(prompts.tolist(), reference_rows, strict=True)]


def evaluate_generation(infos: Sequence[Any], layout: Any, grid: ResolvedGrid,
                        config: GenerationConfig, vocab_size: int, prompts: np.ndarray,
                        runner_options: Sequence[dict[str, Any]]) -> list[GenerationMetrics]:
    """Open every engine of ``infos`` (``EngineInfo``, cache engines of one model; each with its
    ``runner_options``) at once, measure them together, and compare each one's tokens with the
    first FP32 engine's, free-running and teacher-forced."""
    ref = next((i for i, info in enumerate(infos) if info.engine.precision == "fp32"), None)
    with ExitStack() as stack:
        runners = [stack.enter_context(info.engine.runner(**options))
                   for info, options in zip(infos, runner_options, strict=True)]
        measured = measure_generation(runners, layout, grid, config, vocab_size, prompts)
        forced: dict[int, list[list[int]]] = {}
        if ref is not None and prompts.shape[0]:
            reference_rows = measured[ref][2].tolist()
            forced = {j: teacher_forced_rows(runner, layout, prompts, reference_rows)
                      for j, runner in enumerate(runners) if j != ref}
            forced[ref] = reference_rows
    metrics = []
    for j, (ttft, decode, tokens) in enumerate(measured):
        agreed = None
        if ref is not None and tokens.shape[0]:
            agreed = compare_tokens(measured[ref][2], tokens, reference=infos[ref].name,
                                    new_tokens=config.agreement_new_tokens,
                                    forced_rows=forced[j])
        metrics.append(GenerationMetrics(tuple(ttft), tuple(decode),
                                         tuple(tuple(int(t) for t in row) for row in tokens),
                                         agreed))
    return metrics


def generation_settings(grid: ResolvedGrid, config: GenerationConfig,
                        offsets: list[int]) -> dict[str, Any]:
    """What a run measured, for ``settings.generation`` of ``results.json``."""
    return {
        "prompt_lengths": list(grid.prompt_lengths),
        "decode_grid": [str(p) for p in grid.decode],
        "dropped": list(grid.dropped),
        "warmup": config.warmup,
        "iterations": config.iterations,
        "seed": GENERATION_SEED,
        "interleaved": True,
        "agreement_prompts": config.agreement_prompts,
        "agreement_prompt_tokens": config.agreement_prompt_tokens,
        "agreement_new_tokens": config.agreement_new_tokens,
        "agreement_offsets": offsets,
    }


__all__ = [
    "DecodePoint",
    "GenerationConfig",
    "GenerationMetrics",
    "ResolvedGrid",
    "StepLatency",
    "agreement_prompts",
    "evaluate_generation",
    "generation_settings",
    "parse_decode_grid",
    "parse_prompt_lengths",
    "resolve_grid",
    "teacher_forced_rows",
]
