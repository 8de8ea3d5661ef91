"""Sliding-window perplexity, the method of Hugging Face's perplexity guide.

The evaluation text is tokenized once (``tokenize_text``); windows of ``max_length`` tokens start
every ``stride`` tokens (``plan_windows``); each window scores only the tokens that no earlier
window scored, each predicted from the window's tokens before it (a token is scored at most once).
The first window scores all of its tokens but the first, which has no context. With overlapping
windows (``stride < max_length``) every later token is scored exactly once, ``num_tokens - 1`` in
all; with ``stride == max_length`` every window scores all but its first token, ``num_tokens -
num_windows`` in all (the guide's loop does the same: its labels are shifted inside the model). Then

    perplexity = exp(sum of NLL over scored tokens / number of scored tokens).

One deliberate difference from the guide's loop: the guide averages a window's loss over the
tokens it scores and weights that mean by ``num_valid_tokens - batch_size``, which for every window
after the first with overlapping windows is one token fewer than it scores; here the NLL of every
scored token is summed and divided by the exact count. The two agree exactly for non-overlapping
windows (``stride == max_length``); with overlap the scored tokens are the same and only the guide's
weights differ (by ``1/stride`` relative per window).

Engines with the fused ``nll`` output (``quantkit export --with-nll``: per-token NLL of the next
token, computed in FP32 inside the graph) are asked for that output only, so full logits never leave
the engine. Otherwise the ``logits`` output is fetched and reduced to per-token NLL row chunk by row
chunk, in place, and the batch is capped so one batch's logits stay under ``logits_budget_bytes``:
memory holds the logits of one batch at most, never of many windows.

Windows of equal length are batched ``batch_size`` at a time; the last, shorter window runs alone.

KV-cache engines (``export --with-cache``) output the last position's logits only; their windows
are scored token by token through the cache (``quantkit.eval.decode``), output ``"decode"``: the
same NLL per token as the full-sequence engine, one engine run per token.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from quantkit.errors import QuantkitError

DOCUMENT_SEPARATOR = "\n\n"
LOGITS_BUDGET_BYTES = 512 << 20  # one batch of logits on the host, at most (logits path)
LOGITS_ROW_CHUNK = 64  # rows of [vocab] reduced at a time (logits path)


@dataclass(frozen=True)
class Window:
    """Tokens ``[begin, end)`` go in, tokens ``[score_begin, end)`` are scored (absolute ids)."""

    begin: int
    end: int
    score_begin: int

    @property
    def length(self) -> int:
        return self.end - self.begin

    @property
    def num_scored(self) -> int:
        return self.end - self.score_begin


def check_window_settings(max_length: int, stride: int, max_positions: int | None = None) -> None:
    """Raise QuantkitError for a window setting the method or the model cannot use."""
    if max_length < 2:
        raise QuantkitError(
            f"max-length must be at least 2, got {max_length}",
            "a window needs one token of context and one to score",
        )
    if max_positions is not None and max_length > max_positions:
        raise QuantkitError(
            f"max-length {max_length} is beyond the model's limit of {max_positions} positions",
            f"use --max-length {max_positions} or less",
        )
    if stride < 1:
        raise QuantkitError(f"stride must be at least 1, got {stride}")
    if stride > max_length:
        raise QuantkitError(
            f"stride {stride} is larger than max-length {max_length}",
            "tokens between windows would never be scored; use --stride of max-length or less",
        )


def plan_windows(num_tokens: int, max_length: int, stride: int) -> list[Window]:
    """The guide's windows over ``num_tokens`` tokens, without windows that score nothing."""
    check_window_settings(max_length, stride)
    if num_tokens < 2:
        raise QuantkitError(
            f"the evaluation text has {num_tokens} token(s); perplexity needs at least 2"
        )
    windows: list[Window] = []
    prev_end = 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + max_length, num_tokens)
        score_begin = max(prev_end, begin + 1)
        if score_begin < end:
            windows.append(Window(begin, end, score_begin))
        prev_end = end
        if end == num_tokens:
            break
    return windows


@dataclass(frozen=True)
class TokenizedText:
    """The evaluation text, tokenized once. ``ids`` may be cut to a token limit."""

    ids: np.ndarray  # int64 [num_tokens]
    total_tokens: int  # before --limit-tokens
    text_sha256: str
    num_chars: int
    num_documents: int

    @property
    def num_tokens(self) -> int:
        return int(self.ids.shape[0])

    @property
    def tokens_sha256(self) -> str:
        return hashlib.sha256(np.ascontiguousarray(self.ids, dtype=np.int64).tobytes()).hexdigest()


def join_documents(documents: Sequence[str]) -> str:
    """The guide's join: documents separated by a blank line (``"\\n\\n"``)."""
    return DOCUMENT_SEPARATOR.join(documents)


