"""``quantkit quantize``: model -> verified mixed-precision engine within a perplexity budget."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from quantkit.cli.options import force_option, max_retries_option, ray_option, typed_command


@click.command("quantize")
@click.option("--model", default=None,
              help="Hub id, local directory, .gguf file, or 'smollm2-135m' (embedded default).")
@click.option("--onnx", "onnx_path", type=click.Path(path_type=Path), default=None,
              help="An existing FP32 export (from 'quantkit export --with-nll') instead.")
@click.option("--dataset", default="wikitext", show_default=True,
              help="Text for every role: a local file or folder (cut by line into calibration "
                   "0-40 %, tuning 40-50 %, evaluation 50-100 %), 'sample', or a Hub dataset "
                   "(train / validation / test splits).")
@click.option("--dataset-config", default=None, help="Hub dataset config.")
@click.option("--text-column", default="text", show_default=True)
@click.option("--calibration-split", default=None, help="Override the calibration part.")
@click.option("--tuning-split", default=None, help="Override the tuning part.")
@click.option("--evaluation-split", default=None, help="Override the evaluation part.")
@click.option("--evaluation-dataset", default=None,
              help="Evaluate on another dataset (its --evaluation-split, default 'test').")
@click.option("--max-ppl-increase", default="1%", show_default=True,
              help="Budget over FP32 perplexity: relative (1%) or absolute (0.3).")
@click.option("--objective", type=click.Choice(["coverage", "latency"]), default="coverage",
              show_default=True)
@click.option("--max-length", default=512, show_default=True, type=int,
              help="Deployment context: tuning and evaluation windows (tokens).")
@click.option("--transform", type=click.Choice(["auto", "rotate", "smoothquant", "none"]),
              default="auto", show_default=True,
              help="auto: rotation for RMSNorm (Llama) models, SmoothQuant for LayerNorm ones.")
@click.option("--num-samples", default=128, show_default=True, type=int,
              help="Calibration blocks.")
@click.option("--seq-len", default=256, show_default=True, type=int,
              help="Calibration block length (tokens).")
@click.option("--no-gptq", is_flag=True, help="Round weights to nearest instead of GPTQ.")
@click.option("--search-windows", default=6, show_default=True, type=int,
              help="Windows the search checks plans on.")
@click.option("--holdout-windows", default=12, show_default=True, type=int,
              help="Windows, disjoint from the search's, that must confirm the plan.")
@click.option("--max-evals", default=120, show_default=True, type=int)
@click.option("--time-budget", default=None,
              help="Finish within this time (15m, 900s, 1h): the search stops early at the "
                   "best plan so far, which is still checked on held-out text and verified.")
@click.option("--eval-tokens", default=20480, show_default=True, type=int,
              help="Tokens of the evaluation part scored, in windows spread evenly over it "
                   "(0: all).")
@click.option("--seed", default=0, show_default=True, type=int,
              help="Calibration blocks, rotation and (unless --tuning-seed) the search's windows.")
@click.option("--tuning-seed", default=None, type=int,
              help="Another draw of the search's windows, the rest unchanged (reuses the steps "
                   "before the search).")
@click.option("--threads", type=int, default=None, help="ONNX Runtime intra-op threads.")
@click.option("--trust-remote-code", is_flag=True)
@click.option("--with-cache", is_flag=True,
              help="Also build the plan's KV-cache engine (for 'quantkit generate') and an FP32 "
                   "one, and compare their greedy tokens on a few prompts.")
@click.option("--cache-onnx", type=click.Path(path_type=Path), default=None,
              help="With --onnx --with-cache: the same model's 'export --with-cache' directory.")
@click.option("--generation-tokens", default=32, show_default=True, type=int,
              help="New tokens per prompt of the --with-cache generation check.")
@ray_option("the autotune step's independent measurements (the same plan)")
@max_retries_option
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Work and output directory (reruns reuse its finished steps).")
@force_option
def command(model: str | None, onnx_path: Path | None, dataset: str,
            dataset_config: str | None, text_column: str, calibration_split: str | None,
            tuning_split: str | None, evaluation_split: str | None,
            evaluation_dataset: str | None, max_ppl_increase: str, objective: str,
            max_length: int, transform: str, num_samples: int, seq_len: int, no_gptq: bool,
            search_windows: int, holdout_windows: int, max_evals: int,
            time_budget: str | None, eval_tokens: int,
            seed: int, tuning_seed: int | None, threads: int | None, trust_remote_code: bool,
            with_cache: bool, cache_onnx: Path | None, generation_tokens: int,
            ray_address: str | None, max_retries: int, out: Path, force: bool) -> None:
    """Export, transform, calibrate, autotune, build and evaluate in one command: the quantized
    engine with the most INT8 within --max-ppl-increase of FP32, measured on text no earlier step
    read, beside FP32 and naive INT8. Exit code 3 when the budget is missed there.

    \b
    quantkit quantize --model smollm2-135m --dataset wiki.test.raw --out out/q
    """
    from quantkit.oneshot import quantize as run
    from quantkit.quantize_config import QuantizeConfig, parts_for

    config = QuantizeConfig(
        model=model, onnx=onnx_path,
        parts=parts_for(dataset, dataset_config, text_column, calibration_split, tuning_split,
                        evaluation_split, evaluation_dataset),
        max_ppl_increase=max_ppl_increase, objective=objective, max_length=max_length,
        transform=transform, num_samples=num_samples, seq_len=seq_len, gptq=not no_gptq,
        search_windows=search_windows, holdout_windows=holdout_windows, max_evals=max_evals,
        time_budget=time_budget,
        eval_tokens=eval_tokens or None, seed=seed, tuning_seed=tuning_seed, threads=threads,
        trust_remote_code=trust_remote_code, ray=ray_address, max_retries=max_retries,
        with_cache=with_cache, cache_onnx=cache_onnx, generation_tokens=generation_tokens)
    result = run(config, out, force=force, say=click.echo,
                 command=typed_command(click.get_current_context()),
                 progress=sys.stderr.isatty())
    print_result(result, out)


def print_result(result: Any, out: Path) -> None:
    """The comparison table and where everything is; exit code 3 when the budget is missed."""
    from quantkit.quantize_config import EXIT_BUDGET_MISSED

    click.echo("")
    max_length = result.max_length
    for label in result.perplexity:
        latency = result.p50_ms.get(label)
        click.echo(f"{label:>11}: perplexity {result.perplexity[label]:.4f} "
                   f"({result.delta_pct[label]:+.2f}% vs FP32)"
                   + (f", p50 {latency:.1f} ms at 1x{max_length}" if latency else
                      ", accuracy only (float16 emulated in float32)" if label == "fp16"
                      else ""))
    if result.coverage is not None:
        click.echo(f"INT8 coverage of the quantized engine: {100 * result.coverage:.1f}% of "
                   "linear-layer MACs")
    if result.generation is not None:
        from quantkit.generation_check import describe

        click.echo(f"KV-cache engine: {result.cache_engine} ({describe(result.generation)}); "
                   f"run it with 'quantkit generate --engine {result.cache_engine} --prompt ...'")
    for note in result.notes:
        click.echo(f"Note: {note}")
    click.echo(f"Engine: {result.engine}  Plan: {result.plan}  Report: "
               f"{out / 'report' / 'report.html'}  ({result.seconds:.0f} s)")
    if not result.met_budget:
        sys.exit(EXIT_BUDGET_MISSED)
