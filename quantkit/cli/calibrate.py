"""``quantkit calibrate``: activation ranges (INT8 scales) from calibration text."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

from quantkit.cli.options import force_option, trust_remote_code_option

METHODS = "entropy, minmax, percentile, mse"


@click.command("calibrate")
@click.option("--model", metavar="MODEL",
              help="Export this model first: Hub id, local HF directory, .gguf file, or "
                   "'smollm2-135m' (embedded).")
@click.option("--onnx", type=click.Path(path_type=Path),
              help="An FP32 export directory (or its model.onnx) from 'quantkit export'.")
@click.option("--dataset", default="wikitext", show_default=True,
              help="'sample' (bundled), a local .txt/.raw/.jsonl/.parquet file or folder, or a "
                   "Hugging Face dataset id.")
@click.option("--dataset-config", default=None, help="Hub dataset config (wikitext: "
                                                      "wikitext-2-raw-v1).")
@click.option("--split", default="train", show_default=True)
@click.option("--text-column", default="text", show_default=True)
@click.option("--num-samples", default=512, show_default=True, type=int,
              help="Token blocks to calibrate on.")
@click.option("--seq-len", default=512, show_default=True, type=int)
@click.option("--batch-size", default=8, show_default=True, type=int)
@click.option("--seed", default=0, show_default=True, type=int,
              help="Seed of the block sampling.")
@click.option("--method", default="entropy", show_default=True, help=f"One of: {METHODS}.")
@click.option("--percentile", type=float, default=None,
              help="For --method percentile (default 99.99).")
@click.option("--tensors", type=click.Choice(["all", "quantizable"]), default="all",
              show_default=True,
              help="all: every float activation (what a TensorRT cache may need); quantizable: "
                   "the activation inputs of MatMul/Gemm.")
@click.option("--trt-version", default=None,
              help="TensorRT version the calibration.cache is for (default: the installed "
                   "one, else 10.13.0).")
@click.option("--smoothquant", "alpha", default=None, metavar="ALPHA",
              help="SmoothQuant first (alpha in 0..1, e.g. 0.5, or 'auto': per layer, the "
                   "alpha whose fake-quantized output is closest): writes OUT/smoothed/, the "
                   "rewritten FP32 export the ranges belong to; build engines from it.")
@click.option("--weights", "weight_rounding", type=click.Choice(["rtn", "gptq"]), default="rtn",
              show_default=True,
              help="INT8 weights: rtn rounds each to nearest at build time; gptq (Frantar et "
                   "al.) rounds them against the calibration activations and writes "
                   "weights.npz, which INT8 builds and autotune then use (worth it after "
                   "'quantkit rotate').")
@click.option("--gptq-samples", default=64, show_default=True, type=int,
              help="Calibration blocks that GPTQ's activation statistics come from.")
@click.option("--gptq-memory", default=None, metavar="SIZE",
              help="Most memory GPTQ's Hessians may hold at once, e.g. 2GB (default: half the "
                   "model's FP32 weights, at least 1 GiB); less memory means more passes over "
                   "the GPTQ samples, a group of layers each. Same weights either way.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output directory.")
@trust_remote_code_option
@force_option
def command(model: str | None, onnx: Path | None, dataset: str, dataset_config: str | None,
            split: str, text_column: str, num_samples: int, seq_len: int, batch_size: int,
            seed: int, method: str, percentile: float | None, tensors: str,
            trt_version: str | None, alpha: str | None, weight_rounding: str,
            gptq_samples: int, gptq_memory: str | None, out: Path, trust_remote_code: bool,
            force: bool) -> None:
    """Run the FP32 model over calibration text and write INT8 ranges to OUT: table.json,
    calibration.cache (TensorRT), stats.npz (histograms), summary.json and manifest.json."""
    from quantkit.calib.run import CalibrationRequest, run_calibration
    from quantkit.config import parse_size
    from quantkit.errors import QuantkitError

    params: dict[str, Any] = {}
    if percentile is not None:
        if method != "percentile":
            raise QuantkitError("--percentile applies to --method percentile only")
        params["percentile"] = percentile
    request = CalibrationRequest(
        model=model, onnx=onnx, dataset=dataset, dataset_config=dataset_config, split=split,
        text_column=text_column, num_samples=num_samples, seq_len=seq_len,
        batch_size=batch_size, seed=seed, method=method, params=params, tensors=tensors,
        trt_version=trt_version, trust_remote_code=trust_remote_code, smoothquant=alpha,
        weights=weight_rounding, gptq_samples=gptq_samples,
        gptq_memory=None if gptq_memory is None else parse_size(gptq_memory))
    request.validate()

    with _Progress() as bar:
        result = run_calibration(request, out, force=force, progress=bar.advance,
                                 on_blocks=bar.start)
    s, table = result.stats, result.table
    click.echo(f"Calibrated {len(table.amax)} tensors ({table.method}) on {s.num_samples} "
               f"blocks, {s.num_tokens} tokens; skipped {len(table.skipped)} "
               f"({', '.join(f'{k}: {v}' for k, v in result.summary['skip_reasons'].items())})")
    for row in result.summary["largest_amax"][:5]:
        click.echo(f"  amax {row['amax']:10.4g}  clipped {row['clipped_fraction']:.2e}  "
                   f"{row['tensor']}")
    if table.weights:
        gain = result.manifest["inputs"]["weights"]["rtn_to_gptq_output_error"]
        click.echo(f"GPTQ: {len(table.weights)} int8 weights; layer output error "
                   f"{gain['median']:.2f}x lower than round-to-nearest (median, "
                   f"least {gain['min']:.2f}x)")
    click.echo(f"Wrote {result.directory} (table.json, calibration.cache, stats.npz, "
               f"{'weights.npz, ' if table.weights else ''}summary.json, manifest.json)")
    if alpha is not None:
        click.echo(f"SmoothQuant (alpha {request.smoothquant}): build engines from "
                   f"{result.directory / 'smoothed'}")


class _Progress:
    """A rich progress bar over batches with tokens/s, on stderr.

    The bar starts only once the blocks are chosen: an error before that (bad data, too little
    text) is then the command's only output, not a line after an empty bar's blank line."""

    def __enter__(self) -> _Progress:
        self.progress: Any = None
        self.task: Any = None
        self.started = time.perf_counter()
        self.first: tuple[float, int] | None = None
        return self

    def start(self, blocks: Any) -> None:
        from quantkit.progress import progress_bar

        self.progress = progress_bar("calibrating",
                                     "batches  {task.fields[tokens_per_s]:,.0f} tokens/s")
        self.progress.__enter__()
        self.started = time.perf_counter()
        self.first = None
        self.task = self.progress.add_task("calibrate", total=len(blocks), tokens_per_s=0.0)

    def advance(self, batches: int, tokens: int) -> None:
        """Rate over the batches after the first (the first also pays for loading the model)."""
        if self.task is None:
            return
        now = time.perf_counter()
        if self.first is None:
            self.first = (now, tokens)
            rate = tokens / max(now - self.started, 1e-9)
        else:
            rate = (tokens - self.first[1]) / max(now - self.first[0], 1e-9)
        self.progress.update(self.task, completed=batches, tokens_per_s=rate)

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.__exit__(*exc)