def tokenize_text(
    tokenizer: Any, text: str, limit_tokens: int | None = None, num_documents: int = 1,
    spread_length: int | None = None,
) -> TokenizedText:
    """Tokenize the whole text at once, without special tokens, and keep the first
    ``limit_tokens`` ids if given. With ``spread_length`` (a window length), keep
    ``limit_tokens // spread_length`` pieces of that length spaced evenly over the whole text
    instead: windows of that length then score text from everywhere in it, not only its
    beginning (text varies along a file more than between windows of one place; README)."""
    if limit_tokens is not None and limit_tokens < 2:
        raise QuantkitError(f"limit-tokens must be at least 2, got {limit_tokens}")
    if not text.strip():
        raise QuantkitError(
            "the evaluation text is empty", "check --dataset, --split and --text-column"
        )
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    array = np.asarray(ids, dtype=np.int64)
    total = int(array.shape[0])
    if total == 0:
        raise QuantkitError(
            f"the tokenizer turned {len(text)} characters of text into no tokens",
            "the engine's saved tokenizer is empty or broken; re-export the model",
        )
    if limit_tokens is not None and spread_length is not None and limit_tokens < total:
        array = spread_pieces(array, limit_tokens, spread_length)
    elif limit_tokens is not None:
        array = array[:limit_tokens]
    if array.shape[0] < 2:
        raise QuantkitError(
            f"the evaluation text has {array.shape[0]} token(s); perplexity needs at least 2"
        )
    return TokenizedText(
        ids=array,
        total_tokens=total,
        text_sha256=hashlib.sha256(text.encode("utf-8")).hexdigest(),
        num_chars=len(text),
        num_documents=num_documents,
    )


