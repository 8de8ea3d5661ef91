"""autotune.md: the Markdown summary of an autotune result."""

from __future__ import annotations

from quantkit.tune.budget import AutotuneResult
from quantkit.tune.context import TuneContext


def summary_markdown(result: AutotuneResult, context: TuneContext) -> str:
    """autotune.md: the outcome and the path the search took."""
    base_s = result.baseline["search"]
    lines = ["# quantkit autotune", "",
             f"Budget: {result.settings['budget']} over FP32 perplexity; objective "
             f"{result.settings['objective']}.", "",
             "| subset | FP32 ppl | allowed | plan ppl |", "| --- | --- | --- | --- |",
             f"| search | {base_s:.4f} | {result.limits['search']:.4f} | "
             f"{result.search_perplexity:.4f} |"]
    if result.holdout_perplexity is not None:
        lines.append(f"| holdout | {result.baseline['holdout']:.4f} | "
                     f"{result.limits['holdout']:.4f} | {result.holdout_perplexity:.4f} |")
    lines += ["", f"INT8 groups: {len(result.int8_groups)} of {len(context.groups)}; INT8 "
                  f"coverage {100 * result.coverage:.1f}% of linear-layer MACs."]
    if result.engine is not None:
        e = result.engine
        lines.append(f"Verified engine ({e['precision']}, {e['subset']} subset): perplexity "
                     f"{e['perplexity']:.4f} vs FP32 {e['baseline']:.4f} "
                     f"({e['delta_pct']:+.2f}%), {'within' if e['within_budget'] else 'OVER'} "
                     "the budget.")
    if result.candidates:
        kinds = list(dict.fromkeys(k for c in result.candidates for k in c["kinds"]))
        lines += ["", "## Candidates", "",
                  "Each op kind wholly INT8 with its best calibration method, on the rank "
                  "subset; the lowest sum of perplexity increases was tuned.", "",
                  "| candidate | FP32 ppl | " + " | ".join(kinds) + " | sum of increases |",
                  "| --- | --- | " + " | ".join("---" for _ in kinds) + " | --- |"]
        for c in result.candidates:
            cells = [f"{c['kinds'][k]['perplexity']:.3f} ({c['kinds'][k]['method']})"
                     if k in c["kinds"] else "—" for k in kinds]
            name = f"**{c['label']}** (tuned)" if c["chosen"] else c["label"]
            lines.append(f"| {name} | {c['baseline']:.3f} | " + " | ".join(cells)
                         + f" | {c['score']:+.3f} |")
        lines += ["", f"Build engines of this plan from `{result.onnx}`.", ""]
    if result.methods:
        counts: dict[str, int] = {}
        for method in result.methods.values():
            counts[method] = counts.get(method, 0) + 1
        lines.append("Calibration method changed for " + ", ".join(
            f"{n} tensor(s) to {m}" for m, n in sorted(counts.items())) + ".")
    if result.fp32_groups:
        lines += ["", "Kept in FP32: " + ", ".join(result.fp32_groups)]
    confidence = result.settings.get("confidence")
    lines += ["", "## Search path", "",
              f"'bound': the upper {100 * confidence:.0f} % confidence bound of the plan's "
              "perplexity from the spread between windows, what the budget is checked "
              "against." if confidence else "", "",
              "| # | stage | action | INT8 groups | coverage | subset | ppl | bound | within |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for i, s in enumerate(result.path, 1):
        bound = f"{s.bound:.4f}" if s.bound is not None else "—"
        lines.append(f"| {i} | {s.stage} | {s.action} | {s.int8_groups} | "
                     f"{100 * s.coverage:.1f}% | {s.subset} | {s.perplexity:.4f} | {bound} | "
                     f"{'—' if s.stage == 'method' else 'yes' if s.within else 'no'} |")
    for note in result.notes:
        lines += ["", f"Note: {note}"]
    return "\n".join(lines) + "\n"
