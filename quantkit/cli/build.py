"""``quantkit build``: FP32 ONNX + precision plan + calibration table -> engine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from quantkit.cli.options import force_option, trust_remote_code_option


@click.command("build")
@click.option("--onnx", "onnx_path", type=click.Path(path_type=Path),
              help="FP32 export (directory or .onnx file) from 'quantkit export'.")
@click.option("--model", metavar="MODEL",
              help="Export this model first (Hub id, HF directory, .gguf, 'smollm2-135m').")
@click.option("--table", type=click.Path(path_type=Path),
              help="Calibration table (JSON) from 'quantkit calibrate'; needed for int8/mixed.")
@click.option("--precision", required=True, metavar="fp32|fp16|int8|mixed",
              help="Engine precision; 'mixed' needs --plan.")
@click.option("--plan", "plan_path", type=click.Path(path_type=Path),
              help="Precision recipe (YAML), e.g. configs/mixed-safe.yaml.")
@click.option("--backend", default="onnxruntime", show_default=True,
              help="onnxruntime (CPU, or CUDA when present) or tensorrt.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Engine directory.")
@click.option("--per-tensor-weights", is_flag=True,
              help="Quantize weights per tensor instead of per output channel.")
@click.option("--shared-inputs", default=None, metavar="fuse|dedicated",
              help="INT8 MatMuls sharing an input: merge them (fuse, default) or give each its "
                   "own Q/DQ pair (dedicated).")
@click.option("--fp16-fallback", is_flag=True,
              help="Keep fp16 ops that the execution provider cannot run in float16 in fp32 "
                   "(recorded in the manifest) instead of failing.")
@click.option("--provider", default=None,
              help="ONNX Runtime execution provider to build for (default: CUDA if present, "
                   "else CPU).")
@click.option("--option", "extra", multiple=True, metavar="KEY=VALUE",
              help="Backend build option (repeatable; VALUE is read as YAML), e.g. for tensorrt "
                   "--option mode=explicit --option qdq_onnx=ENGINE/engine.onnx.")
@trust_remote_code_option
@force_option
def command(onnx_path: Path | None, model: str | None, table: Path | None, precision: str,
            plan_path: Path | None, backend: str, out: Path, per_tensor_weights: bool,
            shared_inputs: str | None, fp16_fallback: bool, provider: str | None,
            extra: tuple[str, ...], trust_remote_code: bool, force: bool) -> None:
    """Build an engine for ONNX Runtime or TensorRT from an FP32 export.

    \b
    quantkit build --onnx out/export --precision int8 --table out/table.json --out out/int8
    quantkit build --onnx out/export --precision mixed --plan configs/mixed-safe.yaml \\
        --table out/table.json --out out/mixed
    """
    from quantkit.build import build_engine, parse_options
    from quantkit.errors import QuantkitError

    options: dict[str, Any] = {}
    if per_tensor_weights:
        options["per_channel"] = False
    if shared_inputs is not None:
        options["shared_inputs"] = shared_inputs
    if fp16_fallback:
        options["fp16_fallback"] = True
    if provider is not None:
        options["provider"] = provider
    if options and backend != "onnxruntime":
        raise QuantkitError(
            f"--per-tensor-weights/--shared-inputs/--fp16-fallback/--provider are onnxruntime "
            f"options, not {backend} ones", "pass backend options with --option KEY=VALUE")
    options.update(parse_options(extra))
    engine = build_engine(out, precision=precision.lower(), onnx=onnx_path, model=model,
                          table=table, plan=plan_path, backend=backend, options=options,
                          force=force, trust_remote_code=trust_remote_code)
    m = engine.manifest
    line = f"Built {engine.backend} {engine.precision} engine in {engine.path}"
    if "int8_coverage" in m:
        line += f": INT8 coverage {100 * float(m['int8_coverage']):.1f}% of linear-layer MACs"
    if "size_bytes" in m:
        line += f", {int(m['size_bytes']) / 1e6:.1f} MB"
    click.echo(line)
    counts = m.get("as_built_counts")
    if counts:
        click.echo("Nodes as built: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    fusion = m.get("onnxruntime_fusion")
    if fusion:
        kernels = ", ".join(f"{k} {v}" for k, v in sorted(fusion["integer_ops"].items()))
        click.echo(f"ONNX Runtime integer kernels: {kernels or 'none'}; Q/DQ left unfused: "
                   f"{len(fusion['unfused_dequantized_matmuls'])}")
