"""The report's generation section: KV-cache engines' time per output token against the cache
length (a plot, one line per engine and batch), and a table of time to first token, time per
output token, tokens/s and greedy-token agreement with the FP32 engine (free-running and
teacher-forced, as ``quantkit.agreement`` defines them).

Numbers come from the ``generation`` entry of each engine in ``results.json``
(``quantkit.eval.generation`` defines them); engines without it (full-sequence engines) are left
out of the section.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from quantkit.report import fmt
from quantkit.report.document import Block, Bullets, Heading, Image, Para, Table

GENERATION_PNG = "generation-per-token.png"

DEFINITIONS = {
    "ttft": "time to first token: one prefill of a prompt of that many random tokens at batch 1 "
            "with an empty cache (p50 of the timed runs, host to host)",
    "per_token": "one decode step (one new token per row) against a zero-filled cache of that "
                 "many positions, batch × past as in the column (p50, and p90 in brackets)",
    "tokens_per_s": "output tokens per second of the batch: batch / mean decode-step time",
    "agreement": "greedy tokens equal to the FP32 cache engine's, position by position, over "
                 "prompts cut from the evaluation text (each engine generates on its own); "
                 "common prefix: mean number of leading tokens equal to FP32's",
    "teacher_forced": "FP32's greedy tokens that the engine predicts (its top-1) when it reads "
                      "FP32's continuation of each prompt, one prompt at a time: every position "
                      "on the same context, so one early difference does not make the rest "
                      "count as wrong (greedy decoding compounds)",
}


def generation_engines(engines: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [e for e in engines if e.get("generation")]


def generation_png(engines: Sequence[Mapping[str, Any]]) -> bytes:
    """p50 time per output token (ms) against the cache length, one line per engine and batch
    (colour: engine; line style and marker: batch); log-scaled cache axis."""
    from quantkit.report.plots import _figure, _png

    fig = _figure(7.5, 4.8)
    ax = fig.add_subplot()
    colours = ["#7f7f7f", "#1f77b4", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2"]
    styles = [("-", "o"), ("--", "s"), (":", "^"), ("-.", "D")]
    batches = sorted({p["batch"] for e in engines for p in e["generation"]["decode"]})
    for k, entry in enumerate(engines):
        colour = colours[k % len(colours)]
        for b, batch in enumerate(batches):
            points = sorted((p["past"], p["p50_ms"]) for p in entry["generation"]["decode"]
                            if p["batch"] == batch)
            if not points:
                continue
            line, marker = styles[b % len(styles)]
            ax.plot([x for x, _ in points], [y for _, y in points], linestyle=line,
                    marker=marker, color=colour, label=f"{entry['label']}, batch {batch}")
    ax.set_xscale("log", base=2)
    pasts = sorted({p["past"] for e in engines for p in e["generation"]["decode"]})
    ax.set_xticks(pasts, [str(n) for n in pasts])
    ax.minorticks_off()
    ax.set_xlabel("cache length (past positions)")
    ax.set_ylabel("time per output token, p50 ms — lower is better")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    return _png(fig)


def _agreement_cells(agreement: Mapping[str, Any] | None) -> list[str]:
    if agreement is None:
        return [fmt.DASH] * 4
    return [fmt.percent(agreement["token_match"]),
            fmt.percent(agreement.get("teacher_forced")),  # None in results of older quantkit
            f"{agreement['mean_common_prefix']:.1f} / {agreement['new_tokens']}",
            fmt.percent(agreement["identical_share"])]


def generation_section(engines: Sequence[Mapping[str, Any]],
                       images: Mapping[str, bytes]) -> list[Block]:
    """The section's blocks, or none where no engine has generation numbers."""
    gens = generation_engines(engines)
    if not gens:
        return []
    lengths = sorted({p["tokens"] for e in gens for p in e["generation"]["ttft"]})
    points = sorted({(p["batch"], p["past"]) for e in gens for p in e["generation"]["decode"]})
    headers = ["engine", "precision",
               *(f"TTFT ms ({n} tokens)" for n in lengths),
               *(f"ms/token {b}×{n}" for b, n in points),
               *(f"tokens/s {b}×{n}" for b, n in points),
               "tokens = FP32", "teacher-forced", "common prefix", "identical continuations"]
    rows = []
    for e in gens:
        gen = e["generation"]
        ttft = {p["tokens"]: p for p in gen["ttft"]}
        decode = {(p["batch"], p["past"]): p for p in gen["decode"]}
        rows.append([
            e["label"], e["precision"],
            *(fmt.ms(ttft[n]["p50_ms"]) if n in ttft else fmt.DASH for n in lengths),
            *(f"{fmt.ms(decode[k]['p50_ms'])} (p90 {fmt.ms(decode[k]['p90_ms'])})"
              if k in decode else fmt.DASH for k in points),
            *(f"{decode[k]['tokens_per_s']:,.1f}" if k in decode else fmt.DASH
              for k in points),
            *_agreement_cells(gen.get("agreement")),
        ])
    blocks: list[Block] = [Heading(2, "Generation (KV-cache engines)", anchor="generation")]
    if GENERATION_PNG in images:
        blocks.append(Image(GENERATION_PNG, "Time per output token against the cache length",
                            images[GENERATION_PNG],
                            caption="p50 of one decode step per engine and batch size; engines "
                                    "were timed interleaved in one run."))
    blocks += [
        Table(headers, rows, align="ll" + "r" * (len(headers) - 2)),
        Bullets([f"TTFT: {DEFINITIONS['ttft']}.",
                 f"Time per output token: {DEFINITIONS['per_token']}.",
                 f"Tokens/s: {DEFINITIONS['tokens_per_s']}.",
                 f"Tokens = FP32: {DEFINITIONS['agreement']}.",
                 f"Teacher-forced: {DEFINITIONS['teacher_forced']}."]),
    ]
    if not any(e["generation"].get("agreement") for e in gens):
        blocks.append(Para("No FP32 cache engine was in the run (or the agreement was "
                           "skipped): no token agreement.", muted=True))
    return blocks


__all__ = ["GENERATION_PNG", "generation_engines", "generation_png", "generation_section"]
