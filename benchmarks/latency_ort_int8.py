"""ONNX Runtime CPU latency: FP32 vs quantkit INT8 (Q/DQ) vs ONNX Runtime's own quantize_static.

For each model (GPT-2 124M shape with random weights, SmolLM2-135M) and each BATCHxSEQ shape it
reports the p50 latency of N timed runs after warm-up (the three models are run in turn within
every iteration, so load from other processes hits all of them alike), the ratios, and the
largest |logit difference| against FP32 on held-out text.

Both INT8 models calibrate on the same batches with MinMax, i.e. max|x| per tensor over the
batches (quantize_static with CalibrationMethod.MinMax and symmetric activations; quantkit with
its own collector and the ``minmax`` algorithm). Both are W8A8 with
symmetric int8 activations and per-channel int8 weights in QDQ format, and quantize every
MatMul/Gemm (quantkit: configs/int8.yaml).

    python benchmarks/latency_ort_int8.py                       # full grid (~10 min on 2 cores)
    python benchmarks/latency_ort_int8.py --models gpt2-124m --shapes 1x128 --iterations 5

SmolLM2-135M needs its GGUF (fetched by quantkit into $QUANTKIT_CACHE) or an FP32 export without
the nll output passed with --smollm2-onnx.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

MODELS = ("gpt2-124m", "smollm2-135m")
SHARED = Path(os.environ.get("QUANTKIT_SHARED", REPO.parent / "shared"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help="comma list of: " + ", ".join(MODELS))
    p.add_argument("--shapes", default="1x128,1x512,4x128,4x512", help="BATCHxSEQ list")
    p.add_argument("--iterations", type=int, default=6, help="timed runs per model and shape")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before timing")
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    p.add_argument("--metric", default="wall", choices=["wall", "cpu"],
                   help="wall: wall-clock time per run; cpu: process CPU time per run with one "
                        "thread (robust to other load on the machine; forces --threads 1)")
    p.add_argument("--plan", type=Path, default=REPO / "configs" / "int8.yaml",
                   help="quantkit precision recipe (default: every MatMul/Gemm INT8)")
    p.add_argument("--calib-samples", type=int, default=4, help="calibration blocks (batch 1)")
    p.add_argument("--calib-seq", type=int, default=512,
                   help="calibration block length (cover the longest benchmarked sequence)")
    p.add_argument("--smollm2-onnx", type=Path, default=None,
                   help="existing FP32 export (model.onnx or its directory) without nll")
    p.add_argument("--workdir", type=Path, default=None, help="keep exports and models here")
    p.add_argument("--shared-inputs", default="fuse", choices=["fuse", "dedicated"],
                   help="quantkit's handling of activations feeding several MatMuls")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    return p.parse_args(argv)


# -- models ------------------------------------------------------------------------------------
def export_gpt2(workdir: Path) -> tuple[Path, Any]:
    """GPT-2 124M shape (GPT2Config()), random weights, biases randomised like trained ones."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from quantkit.export import export_model
    from quantkit.models import LoadedModel, ModelSpec

    out = workdir / "gpt2-124m"
    tokenizer = gpt2_tokenizer()
    if not (out / "model.onnx").is_file():
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config()).eval()
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("bias"):
                    param.normal_(0.0, 0.02)
        export_model(LoadedModel(model, tokenizer, ModelSpec("dir", "gpt2-124m-random"),
                                 {"kind": "random", "config": "GPT2Config()"}), out, force=True)
    return out / "model.onnx", tokenizer


def gpt2_tokenizer() -> Any:
    vocab = SHARED / "tokenizers" / "gpt2" / "vocab.json"
    if not vocab.is_file():
        return None
    from transformers import GPT2Tokenizer

    from quantkit.models import check_tokenizer

    # `vocab=`/`merges=` paths: transformers 5 builds an empty tokenizer from vocab_file=
    return check_tokenizer(GPT2Tokenizer(vocab=str(vocab), merges=str(vocab.parent / "merges.txt")),
                           vocab.parent)


def export_smollm2(workdir: Path, given: Path | None) -> tuple[Path, Any]:
    from transformers import AutoTokenizer

    from quantkit.export import export_model, find_onnx
    from quantkit.models import load_model

    if given is not None:
        onnx_path = find_onnx(given)
    else:
        out = workdir / "smollm2-135m"
        if not (out / "model.onnx").is_file():
            export_model(load_model("smollm2-135m"), out, force=True)
        onnx_path = out / "model.onnx"
    tok_dir = onnx_path.parent / "tokenizer"
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir)) if tok_dir.is_dir() else None
    return onnx_path, tokenizer


