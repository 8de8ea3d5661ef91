"""``quantkit eval``: perplexity and latency of engines, compared against the FP32 and FP16 ones."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from quantkit.cli.options import force_option, typed_command


@click.command("eval")
@click.option("--engine", "engines", multiple=True, required=True,
              type=click.Path(path_type=Path), metavar="DIR",
              help="Engine directory (repeat to compare engines of one model).")
@click.option("--dataset", default="wikitext", show_default=True,
              help="Hub dataset id, local .txt/.raw/.jsonl/.parquet file or folder, or 'sample'.")
@click.option("--dataset-config", default=None, help="Hub dataset config (wikitext: "
              "wikitext-2-raw-v1).")
@click.option("--split", default="test", show_default=True, help="Dataset split.")
@click.option("--text-column", default="text", show_default=True,
              help="Column holding the text (Hub, .jsonl, .parquet).")
@click.option("--max-length", type=int, default=None,
              help="Window length in tokens [default: 512, or the model's limit if smaller].")
@click.option("--stride", type=int, default=None,
              help="Tokens between window starts [default: max-length, no overlap].")
@click.option("--limit-tokens", type=int, default=None,
              help="Evaluate only the first N tokens of the text (see --spread).")
@click.option("--spread", is_flag=True, default=False,
              help="With --limit-tokens: score N tokens in windows spaced evenly over the whole "
                   "text instead of its first N tokens (text varies along a file).")
@click.option("--batch-size", type=int, default=1, show_default=True,
              help="Windows per engine call.")
@click.option("--latency-grid", default="1x128,1x512", show_default=True,
              help="BATCHxSEQ points to time, comma-separated; 'none' to skip.")
@click.option("--warmup", type=int, default=2, show_default=True,
              help="Untimed iterations per grid point.")
@click.option("--iterations", type=int, default=10, show_default=True,
              help="Timed iterations per grid point.")
@click.option("--ttft-lengths", default="default", show_default=True, metavar="L,L",
              help="KV-cache engines: prompt lengths whose prefill (time to first token) is "
                   "timed; default 128,512,2048 where the model's positions allow; 'none' to "
                   "skip.")
@click.option("--decode-grid", default="default", show_default=True, metavar="BxN,BxN",
              help="KV-cache engines: BATCHxPAST points where one decode step (time per output "
                   "token) is timed; default 1 and 8 x 128, 512, 2048 where the model allows; "
                   "'none' to skip.")
@click.option("--generation-iterations", type=int, default=20, show_default=True,
              help="KV-cache engines: timed runs per TTFT length and decode point (after "
                   "--warmup untimed ones), engines interleaved.")
@click.option("--agreement-prompts", type=int, default=8, show_default=True,
              help="KV-cache engines: prompts cut from the evaluation text whose greedy tokens "
                   "are compared with the FP32 engine's; 0 to skip.")
@click.option("--agreement-prompt-tokens", type=int, default=64, show_default=True,
              help="Tokens per agreement prompt.")
@click.option("--agreement-new-tokens", type=int, default=32, show_default=True,
              help="Greedy tokens generated after each agreement prompt.")
@click.option("--threads", type=int, default=None,
              help="CPU threads for ONNX Runtime [default: every core].")
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Results JSON (schema quantkit.results/1).")
@click.option("--progress/--no-progress", default=None,
              help="Progress bar over windows [default: when stderr is a terminal].")
@click.option("--allow-overlap", is_flag=True,
              help="Evaluate on text that shares records with an engine's calibration or tuning "
                   "text (refused otherwise).")
@force_option
def command(engines: tuple[Path, ...], dataset: str, dataset_config: str | None, split: str,
            text_column: str, max_length: int | None, stride: int | None,
            limit_tokens: int | None, spread: bool, batch_size: int, latency_grid: str,
            warmup: int, iterations: int, ttft_lengths: str, decode_grid: str,
            generation_iterations: int,
            agreement_prompts: int, agreement_prompt_tokens: int, agreement_new_tokens: int,
            threads: int | None, out: Path, progress: bool | None, allow_overlap: bool,
            force: bool) -> None:
    """Measure perplexity (sliding windows) and latency of each engine on the same text.

    Engines must come from one model and tokenizer. Deltas are against the run's fp32 and fp16
    engines. Engines built from a KV-cache export ('export --with-cache') are scored token by
    token through their cache (same perplexity, one run per token: use --limit-tokens) and get
    generation numbers instead of the full-pass latency grid: time to first token, time per
    output token, tokens/s, and the share of greedy tokens equal to the FP32 engine's. The
    text must not share records with the text an engine was calibrated or tuned on
    (local files cut with --split slices such as 'test[50%:]'). Example:

      quantkit eval --engine out/fp32 --engine out/int8 --dataset wiki.test.raw
      --limit-tokens 20000 --out results.json
    """
    from quantkit.artifacts import check_can_write
    from quantkit.eval.evaluate import EvalConfig, evaluate_engines
    from quantkit.eval.generation import (
        GenerationConfig,
        parse_decode_grid,
        parse_prompt_lengths,
    )
    from quantkit.eval.latency import parse_grid
    from quantkit.eval.results import write_results

    check_can_write(out, force)
    _check_tensorrt_engines(engines)
    lengths, points = parse_prompt_lengths(ttft_lengths), parse_decode_grid(decode_grid)
    generation = GenerationConfig(
        prompt_lengths=None if lengths is None else tuple(lengths),
        decode_grid=None if points is None else tuple(points),
        iterations=generation_iterations, agreement_prompts=agreement_prompts,
        agreement_prompt_tokens=agreement_prompt_tokens,
        agreement_new_tokens=agreement_new_tokens)
    config = EvalConfig(
        dataset=dataset, dataset_config=dataset_config, split=split, text_column=text_column,
        max_length=max_length, stride=stride, limit_tokens=limit_tokens, spread=spread,
        batch_size=batch_size, latency_grid=tuple(parse_grid(latency_grid)), warmup=warmup,
        iterations=iterations, threads=threads, allow_overlap=allow_overlap, generation=generation,
    )
    if progress is None:
        progress = sys.stderr.isatty()
    command_line = typed_command(click.get_current_context())
    results = evaluate_engines(list(engines), config, command=command_line, progress=progress)
    write_results(results, out, force=force)
    _print_table(results)
    _print_generation(results)
    for role in results.dataset.get("roles") or []:
        click.echo(f"Text {role['label']}")
    for clash in results.dataset.get("overlaps") or []:
        click.echo(f"Warning: {clash} (allowed by --allow-overlap)", err=True)
    click.echo(f"Wrote {out}")


def _check_tensorrt_engines(engines: tuple[Path, ...]) -> None:
    """TensorRT engines need TensorRT and a CUDA GPU: say so before any text is read. Other
    problems with the directories are reported, in order, by the evaluation itself."""
    from quantkit.artifacts import MANIFEST_NAME, read_json
    from quantkit.errors import QuantkitError

    for path in engines:
        manifest = Path(path) / MANIFEST_NAME
        try:
            data = read_json(manifest) if manifest.is_file() else {}
        except QuantkitError:  # a broken manifest is reported by the evaluation's own checks
            data = {}
        if isinstance(data, dict) and data.get("backend") == "tensorrt":
            from quantkit.backends.tensorrt import require_tensorrt_gpu

            require_tensorrt_gpu()
            return


def _print_table(results: Any) -> None:
    from rich.table import Table

    from quantkit.report.fmt import signed_percent

    data = results.dataset
    table = Table(title=f"{data['num_tokens']} tokens, {data['num_windows']} windows of "
                        f"{data['max_length']} (stride {data['stride']})")
    for column in ("engine", "precision", "int8", "perplexity", "vs fp32", "vs fp16", "size MB"):
        table.add_column(column, justify="left" if column in ("engine", "precision") else "right")
    cache_run = any(e.generation is not None for e in results.engines)
    grid = [] if cache_run else results.settings["latency_grid"]
    for point in grid:
        table.add_column(f"p50 ms {point}", justify="right")
    for eng in results.engines:
        cells = [
            eng.name, eng.precision,
            "-" if eng.int8_coverage is None else f"{100 * eng.int8_coverage:.0f}%",
            f"{eng.perplexity:.3f}",
            "-" if eng.delta_vs_fp32 is None else signed_percent(eng.delta_vs_fp32.pct),
            "-" if eng.delta_vs_fp16 is None else signed_percent(eng.delta_vs_fp16.pct),
            "-" if eng.size_bytes is None else f"{eng.size_bytes / 1e6:.1f}",
        ]
        cells += [f"{p.p50_ms:.1f}" for p in eng.latency]
        table.add_row(*cells)
    _console().print(table)


def _console() -> Any:
    from rich.console import Console

    console = Console()
    if not console.is_terminal:
        console = Console(width=200)  # a log or pipe: don't squeeze the table into 80 columns
    return console


def _print_generation(results: Any) -> None:
    """TTFT, time per output token, tokens/s and greedy-token agreement of cache engines."""
    from rich.table import Table

    engines = [e for e in results.engines if e.generation is not None]
    if not engines:
        return
    settings = results.settings.get("generation") or {}
    first = engines[0].generation
    table = Table(title=f"Generation (p50 of {settings.get('iterations')} runs, engines "
                        "interleaved; decode steps against a zero-filled cache)")
    table.add_column("engine")
    for p in first.ttft:
        table.add_column(f"TTFT ms {p.tokens}", justify="right")
    for p in first.decode:
        table.add_column(f"ms/token {p.batch}x{p.past}", justify="right")
    for p in first.decode:
        table.add_column(f"tok/s {p.batch}x{p.past}", justify="right")
    table.add_column("tokens = fp32", justify="right")
    table.add_column("teacher-forced", justify="right")
    table.add_column("common prefix", justify="right")
    for eng in engines:
        gen = eng.generation
        agreed = gen.agreement
        table.add_row(
            eng.name, *[f"{p.p50_ms:.1f}" for p in gen.ttft],
            *[f"{p.p50_ms:.2f}" for p in gen.decode],
            *[f"{p.tokens_per_s:.1f}" for p in gen.decode],
            "-" if agreed is None else f"{100 * agreed.token_match:.1f}%",
            "-" if agreed is None or agreed.teacher_forced is None
            else f"{100 * agreed.teacher_forced:.1f}%",
            "-" if agreed is None else f"{agreed.mean_common_prefix:.1f}/{agreed.new_tokens}")
    _console().print(table)
    if settings.get("dropped"):
        click.echo(f"Beyond the model's positions, not measured: {', '.join(settings['dropped'])}")
