"""Writes the report tests' fixtures. THE NUMBERS ARE INVENTED FOR TESTS, NOT MEASUREMENTS.

Run ``python tests/report/data/make_fixtures.py``; the output is committed, and
``tests/report/test_fixtures.py`` checks that it is what this script writes.

What is real: ``smollm2-135m-structure.nodes.json`` is the node list (name, op type, and for MatMul
the activation inputs) of ``quantkit.export``'s FP32 ONNX of a Llama with SmolLM2-135M's block
structure (30 blocks, 9 query / 3 key-value heads), shrunk in width; the precision plans below are
built over those real node names. What is invented: every perplexity, latency, size, amax and
environment value. INT8 coverage is computed from each plan with SmolLM2-135M's dimensions. The
calibration directory holds quantkit's own ActivationStats over synthetic activations (random
numbers, not a model's) and the CalibrationTable that ``quantkit.calib.calibrate`` computes from
them with the entropy method.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
FIXTURE_NOTE = "Hand-written test fixture for tests/report: the numbers are invented, not measured."
CREATED = "2025-06-01T12:00:00+00:00"
MODEL_HASH = "5f1c0e7a" * 8
TEXT_SHA = "9b2d6c41" * 8
TOKENS_SHA = "0c3e9a77" * 8
TOKENIZER_SHA = "d41e7c09" * 8

# SmolLM2-135M dimensions, for MAC counts (per token; attention matmuls at sequence length 512).
HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM, VOCAB, SEQ = 576, 1536, 9, 3, 64, 49152, 512
MACS = {
    "q_proj": HIDDEN * HIDDEN, "k_proj": HIDDEN * KV_HEADS * HEAD_DIM,
    "v_proj": HIDDEN * KV_HEADS * HEAD_DIM, "o_proj": HIDDEN * HIDDEN,
    "gate_proj": HIDDEN * INTER, "up_proj": HIDDEN * INTER, "down_proj": INTER * HIDDEN,
    "MatMul": HEADS * HEAD_DIM * SEQ, "MatMul_1": HEADS * HEAD_DIM * SEQ,
    "lm_head": HIDDEN * VOCAB,
}


def nodes() -> list[list[Any]]:
    return json.loads((HERE / "smollm2-135m-structure.nodes.json").read_text())


def node_macs(name: str) -> int:
    parts = name.strip("/").split("/")
    key = parts[-2] if parts[-1] == "MatMul" and parts[-2] not in ("self_attn",) else parts[-1]
    return MACS[key]


def plan(kind: str) -> dict[str, Any]:
    sensitive_down = re.compile(r"^/model/layers\.(0|1|29)/mlp/down_proj/MatMul$")
    attention = re.compile(r"^/model/layers\.\d+/self_attn/MatMul(_1)?$")
    decisions = []
    for entry in nodes():
        name, op = entry[0], entry[1]
        if op == "MatMul":
            precision, rule = "int8", "op_type:MatMul"
            if kind == "mixed":
                if name == "/lm_head/MatMul":
                    precision, rule = "fp16", "name:/lm_head/MatMul"
                elif sensitive_down.match(name):
                    precision, rule = "fp16", "regex:/model/layers\\.(0|1|29)/mlp/down_proj/.*"
                elif attention.match(name):
                    precision, rule = "fp16", "regex:.*/self_attn/MatMul(_1)?"
        elif op in ("Pow", "ReduceMean", "Sqrt", "Reciprocal", "Softmax", "LogSoftmax"):
            precision, rule = "fp32", f"op_type:{op}"
        else:
            precision, rule = "fp16", "default"
        decisions.append({"node": name, "op_type": op, "precision": precision, "rule": rule})
    return {"default": "fp16", "source": {"recipe": f"configs/fixture-{kind}.yaml"},
            "decisions": decisions}


def int8_coverage(p: dict[str, Any]) -> float:
    total = covered = 0
    for d in p["decisions"]:
        if d["op_type"] == "MatMul":
            macs = node_macs(d["node"])
            total += macs
            covered += macs if d["precision"] == "int8" else 0
    return round(covered / total, 4)


def gpu_environment() -> dict[str, Any]:
    return {
        "python": "3.11.2", "platform": "Linux-6.8.0-x86_64-with-glibc2.36",
        "cpu": "Intel(R) Xeon(R) Platinum 8480+", "cpu_count": 16,
        "libraries": {"quantkit": "0.1.0", "numpy": "2.2.6", "onnx": "1.18.0",
                      "onnxruntime": "1.22.0", "torch": "2.7.1", "transformers": "4.52.4",
                      "tensorrt": "10.11.0.33"},
        "commit": "fixture0000000000000000000000000000000000",
        "gpu": [{"name": "NVIDIA H100 80GB HBM3", "memory_total_mib": 81559,
                 "driver": "570.133.20"}],
    }


def cpu_environment() -> dict[str, Any]:
    env = gpu_environment()
    env.update(cpu="AMD EPYC 7B13", cpu_count=2, gpu=None)
    env["libraries"] = {**env["libraries"], "tensorrt": None}
    return env


def dataset() -> dict[str, Any]:
    return {
        "source": {"kind": "hub", "name": "wikitext", "config": "wikitext-2-raw-v1",
                   "split": "test", "column": "text"},
        "split": "test", "num_documents": 4358, "num_chars": 1288556, "joined_with": "\n\n",
        "text_sha256": TEXT_SHA, "tokenizer_sha256": TOKENIZER_SHA, "add_special_tokens": False,
        "total_tokens": 289077, "limit_tokens": None, "num_tokens": 289077,
        "tokens_sha256": TOKENS_SHA, "max_length": 1024, "stride": 512, "num_windows": 564,
        "num_scored_tokens": 289076,
    }


def latency(b: int, s: int, p50: float) -> dict[str, Any]:
    mean = p50 * 1.01
    return {"batch": b, "seq": s, "warmup": 10, "iterations": 100, "p50_ms": p50,
            "p90_ms": round(p50 * 1.03, 4), "p99_ms": round(p50 * 1.08, 4),
            "mean_ms": round(mean, 4), "min_ms": round(p50 * 0.97, 4),
            "max_ms": round(p50 * 1.2, 4), "tokens_per_s": round(b * s / (mean / 1e3), 2)}


def engine(name: str, path: str, backend: str, precision: str, ppl: float, size: int,
           shapes: dict[tuple[int, int], float], coverage: float | None,
           runner: dict[str, Any]) -> dict[str, Any]:
    nll = math.log(ppl)
    return {
        "name": name, "path": path, "backend": backend, "precision": precision,
        "int8_coverage": coverage, "source_model_hash": MODEL_HASH, "size_bytes": size,
        "perplexity": ppl, "nll_mean": nll, "nll_sum": nll * 289076, "num_scored_tokens": 289076,
        "eval_output": "nll", "eval_batch_size": 8, "eval_seconds": 41.5,
        "eval_tokens_per_s": 6965.7, "delta_vs_fp32": None, "delta_vs_fp16": None,
        "latency": [latency(b, s, v) for (b, s), v in shapes.items()],
        "peak_rss_bytes": 2_400_000_000, "rss_baseline_bytes": 900_000_000,
        "peak_rss_delta_bytes": 1_500_000_000, "peak_rss_method": "getrusage",
        "runner": runner,
    }


def with_deltas(engines: list[dict[str, Any]]) -> dict[str, str | None]:
    """What quantkit eval writes: deltas against the first engine of each precision."""
    refs = {p: next((e for e in engines if e["precision"] == p), None) for p in ("fp32", "fp16")}
    for e in engines:
        for p, ref in refs.items():
            if ref is not None:
                diff = e["perplexity"] - ref["perplexity"]
                e[f"delta_vs_{p}"] = {"abs": diff, "pct": 100.0 * diff / ref["perplexity"]}
    return {p: (r["name"] if r else None) for p, r in refs.items()}


def results(env: dict[str, Any], engines: list[dict[str, Any]], command: str,
            grid: list[str], threads: int | None) -> dict[str, Any]:
    reference = with_deltas(engines)
    return {
        "_comment": FIXTURE_NOTE, "schema": "quantkit.results/1", "created": CREATED,
        "commands": [command], "environment": env, "dataset": dataset(),
        "settings": {"batch_size": 8, "threads": threads, "warmup": 10, "iterations": 100,
                     "latency_grid": grid, "latency_seed": 0},
        "reference": reference, "engines": engines,
    }


def trt_results() -> dict[str, Any]:
    trt = {"device": "cuda:0", "gpu": "NVIDIA H100 80GB HBM3", "tensorrt": "10.11.0.33"}
    mixed, int8 = plan("mixed"), plan("int8")
    engines = [
        engine("fp32", "engines/trt-fp32", "tensorrt", "fp32", 20.9183, 542_310_400,
               {(1, 128): 1.92, (1, 512): 6.10, (8, 512): 38.4}, 0.0, trt),
        engine("fp16", "engines/trt-fp16", "tensorrt", "fp16", 20.9212, 271_892_480,
               {(1, 128): 1.05, (1, 512): 3.02, (8, 512): 17.9}, 0.0, trt),
        engine("int8", "engines/trt-int8", "tensorrt", "int8", 21.7342, 176_553_984,
               {(1, 128): 0.88, (1, 512): 2.21, (8, 512): 11.6}, int8_coverage(int8), trt),
        engine("int8-minmax", "engines/trt-int8-minmax", "tensorrt", "int8", 22.4871, 176_553_984,
               {(1, 128): 0.90, (1, 512): 2.30, (8, 512): 11.9}, int8_coverage(int8), trt),
        engine("mixed", "engines/trt-mixed", "tensorrt", "mixed", 21.1029, 205_127_680,
               {(1, 128): 0.96, (1, 512): 2.48, (8, 512): 13.4}, int8_coverage(mixed), trt),
    ]
    command = ("quantkit eval --engine engines/trt-fp32 --engine engines/trt-fp16 "
               "--engine engines/trt-int8 --engine engines/trt-int8-minmax "
               "--engine engines/trt-mixed --dataset wikitext --split test --max-length 1024 "
               "--stride 512 --latency-grid 1x128,1x512,8x512 --out results-trt-h100.json")
    return results(gpu_environment(), engines, command, ["1x128", "1x512", "8x512"], None)


def ort_results() -> dict[str, Any]:
    ort = {"device": "cpu", "providers": ["CPUExecutionProvider"], "threads": 2,
           "onnxruntime": "1.22.0"}
    engines = [
        engine("fp32", "engines/ort-fp32", "onnxruntime", "fp32", 20.9181, 538_976_256,
               {(1, 128): 38.1, (1, 512): 151.0}, 0.0, ort),
        engine("int8", "engines/ort-int8", "onnxruntime", "int8", 21.5517, 139_468_800,
               {(1, 128): 19.7, (1, 512): 71.3}, 0.9921, ort),
    ]
    command = ("quantkit eval --engine engines/ort-fp32 --engine engines/ort-int8 "
               "--dataset wikitext --split test --max-length 1024 --stride 512 "
               "--latency-grid 1x128,1x512 --threads 2 --out results-ort-cpu.json")
    return results(cpu_environment(), engines, command, ["1x128", "1x512"], 2)


def engine_manifest(name: str, precision: str, p: dict[str, Any]) -> dict[str, Any]:
    return {
        "_comment": FIXTURE_NOTE, "kind": "engine", "created": CREATED,
        "inputs": {"onnx": "out/export/model.onnx", "precision": precision, "plan": p,
                   "table_hash": "7a1f" * 16, "options": {}},
        "inputs_hash": "3c5d" * 16, "backend": "tensorrt", "precision": precision,
        "int8_coverage": int8_coverage(p), "size_bytes": None, "source_model_hash": MODEL_HASH,
        "environment": gpu_environment(),
    }


def calibration_stats() -> Any:
    """ActivationStats over synthetic activations (Gaussian bulk; heavy outliers at the inputs of
    down_proj in blocks 1, 2 and 29), histogrammed by quantkit's own StreamingHistogram."""
    from quantkit.calib.histogram import StreamingHistogram
    from quantkit.calib.stats import ActivationStats

    rng = np.random.default_rng(7)
    hists: dict[str, Any] = {}
    for entry in nodes():
        if entry[1] != "MatMul":
            continue
        for tensor in entry[2]:
            if tensor in hists:
                continue
            scale = 1.0 if "layernorm" in tensor or "/norm/" in tensor else 0.6
            values = rng.normal(0.0, scale, size=8192)
            if "/mlp/Mul_output_0" in tensor:
                layer = int(re.search(r"layers\.(\d+)/", tensor).group(1))
                if layer in (1, 2, 29):
                    values[:6] = rng.uniform(150.0, 320.0, size=6) * rng.choice([-1, 1], size=6)
                else:
                    values[:20] = rng.normal(0.0, 6.0, size=20)
            hist = StreamingHistogram(num_bins=2048)
            hist.update(values.astype(np.float32))
            hists[tensor] = hist
    return ActivationStats(
        histograms=hists, num_batches=16, num_samples=128, num_tokens=128 * 64,
        tensors="matmul-inputs", num_bins=2048, model_hash=MODEL_HASH,
        data={"note": FIXTURE_NOTE, "source": "synthetic activations"},
    )


def write_calibration(directory: Path) -> None:
    from quantkit.calib.stats import calibrate

    stats = calibration_stats()
    directory.mkdir(parents=True, exist_ok=True)
    stats.save(directory / "stats.npz")
    calibrate(stats, "entropy").save(directory / "table.json")


def dumps(name: str, obj: Any) -> str:
    """Results and tables indented for reading; engine manifests (long plans) on one line."""
    return json.dumps(obj, indent=None if name.endswith("manifest.json") else 1) + "\n"


def fixture_files() -> dict[str, Any]:
    return {
        "results-trt-h100.json": trt_results(),
        "results-ort-cpu.json": ort_results(),
        "engines/trt-int8/manifest.json": engine_manifest("int8", "int8", plan("int8")),
        "engines/trt-mixed/manifest.json": engine_manifest("mixed", "mixed", plan("mixed")),
    }


def main() -> None:
    for name, obj in fixture_files().items():
        path = HERE / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(dumps(name, obj))
    write_calibration(HERE / "calib")


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(HERE.parents[2]))  # this checkout's quantkit, not an installed one
    main()
