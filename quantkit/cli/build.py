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
              help="Calibration table (JSON) from 'quantkit calibrate'; needed for int8/mixed "
                   "(TensorRT 10 can calibrate itself instead: --dataset).")
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
@click.option("--fp16-emulate", is_flag=True,
              help="onnxruntime: compute fp16 ops in float32 with every value rounded to float16 "
                   "where a float16 engine stores it: FP16's perplexity on a CPU without "
                   "float16 kernels (an accuracy-only engine: no latency is measured).")
@click.option("--provider", default=None,
              help="ONNX Runtime execution provider to build for (default: CUDA if present, "
                   "else CPU).")
@click.option("--weight-layout", default=None, metavar="auto|s8|u8|s7",
              help="onnxruntime: how INT8 weights are stored. auto (default) picks for this "
                   "machine's CPU: s8 (int8, u8 x s8 kernels) where they are exact (VNNI, ARM), "
                   "u8 (the same values as uint8 + 128, u8 x u8 kernels) on x86 without VNNI, "
                   "where u8 x s8 saturates; s7: 7-bit weights. Name one to build for another "
                   "machine ('quantkit doctor' says what this one gets).")
@click.option("--activations", type=click.Choice(["static", "dynamic", "blockwise"]),
              default=None,
              help="onnxruntime INT8: static (default) quantizes activations with the table's "
                   "scales, as TensorRT does; dynamic measures each INT8 MatMul input's range "
                   "when it runs (ONNX Runtime's DynamicQuantizeLinear; the table still sets "
                   "nothing else); blockwise quantizes each row per block of 32 when it runs "
                   "(MatMulNBits, the built weights; CPUs with VNNI and ARM).")
@click.option("--attention", type=click.Choice(["auto", "fused", "graph"]), default=None,
              help="onnxruntime, KV-cache graphs: fused replaces each layer's attention by one "
                   "ONNX Attention node (opset 23, float: a plan's INT8 attention MatMuls run "
                   "in float there), checked against the export; graph keeps the exported "
                   "nodes; auto (default) fuses where the pattern matches and the check "
                   "passes.")
@click.option("--option", "extra", multiple=True, metavar="KEY=VALUE",
              help="Backend build option (repeatable; VALUE is read as YAML), e.g. for tensorrt "
                   "--option workspace_mib=4096 --option calibrator=minmax.")
@click.option("--profile", "profiles", multiple=True, metavar="MIN:OPT:MAX",
              help="Optimization profile as BATCHxSEQ triples, e.g. 1x1:1x512:8x512 "
                   "(repeatable) [default: 1x1:1x512:8x512]; a KV-cache graph's adds its past "
                   "tokens, e.g. 1x1:1x1:8x1,past=1:512:2047 [default there: a prefill and a "
                   "decode profile].")
@click.option("--mode", "trt_mode", default=None, metavar="auto|implicit|explicit",
              help="Quantization path: implicit (TensorRT 10 calibrator / table as cache), "
                   "explicit (strongly typed Q/DQ ONNX; the only one on TensorRT 11) "
                   "[default: auto].")
@click.option("--constraints", default=None, metavar="obey|prefer",
              help="Implicit path: per-layer precisions are obeyed (a layer that cannot run so "
                   "fails the build) or preferred [default: obey].")
@click.option("--timing-cache", type=click.Path(path_type=Path), default=None,
              help="Timing cache file, read before and extended after each build.")
@click.option("--dataset", default=None,
              help="Calibrate inside the TensorRT 10 build (instead of --table) on this text: "
                   "'sample', a local .txt/.raw/.jsonl/.parquet file or folder, or a Hub id.")
@click.option("--dataset-config", default=None, help="Hub dataset config, with --dataset.")
@click.option("--split", default=None, help="Split of --dataset [default: train].")
@click.option("--text-column", default=None, help="Text column of --dataset [default: text].")
@click.option("--num-samples", type=int, default=None,
              help="Token blocks to calibrate on, with --dataset [default: 512].")
