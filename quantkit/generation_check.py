"""How closely an engine's greedy generation follows a reference engine's (FP32), prompt by
prompt at batch 1, on KV-cache engines.

Two numbers, because greedy decoding compounds: once one token differs, everything after it is
a continuation of other text.

* **free-running**: both engines generate on their own; the share of the reference's new-token
  positions where the engine's token is the same (a position beyond the shorter continuation
  counts as different), the number of identical continuations, and where each first differs.
  This is what a user sees.
* **teacher-forced**: the engine reads the reference's continuation and predicts each of its
  tokens (its top-1 after the prompt and the reference's tokens so far); the share it gets
  right. Every position is scored on the same context, so one early difference does not make
  the rest count as wrong.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

# short prompts of several kinds of text (prose, facts, code, lists); fixed, so that runs compare
DEFAULT_PROMPTS = (
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "def fibonacci(n):",
    "The three primary colors are",
    "In 1969, the first humans to walk on the Moon",
    "To make a cup of tea, first",
)
DEFAULT_NEW_TOKENS = 32


def _forced_top1(runner: Any, layout: Any, prompt: Sequence[int],
                 continuation: Sequence[int]) -> list[int]:
    """The engine's top-1 token at each position of ``continuation`` after ``prompt``, reading
    the continuation itself (batch 1, its own KV cache)."""
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
        out = runner.run({"input_ids": np.asarray([[token]], dtype=np.int64),
                          "attention_mask": mask, "position_ids": positions, **past}, names)
        predicted.append(int(np.argmax(out["logits"][0, -1])))
    return predicted


def _first_difference(reference: Sequence[int], tokens: Sequence[int]) -> int | None:
    for i, (a, b) in enumerate(zip(reference, tokens, strict=False)):
        if a != b:
            return i
    return None if len(reference) == len(tokens) else min(len(reference), len(tokens))


def greedy_agreement(reference: Any, engine: Any, prompts: Sequence[str] = DEFAULT_PROMPTS,
                     max_new_tokens: int = DEFAULT_NEW_TOKENS, threads: int | None = None
                     ) -> dict[str, Any]:
    """Free-running and teacher-forced agreement of ``engine`` with ``reference`` (engine
    directories or ``Engine`` objects built from KV-cache exports of the same model); each prompt
    alone, ``max_new_tokens`` greedy tokens, stopping at the model's end-of-text token."""
    from quantkit.backends.base import Engine
    from quantkit.generate import (
        check_cache_inputs,
        check_positions,
        check_request,
        engine_cache_layout,
        greedy_decode,
        stop_tokens,
    )
    from quantkit.models import load_tokenizer

    prompts = list(prompts)
    check_request(prompts, max_new_tokens)
    reference = reference if isinstance(reference, Engine) else Engine.load(Path(reference))
    engine = engine if isinstance(engine, Engine) else Engine.load(Path(engine))
    layout = engine_cache_layout(reference)
    if engine_cache_layout(engine) != layout:
        from quantkit.errors import QuantkitError

        raise QuantkitError(f"{engine.path} and {reference.path} have different KV caches",
                            "compare engines built from cache exports of the same model")
    tokenizer = load_tokenizer(reference.path / str(reference.manifest.get("tokenizer")))
    ids = [list(tokenizer(p)["input_ids"]) for p in prompts]
    check_positions(ids, max_new_tokens, reference.manifest.get("max_positions"))
    eos_ids, pad = stop_tokens(reference.manifest, tokenizer)
    options = {"threads": threads} if threads else {}
    rows: dict[str, list[list[int]]] = {}
    for name, which in (("reference", reference), ("engine", engine)):
        with which.runner(**options) as runner:
            check_cache_inputs(which, runner.input_names)
            rows[name] = [greedy_decode(runner, layout, [row], max_new_tokens, pad_id=pad,
                                        eos_ids=eos_ids)[0][0] for row in ids]
            if name == "engine":
                forced = [_forced_top1(runner, layout, row, ref)
                          for row, ref in zip(ids, rows["reference"], strict=True)]
    free_equal = forced_equal = positions = 0
    samples = []
    for prompt, ref, got, pred in zip(prompts, rows["reference"], rows["engine"], forced,
                                      strict=True):
        positions += len(ref)
        free_equal += sum(a == b for a, b in zip(ref, got, strict=False))
        forced_equal += sum(a == b for a, b in zip(ref, pred, strict=True))
        samples.append({"prompt": prompt, "first_difference": _first_difference(ref, got),
                        "reference": tokenizer.decode(ref, skip_special_tokens=True),
                        "engine": tokenizer.decode(got, skip_special_tokens=True)})
    return {
        "reference": str(reference.path), "engine": str(engine.path), "prompts": len(prompts),
        "max_new_tokens": max_new_tokens, "positions": positions,
        "free_running": {"equal": free_equal, "share": free_equal / positions,
                         "identical": sum(s["first_difference"] is None for s in samples)},
        "teacher_forced": {"equal": forced_equal, "share": forced_equal / positions},
        "samples": samples,
    }


def describe(agreement: dict[str, Any]) -> str:
    """One line: both shares and the identical continuations."""
    free, forced = agreement["free_running"], agreement["teacher_forced"]
    return (f"greedy tokens equal to FP32's: {100 * free['share']:.1f} % of "
            f"{agreement['positions']} positions free-running ({free['identical']}/"
            f"{agreement['prompts']} continuations identical), {100 * forced['share']:.1f} % "
            f"teacher-forced; {agreement['prompts']} prompts x {agreement['max_new_tokens']} "
            "new tokens, batch 1")


__all__ = ["DEFAULT_NEW_TOKENS", "DEFAULT_PROMPTS", "describe", "greedy_agreement"]