def spread_pieces(ids: np.ndarray, limit_tokens: int, length: int) -> np.ndarray:
    """``limit_tokens // length`` pieces of ``length`` ids (at least one), evenly spaced over
    ``ids`` (longer than ``limit_tokens``): piece i starts at ``i * len(ids) // count``, so the
    pieces never overlap and the last one ends inside the text."""
    count = max(1, limit_tokens // length)
    total = int(ids.shape[0])
    if count == 1 or total <= length:
        return ids[:min(limit_tokens, total)]
    return np.concatenate([ids[i * total // count:i * total // count + length]
                           for i in range(count)])


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    nll_mean: float
    nll_sum: float
    num_scored_tokens: int
    num_windows: int
    num_input_tokens: int  # tokens fed to the engine, summed over windows
    output: str  # "nll" (fused), "logits", or "decode" (a KV-cache engine, token by token)
    batch_size: int  # windows per engine call actually used
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def window_batches(windows: Sequence[Window], batch_size: int) -> Iterator[list[Window]]:
    """Consecutive windows of equal length, ``batch_size`` at a time (order kept)."""
    if batch_size < 1:
        raise QuantkitError(f"batch-size must be at least 1, got {batch_size}")
    batch: list[Window] = []
    for window in windows:
        if batch and (len(batch) == batch_size or window.length != batch[0].length):
            yield batch
            batch = []
        batch.append(window)
    if batch:
        yield batch


def window_feeds(ids: np.ndarray, batch: Sequence[Window]) -> dict[str, np.ndarray]:
    input_ids = np.stack([ids[w.begin : w.end] for w in batch]).astype(np.int64, copy=False)
    return {"input_ids": input_ids, "attention_mask": np.ones_like(input_ids)}


def nll_from_logits(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per-row ``logsumexp(logits) - logits[target]`` (float64), ``logits`` [rows, vocab].

    Overwrites ``logits`` (it is used as scratch), ``LOGITS_ROW_CHUNK`` rows at a time so no
    temporary as large as the input is made.
    """
    rows = logits.shape[0]
    out = np.empty(rows, dtype=np.float64)
    for start in range(0, rows, LOGITS_ROW_CHUNK):
        block = logits[start : start + LOGITS_ROW_CHUNK]
        picked = block[np.arange(block.shape[0]), targets[start : start + LOGITS_ROW_CHUNK]]
        peak = block.max(axis=-1, keepdims=True)
        np.subtract(block, peak, out=block)
        np.exp(block, out=block)
        total = block.sum(axis=-1, dtype=np.float64)
        out[start : start + block.shape[0]] = (
            np.log(total) + peak[:, 0].astype(np.float64) - picked.astype(np.float64)
        )
    return out


def scored_nll(runner: Any, ids: np.ndarray, batch: Sequence[Window], use_nll: bool) -> np.ndarray:
    """NLL of every scored token of ``batch`` (float64, windows in order)."""
    feeds = window_feeds(ids, batch)
    parts: list[np.ndarray] = []
    if use_nll:
        nll = runner.run(feeds, outputs=["nll"])["nll"]  # [b, s-1]: NLL of token j+1
        for row, w in zip(nll, batch, strict=True):
            lo, hi = w.score_begin - w.begin - 1, w.end - w.begin - 1
            parts.append(np.asarray(row[lo:hi], dtype=np.float64))
        return np.concatenate(parts)
    logits = runner.run(feeds, outputs=["logits"])["logits"]  # [b, s, vocab]
    for row, w in zip(logits, batch, strict=True):
        lo, hi = w.score_begin - w.begin - 1, w.end - w.begin - 1
        block = row[lo:hi]
        if block.dtype != np.float32 or not block.flags.writeable:
            block = block.astype(np.float32)
        parts.append(nll_from_logits(block, ids[w.score_begin : w.end]))
    del logits
    return np.concatenate(parts)


def logits_batch_cap(max_length: int, vocab_size: int, budget: int = LOGITS_BUDGET_BYTES) -> int:
    """Windows per call so that one batch of FP32 logits stays within ``budget`` bytes."""
    return max(1, budget // max(1, max_length * vocab_size * 4))


def evaluate_perplexity(
    runner: Any,
    tokens: TokenizedText | np.ndarray,
    max_length: int,
    stride: int,
    batch_size: int = 1,
    *,
    use_nll: bool | None = None,
    vocab_size: int | None = None,
    logits_budget_bytes: int = LOGITS_BUDGET_BYTES,
    on_batch: Callable[[int], None] | None = None,
    cache_layout: Any = None,
) -> PerplexityResult:
    """Perplexity of ``tokens`` through an active runner.

    ``use_nll``: ``None`` uses the fused ``nll`` output when the engine has one, ``True`` requires
    it, ``False`` uses logits. ``vocab_size`` sizes the logits path's batch cap
    (``logits_budget_bytes``; without it the batch is not capped). ``on_batch(n)`` is called after
    each engine call with the number of windows it covered (for progress bars).
    ``cache_layout`` (a ``quantkit.export_cache.CacheLayout``): the runner is a KV-cache graph,
    scored through its cache (module docstring); ``use_nll`` must then be None.
    """
    ids = tokens.ids if isinstance(tokens, TokenizedText) else np.asarray(tokens, dtype=np.int64)
    windows = plan_windows(int(ids.shape[0]), max_length, stride)
    outputs = list(runner.output_names)
    if cache_layout is not None:
        if use_nll:
            raise QuantkitError("a KV-cache engine has no fused 'nll' output",
                                "its perplexity comes from its logits, token by token")
        use_nll = False
    elif use_nll is None:
        use_nll = "nll" in outputs
    elif use_nll and "nll" not in outputs:
        raise QuantkitError(
            "the engine has no fused 'nll' output", "export with --with-nll, or use logits"
        )
    if not use_nll and "logits" not in outputs:
        raise QuantkitError(
            f"the engine has neither an 'nll' nor a 'logits' output (outputs: {', '.join(outputs)})"
        )
    effective_batch = batch_size
    if not use_nll and vocab_size and cache_layout is None:
        effective_batch = min(batch_size, logits_batch_cap(max_length, vocab_size,
                                                           logits_budget_bytes))
    nll_sum = 0.0
    count = 0
    fed = 0
    start = time.perf_counter()
    for batch in window_batches(windows, effective_batch):
        if cache_layout is not None:
            from quantkit.eval.decode import scored_nll_cached

            values = scored_nll_cached(runner, cache_layout, ids, batch)
        else:
            values = scored_nll(runner, ids, batch, use_nll)
        expected = sum(w.num_scored for w in batch)
        if values.shape[0] != expected:
            raise QuantkitError(
                f"the engine returned {values.shape[0]} NLL values for {expected} scored tokens"
            )
        if not np.all(np.isfinite(values)):
            raise QuantkitError(
                "the engine produced a non-finite NLL (inf or NaN) for some token",
                "the engine's outputs overflow; check its precision settings",
            )
        nll_sum += float(values.sum())
        count += expected
        fed += sum(w.length for w in batch)
        if on_batch is not None:
            on_batch(len(batch))
    seconds = time.perf_counter() - start
    mean = nll_sum / count
    return PerplexityResult(
        perplexity=math.exp(mean),
        nll_mean=mean,
        nll_sum=nll_sum,
        num_scored_tokens=count,
        num_windows=len(windows),
        num_input_tokens=fed,
        output="decode" if cache_layout is not None else ("nll" if use_nll else "logits"),
        batch_size=effective_batch,
        seconds=seconds,
    )


__all__ = [
    "DOCUMENT_SEPARATOR",
    "PerplexityResult",
    "TokenizedText",
    "Window",
    "check_window_settings",
    "evaluate_perplexity",
    "join_documents",
    "logits_batch_cap",
    "nll_from_logits",
    "plan_windows",
    "tokenize_text",
    "window_batches",
    "window_feeds",
]