@click.option("--seq-len", type=int, default=None,
              help="Tokens per block (the calibration shape's seq), with --dataset "
                   "[default: 512].")
@click.option("--batch-size", type=int, default=None,
              help="Blocks per calibration batch (the calibration shape's batch), with "
                   "--dataset [default: 8].")
@click.option("--seed", type=int, default=None,
              help="Seed of the block sampling, with --dataset [default: 0].")
@trust_remote_code_option
@force_option
def command(onnx_path: Path | None, model: str | None, table: Path | None, precision: str,
            plan_path: Path | None, backend: str, out: Path, per_tensor_weights: bool,
            shared_inputs: str | None, fp16_fallback: bool, fp16_emulate: bool,
            provider: str | None,
            weight_layout: str | None, activations: str | None, attention: str | None,
            extra: tuple[str, ...],
            profiles: tuple[str, ...],
            trt_mode: str | None,
            constraints: str | None, timing_cache: Path | None, dataset: str | None,
            dataset_config: str | None, split: str | None, text_column: str | None,
            num_samples: int | None, seq_len: int | None, batch_size: int | None,
            seed: int | None, trust_remote_code: bool, force: bool) -> None:
    """Build an engine for ONNX Runtime or TensorRT from an FP32 export.

    \b
    quantkit build --onnx out/export --precision int8 --table out/table.json --out out/int8
    quantkit build --onnx out/export --precision mixed --plan configs/mixed-safe.yaml \\
        --table out/table.json --out out/mixed
    quantkit build --backend tensorrt --onnx out/export --precision int8 \\
        --dataset wiki.test.raw --num-samples 64 --seq-len 512 --batch-size 8 --out out/trt-int8
    """
    from quantkit.build import CalibrationData, build_engine, parse_options
    from quantkit.errors import QuantkitError

    options: dict[str, Any] = {}
    if per_tensor_weights:
        options["per_channel"] = False
    if shared_inputs is not None:
        options["shared_inputs"] = shared_inputs
    if fp16_fallback:
        options["fp16_fallback"] = True
    if fp16_emulate:
        options["fp16"] = "emulate"
    if provider is not None:
        options["provider"] = provider
    if weight_layout is not None:
        options["weight_layout"] = weight_layout.lower()
    if activations is not None:
        options["activations"] = activations
    if attention is not None:
        options["attention"] = attention
    if options and backend != "onnxruntime":
        raise QuantkitError(
            f"--per-tensor-weights/--shared-inputs/--fp16-fallback/--fp16-emulate/--provider/"
            f"--weight-layout/--activations/--attention are onnxruntime "
            f"options, not {backend} ones", "pass backend options with --option KEY=VALUE")
    trt_options: dict[str, Any] = {}
    if profiles:
        trt_options["profiles"] = [parse_profile(p) for p in profiles]
    for key, value in (("mode", trt_mode), ("constraints", constraints),
                       ("timing_cache", str(timing_cache) if timing_cache else None)):
        if value is not None:
            trt_options[key] = value
    text = {"dataset_config": dataset_config, "split": split, "text_column": text_column,
            "num_samples": num_samples, "seq_len": seq_len, "batch_size": batch_size,
            "seed": seed}
    given_text = {k: v for k, v in text.items() if v is not None}
    if given_text and dataset is None:
        flags = ", ".join("--" + k.replace("_", "-") for k in given_text)
        raise QuantkitError(f"{flags} describe calibration text and need --dataset",
                            "add --dataset, or drop them (a --table needs none)")
    if (trt_options or dataset is not None) and backend != "tensorrt":
        raise QuantkitError(
            "--profile/--mode/--constraints/--timing-cache/--dataset are tensorrt options, not "
            f"{backend} ones",
            "pass --backend tensorrt; ONNX Runtime INT8 builds take --table from 'quantkit "
            "calibrate'")
    extra_options = parse_options(extra)
    clash = sorted(set(extra_options) & set(trt_options))
    if clash:
        raise QuantkitError(f"--option {', '.join(clash)} repeats a dedicated flag",
                            "give each setting once")
    options.update(trt_options)
    options.update(extra_options)
    calibration = None
    if dataset is not None:
        calibration = CalibrationData(dataset=dataset, **given_text)
    engine = build_engine(out, precision=precision.lower(), onnx=onnx_path, model=model,
                          table=table, plan=plan_path, backend=backend, options=options,
                          force=force, trust_remote_code=trust_remote_code,
                          calibration=calibration)
    m = engine.manifest
    if engine.backend == "tensorrt":
        _print_tensorrt(engine.path, m)
        return
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
    layout = m.get("weight_layout")
    if layout:
        click.echo(f"INT8 weights: {layout['layout']} ({layout['reason']})")
    attention = m.get("attention") or {}
    if attention.get("fused"):
        moved = len(attention["planned_int8_now_float"])
        click.echo(f"Attention: {attention['layers']} layers fused into one {attention['op']} "
                   f"node each ({attention['removed_nodes']} nodes fewer)"
                   + (f"; {moved} MatMuls the plan had in INT8 run in float inside it"
                      if moved else ""))
    elif m.get("cache") and attention.get("reason"):
        click.echo(f"Attention: as exported ({attention['reason']})")


