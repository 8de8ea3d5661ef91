"""Greedy decoding on an engine built from a KV-cache export (``quantkit export --with-cache``):
the library call behind ``quantkit generate``.

Prompts are left-padded into one batch; the prefill runs them with an empty past, then each decode
step feeds one token per row with the previous step's present tensors as its past. Positions
follow Hugging Face's ``generate`` (``cumsum(attention_mask) - 1``, then one more per token), so
an FP32 engine's tokens are ``model.generate(do_sample=False)``'s. A row that emits the end-of-text
token is finished: it gets padding tokens until every row is done, as in ``generate``.

Timing (monotonic clock, host to host, the engine already loaded): time to first token = the
prefill run (feeds, engine run, first argmax); time per output token = one decode step for the
whole batch (p50 over the steps); tokens/s = new tokens of all rows / (TTFT + decode time).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from quantkit.errors import QuantkitError

DEFAULT_MAX_NEW_TOKENS = 64


@dataclass(frozen=True)
class GenerationTiming:
    """Seconds measured during one ``generate`` call (definitions in the module docstring)."""

    batch: int
    prompt_tokens: int  # the padded prompt length of the prefill
    new_tokens: int  # new tokens of all rows (finished rows' padding not counted)
    ttft_s: float
    decode_steps_s: list[float] = field(default_factory=list)

    @property
    def per_token_p50_s(self) -> float | None:
        return statistics.median(self.decode_steps_s) if self.decode_steps_s else None

    @property
    def total_s(self) -> float:
        return self.ttft_s + sum(self.decode_steps_s)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.total_s if self.total_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "per_token_p50_s": self.per_token_p50_s,
                "total_s": self.total_s, "tokens_per_s": self.tokens_per_s}


@dataclass(frozen=True)
class GenerationResult:
    """The new tokens and text of each prompt, in prompt order, and the timing."""

    prompts: list[str]
    tokens: list[list[int]]
    texts: list[str]
    timing: GenerationTiming


def generate(
    engine: Any,
    prompts: str | Sequence[str],
    *,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    threads: int | None = None,
    on_text: Callable[[str], None] | None = None,
) -> GenerationResult:
    """Greedy-decode ``max_new_tokens`` after each prompt on ``engine`` (an engine directory or
    ``quantkit.backends.base.Engine``) with its saved tokenizer.

    ``on_text`` is given the text of each new token as it is decoded, for one prompt only
    (streaming); several prompts run as one padded batch and come back together."""
    from quantkit.backends.base import Engine
    from quantkit.models import load_tokenizer

    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    check_request(prompts, max_new_tokens)
    if on_text is not None and len(prompts) != 1:
        raise QuantkitError("streaming (on_text) is for one prompt",
                            f"got {len(prompts)} prompts; they run as one batch")
    engine = engine if isinstance(engine, Engine) else Engine.load(Path(engine))
    layout = engine_cache_layout(engine)
    tokenizer_dir = engine.manifest.get("tokenizer")
    if not tokenizer_dir:
        raise QuantkitError(f"{engine.path} has no tokenizer",
                            "build the engine from an export directory written by "
                            "'quantkit export --with-cache'")
    tokenizer = load_tokenizer(engine.path / str(tokenizer_dir))
    ids = [list(tokenizer(p)["input_ids"]) for p in prompts]
    for prompt, row in zip(prompts, ids, strict=True):
        if not row:
            raise QuantkitError(f"the prompt {prompt!r} is no tokens after tokenization",
                                "give a prompt with text in it")
    check_positions(ids, max_new_tokens, engine.manifest.get("max_positions"))
    eos_ids, pad = stop_tokens(engine.manifest, tokenizer)
    stream = _Streamer(tokenizer, on_text) if on_text is not None else None
    with engine.runner(threads=threads) as runner:
        check_cache_inputs(engine, runner.input_names)
        tokens, timing = greedy_decode(runner, layout, ids, max_new_tokens, pad_id=pad,
                                       eos_ids=eos_ids, on_token=stream.push if stream else None)
    texts = [tokenizer.decode(row, skip_special_tokens=True) for row in tokens]
    return GenerationResult(prompts, tokens, texts, timing)


def stop_tokens(manifest: Any, tokenizer: Any) -> tuple[list[int], int]:
    """(end-of-text ids, padding id): the model's generation config as the export recorded it
    (what Hugging Face's ``generate`` stops at), else the tokenizer's EOS; padding is the
    config's pad id, else the tokenizer's, else the first EOS, else 0."""
    recorded = (manifest.get("cache") or {}).get("generation")
    if recorded is not None:
        eos_ids = [int(e) for e in recorded.get("eos_token_ids") or []]
        pad = recorded.get("pad_token_id")
    else:
        eos_ids = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
        pad = None
    if pad is None:
        pad = tokenizer.pad_token_id
    if pad is None:
        pad = eos_ids[0] if eos_ids else 0
    return eos_ids, int(pad)


def check_request(prompts: Sequence[str], max_new_tokens: int) -> None:
    """Refuse what cannot be generated before any engine is loaded."""
    if not prompts:
        raise QuantkitError("no prompt given", "pass --prompt TEXT (repeatable)")
    for prompt in prompts:
        if not isinstance(prompt, str) or not prompt.strip():
            raise QuantkitError(f"empty prompt {prompt!r}", "every --prompt needs text")
    if int(max_new_tokens) < 1:
        raise QuantkitError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")


def check_positions(ids: Sequence[Sequence[int]], max_new_tokens: int,
                    max_positions: int | None) -> None:
    """Prompt plus new tokens must fit the model's positions (beyond them GPT-2 has no position
    embedding and a RoPE model was never trained)."""
    if not isinstance(max_positions, int):
        return
    longest = max(len(row) for row in ids)
    if longest > max_positions:
        raise QuantkitError(f"a prompt is {longest} tokens, longer than the model's "
                            f"{max_positions} positions", "shorten the prompt")
    if longest + max_new_tokens > max_positions:
        raise QuantkitError(
            f"a prompt of {longest} tokens plus {max_new_tokens} new tokens exceeds the model's "
            f"{max_positions} positions",
            f"pass --max-new-tokens {max_positions - longest} or less, or shorten the prompt")


def engine_cache_layout(engine: Any) -> Any:
    """The engine's KV-cache layout, or a QuantkitError for an engine without a cache."""
    from quantkit.export_cache import CacheLayout

    cache = engine.manifest.get("cache")
    if not cache:
        raise QuantkitError(
            f"{engine.path} has no KV-cache inputs: it was built from a plain export",
            "export with 'quantkit export --with-cache', build that export, and generate "
            "with the new engine")
    return CacheLayout.from_dict(cache)