# -- data ----------------------------------------------------------------------------------------
def token_batches(tokenizer: Any, split: str, n: int, batch: int, seq: int, vocab: int,
                  seed: int) -> list[dict[str, np.ndarray]]:
    """Blocks of real text from the bundled sample (random ids if no tokenizer)."""
    if tokenizer is not None:
        from quantkit.data import TokenBlocks, resolve_text_source

        blocks = TokenBlocks(resolve_text_source("sample", split=split), tokenizer,
                             seq_len=seq, num_samples=n * batch, batch_size=batch, seed=seed)
        return list(blocks)
    rng = np.random.default_rng(seed)
    return [{"input_ids": rng.integers(0, vocab, (batch, seq), dtype=np.int64),
             "attention_mask": np.ones((batch, seq), np.int64)} for _ in range(n)]


def ort_quantize_static(onnx_path: Path, out: Path, batches: list[dict[str, np.ndarray]]) -> Path:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

    quantize_static(
        str(onnx_path), str(out), Reader(), quant_format=QuantFormat.QDQ,
        op_types_to_quantize=["MatMul", "Gemm"], per_channel=True,
        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
    )
    return out


# -- measuring -----------------------------------------------------------------------------------
def session(path: Path, threads: int, optimized: Path | None = None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def fusion(optimized: Path) -> dict[str, Any]:
    import onnx

    from quantkit.backends.onnxruntime import fusion_report

    report = fusion_report(onnx.load(str(optimized), load_external_data=False))
    return {"integer_ops": sum(report["integer_ops"].values()),
            "unfused": len(report["unfused_dequantized_matmuls"])}


def bench_model(name: str, onnx_path: Path, tokenizer: Any, args: argparse.Namespace,
                workdir: Path) -> list[dict[str, Any]]:
    import onnx

    from quantkit.build import build_engine
    from quantkit.calib import calibrate
    from quantkit.calib.collect import collect_activation_stats

    vocab = int(onnx.load(str(onnx_path), load_external_data=False).graph.output[0]
                .type.tensor_type.shape.dim[2].dim_value or 50257)
    t0 = time.perf_counter()
    calib = token_batches(tokenizer, "train", args.calib_samples, 1, args.calib_seq, vocab, 0)
    # quantkit's own calibration (MinMax over the same batches quantize_static sees)
    stats = collect_activation_stats(onnx_path, calib, tensors="quantizable",
                                     data={"source": "calib_data/sample train",
                                           "samples": args.calib_samples,
                                           "seq_len": args.calib_seq})
    table = calibrate(stats, "minmax")
    engine = build_engine(workdir / f"{name}-quantkit-int8", precision="int8", onnx=onnx_path,
                          table=table, plan=args.plan,
                          options={"shared_inputs": args.shared_inputs}, force=True)
    t1 = time.perf_counter()
    ort_path = ort_quantize_static(onnx_path, workdir / f"{name}-ort-qdq.onnx", calib)
    t2 = time.perf_counter()
    coverage = engine.manifest["int8_coverage"]
    print(f"[{name}] calibration + quantkit build {t1 - t0:.0f} s (INT8 coverage "
          f"{coverage:.1%}), quantize_static {t2 - t1:.0f} s", flush=True)
    paths = {"fp32": onnx_path, "quantkit": engine.path / engine.manifest["onnx"],
             "ort_qdq": ort_path}
    sessions, fusions = {}, {}
    for key, path in paths.items():
        optimized = workdir / f"{name}-{key}.optimized.onnx"
        sessions[key] = session(path, args.threads, optimized)
        fusions[key] = fusion(optimized)
        optimized.unlink(missing_ok=True)
        Path(f"{optimized}.data").unlink(missing_ok=True)
    print(f"[{name}] ONNX Runtime integer kernels / Q/DQ MatMuls left unfused: "
          + ", ".join(f"{k} {v['integer_ops']}/{v['unfused']}" for k, v in fusions.items()
                      if k != "fp32"), flush=True)
    rows = []
    for shape in args.shapes.split(","):
        batch, seq = (int(v) for v in shape.lower().split("x"))
        feed = token_batches(tokenizer, "evaluation", 1, batch, seq, vocab, 1)[0]
        logits = {k: s.run(["logits"], feed)[0] for k, s in sessions.items()}
        ref = logits.pop("fp32")
        errors = {k: float(np.max(np.abs(v - ref))) for k, v in logits.items()}
        mean_errors = {k: float(np.mean(np.abs(v - ref))) for k, v in logits.items()}
        agree = {k: float(np.mean(v.argmax(-1) == ref.argmax(-1))) for k, v in logits.items()}
        del logits
        times: dict[str, list[float]] = {k: [] for k in sessions}
        clock = time.process_time if args.metric == "cpu" else time.perf_counter
        for i in range(args.warmup + args.iterations):
            for key, sess in sessions.items():
                start = clock()
                sess.run(["logits"], feed)
                if i >= args.warmup:
                    times[key].append(clock() - start)
        p50 = {k: statistics.median(v) * 1000 for k, v in times.items()}
        row = {
            "model": name, "shape": f"{batch}x{seq}", "iterations": args.iterations,
            "metric": args.metric, "threads": args.threads,
            "load_average": os.getloadavg()[0],
            "fp32_ms": p50["fp32"], "quantkit_ms": p50["quantkit"], "ort_qdq_ms": p50["ort_qdq"],
            "quantkit_vs_fp32": p50["quantkit"] / p50["fp32"],
            "ort_qdq_vs_fp32": p50["ort_qdq"] / p50["fp32"],
            "quantkit_vs_ort_qdq": p50["quantkit"] / p50["ort_qdq"],
            "max_abs_dlogits_quantkit": errors["quantkit"],
            "max_abs_dlogits_ort_qdq": errors["ort_qdq"],
            "mean_abs_dlogits_quantkit": mean_errors["quantkit"],
            "mean_abs_dlogits_ort_qdq": mean_errors["ort_qdq"],
            "max_abs_logit_fp32": float(np.max(np.abs(ref))),
            "top1_agree_quantkit": agree["quantkit"], "top1_agree_ort_qdq": agree["ort_qdq"],
            "fusion": fusions,
        }
        rows.append(row)
        print(format_row(row), flush=True)
    return rows


HEADER = (f"{'model':13s} {'shape':6s} {'fp32 ms':>8s} {'quantkit':>9s} {'x fp32':>6s} "
          f"{'ort qdq':>8s} {'x fp32':>6s} {'qk/ort':>6s} {'max|dl| qk/ort':>15s} "
          f"{'mean|dl| qk/ort':>15s} {'top1 qk/ort':>13s}")


def format_row(r: dict[str, Any]) -> str:
    return (f"{r['model']:13s} {r['shape']:6s} {r['fp32_ms']:8.1f} {r['quantkit_ms']:9.1f} "
            f"{r['quantkit_vs_fp32']:6.2f} {r['ort_qdq_ms']:8.1f} {r['ort_qdq_vs_fp32']:6.2f} "
            f"{r['quantkit_vs_ort_qdq']:6.2f} "
            f"{r['max_abs_dlogits_quantkit']:7.3f}/{r['max_abs_dlogits_ort_qdq']:<7.3f} "
            f"{r['mean_abs_dlogits_quantkit']:7.4f}/{r['mean_abs_dlogits_ort_qdq']:<7.4f} "
            f"{r['top1_agree_quantkit']:6.1%}/{r['top1_agree_ort_qdq']:<6.1%}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.metric == "cpu":
        args.threads = 1
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        print(f"unknown model(s): {', '.join(unknown)}; use {', '.join(MODELS)}", file=sys.stderr)
        return 2
    from quantkit.environment import environment_info

    env = environment_info()
    print(f"CPU: {env.get('cpu')} ({os.cpu_count()} cores), threads {args.threads}, "
          f"{args.metric} time p50 of {args.iterations} runs after {args.warmup} warm-up, "
          f"load average {os.getloadavg()[0]:.1f}, quantkit plan {args.plan.name}", flush=True)
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="quantkit-bench-")
        workdir = Path(tmp.name)
    else:
        workdir = args.workdir
        workdir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    try:
        print(HEADER, flush=True)
        for name in models:
            if name == "gpt2-124m":
                onnx_path, tokenizer = export_gpt2(workdir)
            else:
                onnx_path, tokenizer = export_smollm2(workdir, args.smollm2_onnx)
            rows.extend(bench_model(name, onnx_path, tokenizer, args, workdir))
    finally:
        if tmp is not None:
            tmp.cleanup()
    print("\n" + HEADER)
    for row in rows:
        print(format_row(row))
    if args.json is not None:
        args.json.write_text(json.dumps({"environment": env, "args": {
            k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
