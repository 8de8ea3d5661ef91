"""Greedy-token agreement: how closely an engine's greedy tokens follow a reference engine's
(FP32) on the same prompts. One definition for ``quantkit quantize --with-cache``
(``quantkit.generation_check``), ``quantkit eval`` (``quantkit.eval.generation``) and
``benchmarks/generate_latency.py``.

Two numbers, because greedy decoding compounds: once one token differs, everything after it is
a continuation of other text, so the free-running share mostly says where the first difference
fell.

* **free-running** (``token_match``): both engines generate on their own; the share of the
  reference's new-token positions (``positions``) where the engine's token at that position is
  the same. Rows may have different lengths (a row that reaches end-of-text stops): a position
  beyond the engine's shorter row counts as different; the reference's length is what is
  scored. An equal token after a difference still counts (a coincidence or a re-convergence).
  With it: ``identical`` continuations (same tokens, same length), each row's
  ``first_difference`` (None where identical) and ``mean_common_prefix`` (the mean number of
  leading tokens equal to the reference's). This is what a user sees.
* **teacher-forced** (``teacher_forced``): the engine reads the reference's continuation and
  predicts each of its tokens (its top-1 after the prompt and the reference's tokens so far,
  ``forced_top1``); the share of the reference's positions it gets right. Every position is
  scored on the same context, so one early difference does not make the rest count as wrong.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from quantkit.errors import QuantkitError


@dataclass(frozen=True)
class Agreement:
    """One engine's greedy tokens against the ``reference`` engine's (named) on ``prompts``
    prompts of up to ``new_tokens`` new tokens; counts over the reference's ``positions``
    tokens (definitions in the module docstring). ``first_differences`` is None where it was not
    recorded (a ``results.json`` written before it was), ``teacher_forced_equal`` None where
    there was no teacher-forced pass."""

    reference: str
    prompts: int
    new_tokens: int
    positions: int
    equal: int
    identical: int
    mean_common_prefix: float
    first_differences: tuple[int | None, ...] | None
    teacher_forced_equal: int | None = None

    @property
    def token_match(self) -> float:
        """Free-running share: equal tokens over the reference's positions."""
        return self.equal / self.positions

    @property
    def identical_share(self) -> float:
        """Share of prompts whose whole continuation is the reference's."""
        return self.identical / self.prompts

    @property
    def teacher_forced(self) -> float | None:
        """Teacher-forced share: the reference's tokens predicted, over its positions."""
        if self.teacher_forced_equal is None:
            return None
        return self.teacher_forced_equal / self.positions

    def to_dict(self) -> dict[str, Any]:
        """The counts and the shares (``results.json``'s ``agreement``)."""
        return {
            "reference": self.reference, "prompts": self.prompts, "new_tokens": self.new_tokens,
            "positions": self.positions, "equal": self.equal, "identical": self.identical,
            "token_match": self.token_match, "mean_common_prefix": self.mean_common_prefix,
            "identical_share": self.identical_share,
            "first_differences": (None if self.first_differences is None
                                  else list(self.first_differences)),
            "teacher_forced_equal": self.teacher_forced_equal,
            "teacher_forced": self.teacher_forced,
        }


def first_difference(reference: Sequence[int], tokens: Sequence[int]) -> int | None:
    """The first position where ``tokens`` differs from ``reference``; where one is a prefix of
    the other, the shorter one's length; None where they are the same."""
    for i, (a, b) in enumerate(zip(reference, tokens, strict=False)):
        if a != b:
            return i
    return None if len(reference) == len(tokens) else min(len(reference), len(tokens))


def compare_tokens(reference_rows: Sequence[Sequence[int]], rows: Sequence[Sequence[int]], *,
                   reference: str = "reference", new_tokens: int | None = None,
                   forced_rows: Sequence[Sequence[int]] | None = None) -> Agreement:
    """Agreement of ``rows`` (an engine's greedy new tokens, one row per prompt) with
    ``reference_rows`` (the reference engine's, same prompts); rows may differ in length.
    ``forced_rows``: the engine's ``forced_top1`` on each reference row, for the teacher-forced
    count. ``new_tokens``: the tokens asked for per prompt (default: the longest row)."""
    refs = [[int(t) for t in row] for row in reference_rows]
    got = [[int(t) for t in row] for row in rows]
    if len(refs) != len(got) or not refs:
        raise QuantkitError(f"{len(got)} rows of tokens cannot be compared with "
                            f"{len(refs)} reference rows")
    positions = sum(len(r) for r in refs)
    if positions == 0:
        raise QuantkitError("the reference rows have no tokens to compare with")
    equal = sum(a == b for r, g in zip(refs, got, strict=True)
                for a, b in zip(r, g, strict=False))
    firsts = tuple(first_difference(r, g) for r, g in zip(refs, got, strict=True))
    prefix = [len(r) if f is None else f for r, f in zip(refs, firsts, strict=True)]
    forced_equal = None
    if forced_rows is not None:
        forced = [[int(t) for t in row] for row in forced_rows]
        if len(forced) != len(refs) or any(len(f) != len(r)
                                           for f, r in zip(forced, refs, strict=False)):
            raise QuantkitError("teacher-forced rows must have the reference rows' lengths")
        forced_equal = sum(a == b for r, f in zip(refs, forced, strict=True)
                           for a, b in zip(r, f, strict=True))
    if new_tokens is None:
        new_tokens = max(len(r) for r in (*refs, *got))
    return Agreement(reference, len(refs), new_tokens, positions, equal,
                     sum(f is None for f in firsts), sum(prefix) / len(prefix), firsts,
                     forced_equal)


def forced_top1(runner: Any, layout: Any, prompt: Sequence[int],
                continuation: Sequence[int]) -> list[int]:
    """The engine's top-1 token at each position of ``continuation`` after ``prompt``, reading
    the continuation itself (batch 1, its own KV cache): what the teacher-forced count scores.
    ``runner.run(feeds, outputs)`` and ``layout`` (a ``CacheLayout``) as
    ``quantkit.generate.greedy_decode`` takes them."""
    if not len(continuation):
        return []
    names = ["logits", *layout.present_names]
    ids = np.asarray([list(prompt)], dtype=np.int64)
    mask = np.ones_like(ids)
    positions = np.arange(ids.shape[1], dtype=np.int64)[None, :]
    out = runner.run({"input_ids": ids, "attention_mask": mask, "position_ids": positions,
                      **layout.empty_past(1)}, names)
    predicted = [int(np.argmax(out["logits"][0, -1]))]
    for token in continuation[:-1]:
        mask = np.concatenate([mask, np.ones((1, 1), dtype=np.int64)], axis=1)
        positions = positions[:, -1:] + 1
        past = {p: out[q] for p, q in zip(layout.past_names, layout.present_names, strict=True)}
        out = runner.run({"input_ids": np.asarray([[int(token)]], dtype=np.int64),
                          "attention_mask": mask, "position_ids": positions, **past}, names)
        predicted.append(int(np.argmax(out["logits"][0, -1])))
    return predicted


__all__ = ["Agreement", "compare_tokens", "first_difference", "forced_top1"]