def check_cache_inputs(engine: Any, input_names: Sequence[str]) -> None:
    """The engine's graph must have the inputs its manifest's cache layout promises."""
    from quantkit.export_cache import BASE_INPUTS

    layout = engine_cache_layout(engine)
    missing = [n for n in (*BASE_INPUTS, *layout.past_names) if n not in input_names]
    if missing:
        raise QuantkitError(f"{engine.path} lacks the cache inputs {', '.join(missing[:4])}",
                            "rebuild it from an export made with --with-cache")


def left_pad(ids: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """``(input_ids, attention_mask)`` [batch, longest], rows padded on the left."""
    longest = max(len(row) for row in ids)
    input_ids = np.full((len(ids), longest), pad_id, dtype=np.int64)
    mask = np.zeros((len(ids), longest), dtype=np.int64)
    for i, row in enumerate(ids):
        if row:
            input_ids[i, longest - len(row):] = row
            mask[i, longest - len(row):] = 1
    return input_ids, mask


def greedy_decode(
    runner: Any,
    layout: Any,
    ids: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    pad_id: int,
    eos_ids: Sequence[int] = (),
    on_token: Callable[[int], None] | None = None,
) -> tuple[list[list[int]], GenerationTiming]:
    """Greedy tokens for each row of ``ids`` on an active cache-graph ``runner``; each row's list
    ends at its first token of ``eos_ids`` (included). ``on_token`` gets row 0's tokens as they
    come."""
    from quantkit.export_cache import hf_positions

    start = time.perf_counter()
    input_ids, mask = left_pad(ids, pad_id)
    batch = input_ids.shape[0]
    positions = hf_positions(mask)
    outputs = ["logits", *layout.present_names]
    feeds = {"input_ids": input_ids, "attention_mask": mask, "position_ids": positions,
             **layout.empty_past(batch)}
    out = runner.run(feeds, outputs)
    next_ids = np.argmax(out["logits"][:, -1, :], axis=-1).astype(np.int64)
    ttft = time.perf_counter() - start
    done = np.zeros(batch, dtype=bool)
    tokens: list[list[int]] = [[] for _ in range(batch)]
    steps: list[float] = []
    for step in range(max_new_tokens):
        if step:
            t0 = time.perf_counter()
            mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
            positions = positions[:, -1:] + 1
            feeds = {"input_ids": next_ids[:, None], "attention_mask": mask,
                     "position_ids": positions,
                     **{p: out[q] for p, q in zip(layout.past_names, layout.present_names,
                                                  strict=True)}}
            out = runner.run(feeds, outputs)
            next_ids = np.argmax(out["logits"][:, -1, :], axis=-1).astype(np.int64)
            steps.append(time.perf_counter() - t0)
        next_ids = np.where(done, pad_id, next_ids)
        for i in np.flatnonzero(~done):
            tokens[i].append(int(next_ids[i]))
        if on_token is not None and not done[0]:
            on_token(int(next_ids[0]))
        if len(eos_ids):
            done |= np.isin(next_ids, list(eos_ids))
            if done.all():
                break
    timing = GenerationTiming(batch=batch, prompt_tokens=int(input_ids.shape[1]),
                              new_tokens=sum(len(t) for t in tokens), ttft_s=ttft,
                              decode_steps_s=steps)
    return tokens, timing


class _Streamer:
    """Turns tokens into text pieces: decodes the whole continuation and hands on what is new,
    holding back an incomplete UTF-8 character (shown as U+FFFD) until it is complete."""

    def __init__(self, tokenizer: Any, sink: Callable[[str], None]) -> None:
        self.tokenizer = tokenizer
        self.sink = sink
        self.tokens: list[int] = []
        self.shown = 0

    def push(self, token: int) -> None:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return
        if len(text) > self.shown:
            self.sink(text[self.shown:])
            self.shown = len(text)
