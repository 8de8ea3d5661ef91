"""Feeds for a KV-cache engine (``quantkit export --with-cache``) outside ``generate``: prefills,
synthetic decode steps for timing, and teacher-forced scoring of windows for perplexity.

The cache graph outputs the logits of the last position only, so a window's per-token NLL comes
from running it token by token through the cache (teacher forcing): a prefill of the tokens
before the first scored one (at least one token, an empty past), then one decode step per token,
each fed the real next token and the previous step's presents. Positions restart at 0 in every
window, as the full-sequence engine's do, so the NLL of each scored token is the one the
full-sequence engine of the same model gives (to float rounding): the perplexity is the same, at
the cost of one engine run per token instead of one per window.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from quantkit.errors import QuantkitError


def prefill_feeds(layout: Any, input_ids: np.ndarray) -> dict[str, np.ndarray]:
    """Feeds of a prefill of unpadded rows ``input_ids`` [batch, seq] with an empty past."""
    batch, seq = input_ids.shape
    return {"input_ids": np.ascontiguousarray(input_ids, dtype=np.int64),
            "attention_mask": np.ones((batch, seq), dtype=np.int64),
            "position_ids": np.tile(np.arange(seq, dtype=np.int64), (batch, 1)),
            **layout.empty_past(batch)}


def decode_feeds(layout: Any, next_ids: np.ndarray, past: dict[str, np.ndarray],
                 past_len: int) -> dict[str, np.ndarray]:
    """Feeds of one decode step: token ``next_ids`` [batch] at position ``past_len`` after a
    past of ``past_len`` real positions per row (``past``: past name -> tensor)."""
    batch = int(next_ids.shape[0])
    return {"input_ids": np.asarray(next_ids, dtype=np.int64).reshape(batch, 1),
            "attention_mask": np.ones((batch, past_len + 1), dtype=np.int64),
            "position_ids": np.full((batch, 1), past_len, dtype=np.int64), **past}


def synthetic_past(layout: Any, batch: int, past_len: int) -> dict[str, np.ndarray]:
    """Zero-filled past tensors of ``past_len`` positions: a decode step's kernels read every
    value but their time does not depend on the values, so zeros time a step at that cache
    length as well as a real cache does, without generating ``past_len`` tokens first."""
    shape = (batch, layout.num_kv_heads, past_len, layout.head_dim)
    zeros = np.zeros(shape, dtype=layout.dtype)
    return {name: zeros for name in layout.past_names}


def _step_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    from quantkit.eval.perplexity import nll_from_logits

    last = np.array(logits[:, -1, :], dtype=np.float32)  # a writable copy: scratch for the NLL
    return nll_from_logits(last, targets)


def scored_nll_cached(runner: Any, layout: Any, ids: np.ndarray,
                      batch: Sequence[Any]) -> np.ndarray:
    """NLL of every scored token of ``batch`` (windows of equal length, see
    ``quantkit.eval.perplexity.Window``) through an active cache-graph ``runner``, teacher-forced
    (module docstring); float64, windows in order, as ``scored_nll`` returns them."""
    length = batch[0].length
    if any(w.length != length for w in batch):
        raise QuantkitError("windows of one batch must have the same length")
    rows = np.stack([ids[w.begin:w.end] for w in batch]).astype(np.int64, copy=False)
    first = np.array([w.score_begin - w.begin for w in batch])  # offset of the first scored
    start = int(first.min())  # >= 1: the prefill holds every token before it
    outputs = ["logits", *layout.present_names]
    out = runner.run(prefill_feeds(layout, rows[:, :start]), outputs)
    per_row: list[list[np.ndarray]] = [[] for _ in batch]
    for offset in range(start, length):  # the logits in hand predict the token at ``offset``
        nll = _step_nll(out["logits"], rows[:, offset])
        for i in np.flatnonzero(first <= offset):
            per_row[i].append(nll[i:i + 1])
        if offset == length - 1:
            break
        past = {p: out[q] for p, q in zip(layout.past_names, layout.present_names, strict=True)}
        out = runner.run(decode_feeds(layout, rows[:, offset], past, offset), outputs)
    return np.concatenate([np.concatenate(parts) for parts in per_row])


__all__ = ["decode_feeds", "prefill_feeds", "scored_nll_cached", "synthetic_past"]