def parse_profile(text: str) -> dict[str, list[int]]:
    """``"1x1:1x512:8x512"`` -> ``{"min": [1, 1], "opt": [1, 512], "max": [8, 512]}``; a KV-cache
    graph's profile adds its past length: ``"1x1:1x1:8x1,past=1:512:2047"`` -> ``past: [1, 512,
    2047]``."""
    from quantkit.errors import QuantkitError

    usage = ("write e.g. --profile 1x1:1x512:8x512, and for a KV-cache graph "
             "--profile 1x1:1x1:8x1,past=1:512:2047")
    shapes_text, sep, past_text = text.partition(",")
    parts = shapes_text.split(":")
    shapes: list[list[int]] = []
    for part in parts:
        batch, x, seq = part.strip().lower().partition("x")
        if len(parts) != 3 or not x or not batch.isdigit() or not seq.isdigit():
            raise QuantkitError(f"--profile '{text}' is not MIN:OPT:MAX of BATCHxSEQ", usage)
        shapes.append([int(batch), int(seq)])
    profile = {"min": shapes[0], "opt": shapes[1], "max": shapes[2]}
    if sep:
        key, eq, values = past_text.strip().partition("=")
        past = values.split(":")
        if key.strip().lower() != "past" or not eq or len(past) != 3 or not all(
                v.strip().isdigit() for v in past):
            raise QuantkitError(f"--profile '{text}': after the comma comes past=MIN:OPT:MAX "
                                "(past tokens of a KV-cache graph)", usage)
        profile["past"] = [int(v) for v in past]
    return profile


def _print_tensorrt(path: Path, m: Any) -> None:
    info = m.get("tensorrt") or {}
    line = (f"Built tensorrt {m.get('precision')} engine in {path}: TensorRT "
            f"{info.get('version')}, {info.get('path')} path")
    if info.get("strongly_typed"):
        line += " (strongly typed)"
    if "size_bytes" in m:
        line += f", {int(m['size_bytes']) / 1e6:.1f} MB"
    click.echo(line)
    precisions = (info.get("layer_precisions") or {}).get("by_precision") or {}
    if precisions:
        click.echo("Engine layers by precision (engine inspector): "
                   + ", ".join(f"{k} {v}" for k, v in precisions.items()))
    coverage = m.get("int8_coverage")
    if coverage is not None:
        click.echo(f"INT8 coverage: {100 * float(coverage):.1f}% of the plan's INT8 nodes run in "
                   "INT8 engine layers")
    calibration = info.get("calibration")
    if calibration:
        how = ("scales from the given table/cache" if calibration.get("used_cache") else
               f"{calibration.get('batches_fed')} batches through TensorRT's "
               f"{calibration.get('algorithm')}")
        click.echo(f"Calibration: {how}")
    if info.get("warnings"):
        click.echo(f"TensorRT warnings: {info['warnings']} (see {path / 'build_log.txt'})")
