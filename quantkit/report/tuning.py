"""The report's tuning section: the sensitivity ranking as a chart, and the path an autotune search
took (what it tried, what each try measured, what it kept), from a ``quantkit sensitivity`` or
``quantkit autotune`` output directory."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from quantkit.artifacts import read_json
from quantkit.errors import QuantkitError
from quantkit.report.document import Block, Heading, Image, Para, Table

SENSITIVITY_PNG = "sensitivity.png"
SEARCH_PNG = "autotune-search.png"
TOP_GROUPS = 30


def read_tuning(directory: Path) -> dict[str, Any]:
    """``{"directory", "sensitivity", "autotune" (or None)}`` from an autotune/sensitivity dir."""
    directory = Path(directory)
    sens_path = directory / "sensitivity.json"
    if not sens_path.is_file():
        raise QuantkitError(f"{directory} holds no sensitivity.json",
                            "pass a directory written by 'quantkit sensitivity' or "
                            "'quantkit autotune'")
    sensitivity = read_json(sens_path)
    if sensitivity.get("schema") != "quantkit.sensitivity/1":
        raise QuantkitError(f"{sens_path} is not quantkit sensitivity results")
    tune_path = directory / "autotune.json"
    autotune = read_json(tune_path) if tune_path.is_file() else None
    if autotune is not None and autotune.get("schema") != "quantkit.autotune/1":
        raise QuantkitError(f"{tune_path} is not quantkit autotune results")
    return {"directory": str(directory), "sensitivity": sensitivity, "autotune": autotune}


def tuning_images(tuning: Mapping[str, Any]) -> dict[str, bytes]:
    from quantkit.report import plots

    images = {SENSITIVITY_PNG: plots.sensitivity_png(tuning["sensitivity"], TOP_GROUPS)}
    if tuning["autotune"] is not None:
        images[SEARCH_PNG] = plots.search_path_png(tuning["autotune"])
    return images


def tuning_section(tuning: Mapping[str, Any] | None, images: Mapping[str, bytes]) -> list[Block]:
    if tuning is None:
        return []
    sens = tuning["sensitivity"]
    groups = sens["groups"]
    blocks: list[Block] = [
        Heading(2, "Sensitivity and autotune", anchor="tuning"),
        Para(f"Perplexity when only one group (transformer block × op kind) runs in INT8, all "
             f"else FP32; FP32 {sens['baseline_perplexity']:.4f} on "
             f"{sens['data']['windows'].get(sens['subset'], '?')} window(s) of "
             f"{sens['data']['max_length']} tokens ({len(groups)} groups, from "
             f"{tuning['directory']})."),
    ]
    if SENSITIVITY_PNG in images:
        blocks.append(Image(SENSITIVITY_PNG, "Sensitivity ranking", images[SENSITIVITY_PNG],
                            caption=f"The {min(TOP_GROUPS, len(groups))} most sensitive groups."))
    total = sum(int(g["macs"]) for g in groups) or 1
    blocks.append(Table(["group", "kind", "ppl", "Δ%", "share of MACs"], [
        [g["name"], g["kind"], f"{g['perplexity']:.4f}", f"{g['delta_pct']:+.3f}",
         f"{100 * g['macs'] / total:.2f}%"] for g in groups[:10]], align="llrrr"))
    tune = tuning["autotune"]
    if tune is None:
        return blocks
    blocks.append(Heading(3, "Autotune"))
    rows = [["budget", f"{tune['settings']['budget']} over FP32"],
            ["objective", str(tune["settings"]["objective"])],
            ["INT8 groups", f"{len(tune['int8_groups'])} of "
                            f"{len(tune['int8_groups']) + len(tune['fp32_groups'])}"],
            ["INT8 coverage (probe)", f"{100 * tune['coverage']:.1f}% of linear-layer MACs"],
            ["search subset", f"{tune['search_perplexity']:.4f} (FP32 "
                              f"{tune['baseline']['search']:.4f}, allowed "
                              f"{tune['limits']['search']:.4f})"]]
    if tune.get("holdout_perplexity") is not None:
        rows.append(["held-out subset", f"{tune['holdout_perplexity']:.4f} (FP32 "
                                        f"{tune['baseline']['holdout']:.4f}, allowed "
                                        f"{tune['limits']['holdout']:.4f}): "
                                        f"{'met' if tune['met_on_holdout'] else 'not met'}"])
    engine = tune.get("engine")
    if engine:
        rows.append(["verified engine", f"{engine['precision']}: {engine['perplexity']:.4f} "
                                        f"({engine['delta_pct']:+.2f}% vs FP32) on "
                                        f"{engine['subset']}: "
                                        f"{'within' if engine['within_budget'] else 'over'} "
                                        "the budget"])
    if tune.get("methods"):
        rows.append(["per-tensor methods", ", ".join(
            f"{t}: {m}" for t, m in sorted(tune["methods"].items()))])
    rows.append(["model runs / time", f"{tune['model_runs']} / {tune['seconds']:.0f} s"])
    blocks.append(Table(["field", "value"], rows))
    blocks.extend(candidate_blocks(tune))
    if SEARCH_PNG in images:
        blocks.append(Image(SEARCH_PNG, "Autotune search path", images[SEARCH_PNG],
                            caption="Every measured plan in order: perplexity against INT8 "
                                    "coverage; the dashed lines are the budgets."))
    blocks.append(Table(["#", "stage", "action", "coverage", "subset", "ppl", "within"], [
        [str(i), s["stage"], s["action"], f"{100 * s['coverage']:.1f}%", s["subset"],
         f"{s['perplexity']:.4f}",
         "—" if s["stage"] == "method" else "yes" if s["within"] else "no"]
        for i, s in enumerate(tune["path"], 1)], align="rllrlrl"))
    return blocks


def candidate_blocks(tune: Mapping[str, Any]) -> list[Block]:
    """The calibrated exports autotune chose between (SmoothQuant alphas), one row each."""
    candidates = tune.get("candidates") or []
    if not candidates:
        return []
    kinds = list(dict.fromkeys(k for c in candidates for k in c["kinds"]))
    rows = [[c["label"] + (" (tuned)" if c["chosen"] else ""), f"{c['baseline']:.4f}",
             *[f"{c['kinds'][k]['perplexity']:.3f} {c['kinds'][k]['method']}"
               if k in c["kinds"] else "—" for k in kinds],
             f"{c['score']:+.3f}"] for c in candidates]
    return [Para("Candidates: perplexity on the search subset with every group of one op kind "
                 "in INT8 (its best calibration method); the candidate with the lowest sum of "
                 f"increases was tuned, and its engines are built from {tune.get('onnx')}."),
            Table(["candidate", "FP32", *kinds, "Σ increase"], rows,
                  align="lr" + "r" * len(kinds) + "r")]
