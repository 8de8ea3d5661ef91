"""How closely an engine's greedy generation follows a reference engine's (FP32), prompt by
prompt at batch 1, on KV-cache engines: ``quantkit quantize --with-cache``'s generation check.

Free-running and teacher-forced agreement as ``quantkit.agreement`` defines them (two numbers,
because greedy decoding compounds), in the dict that ``quantize.json`` / ``generation.json``
publish: {"free_running": {"equal", "share", "identical"}, "teacher_forced": {"equal", "share"},
"positions", "samples": [{"prompt", "first_difference", "reference", "engine"}], ...}.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from quantkit.agreement import compare_tokens, forced_top1

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
                forced = [forced_top1(runner, layout, row, ref)
                          for row, ref in zip(ids, rows["reference"], strict=True)]
    agreed = compare_tokens(rows["reference"], rows["engine"], reference=str(reference.path),
                            new_tokens=max_new_tokens, forced_rows=forced)
    samples = [{"prompt": prompt, "first_difference": first,
                "reference": tokenizer.decode(ref, skip_special_tokens=True),
                "engine": tokenizer.decode(got, skip_special_tokens=True)}
               for prompt, ref, got, first in zip(prompts, rows["reference"], rows["engine"],
                                                  agreed.first_differences or (), strict=True)]
    return {
        "reference": str(reference.path), "engine": str(engine.path), "prompts": len(prompts),
        "max_new_tokens": max_new_tokens, "positions": agreed.positions,
        "free_running": {"equal": agreed.equal, "share": agreed.token_match,
                         "identical": agreed.identical},
        "teacher_forced": {"equal": agreed.teacher_forced_equal,
                           "share": agreed.teacher_forced},
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
