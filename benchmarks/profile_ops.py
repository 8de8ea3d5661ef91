"""Where ONNX Runtime's CPU time goes: a per-op-type profile of FP32 and INT8 engines.

Each engine runs under ONNX Runtime's profiler; the engines take turns within every iteration
(so load from other processes hits all alike) and the first ``--warmup`` runs of each are
dropped. For each shape the script prints, per engine, the p50 wall time of a run, the time
per op type per run (summed over that type's nodes, mean over the timed runs), its share of
the run, and the time outside any node (ONNX Runtime's own work between kernels). Op types
are also grouped into what they are for (integer MatMul, float MatMul, quantize/dequantize,
normalization, attention, elementwise, data movement), which is what decides what to attack.

    python benchmarks/profile_ops.py --engine fp32=out/q18/t0/engines/fp32 \\
        --engine int8=out/q18/t0/engines/int8-naive --shapes 1x128,1x512,4x512

An ``--engine`` is a quantkit engine folder or an ``.onnx`` file; the first one is the
reference the others' ratios are taken against. ``--json`` keeps every number. A shape
``BxS+P`` profiles KV-cache engines (``export --with-cache``): ``S`` new tokens against a
zero-filled past of ``P`` positions, every output (the presents too) fetched — ``1x1+512`` is a
batch-1 decode step at cache 512:

    python benchmarks/profile_ops.py --engine fp32=out/q3/t0/engines/cache-fp32 \
        --engine quantized=out/q3/t0/engines/cache-quantized --shapes 1x1+512 --iterations 30
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# op type -> what it is for; anything unlisted counts as "other"
GROUPS = {
    "integer MatMul": ("MatMulIntegerToFloat", "QLinearMatMul", "MatMulInteger",
                       "DynamicQuantizeMatMul", "QGemm", "MatMulNBits"),
    "float MatMul": ("MatMul", "FusedMatMul", "Gemm", "FusedGemm"),
    "quantize / dequantize": ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"),
    "normalization": ("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization",
                      "LayerNormalization", "SkipLayerNormalization", "ReduceMean", "Pow",
                      "Sqrt", "Reciprocal"),
    "attention": ("Softmax", "Attention", "MultiHeadAttention", "GroupQueryAttention",
                  "RotaryEmbedding"),
    "elementwise": ("Add", "Mul", "Sub", "Div", "Neg", "Sigmoid", "Tanh", "Erf", "Gelu",
                    "FastGelu", "BiasGelu", "QuickGelu", "Where", "Equal", "Less", "Cast",
                    "Max", "Min", "Cos", "Sin", "Exp", "Log", "Not", "And", "Trilu"),
    "data movement": ("Reshape", "Transpose", "Concat", "Slice", "Gather", "GatherElements",
                      "Split", "Unsqueeze", "Squeeze", "Expand", "Shape", "Range",
                      "ConstantOfShape", "Tile", "Identity", "Flatten"),
    "loss": ("LogSoftmax", "SoftmaxCrossEntropyLoss", "NegativeLogLikelihoodLoss", "ReduceSum",
             "ReduceMax", "ReduceLogSumExp"),
}
GROUP_OF = {op: group for group, ops in GROUPS.items() for op in ops}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", action="append", required=True, metavar="NAME=PATH",
                   help="engine folder or .onnx file; the first is the reference")
    p.add_argument("--shapes", default="1x128,1x512,4x512",
                   help="BATCHxSEQ list; BATCHxSEQ+PAST for KV-cache engines")
    p.add_argument("--iterations", type=int, default=5, help="timed runs per engine and shape")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before timing")
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    p.add_argument("--top", type=int, default=12, help="op types listed per engine")
    p.add_argument("--session-config", action="append", default=[], metavar="KEY=VALUE",
                   help="ONNX Runtime session config entry for every engine, e.g. "
                        "session.set_denormal_as_zero=1")
    p.add_argument("--json", type=Path, default=None, help="also write every number here")
    return p.parse_args(argv)


def engine_onnx(path: Path) -> Path:
    """The ONNX file of a quantkit engine folder, or the file itself."""
    if path.is_dir():
        manifest = path / "manifest.json"
        name = json.loads(manifest.read_text())["onnx"] if manifest.is_file() else "model.onnx"
        return path / name
    return path


class ProfiledSession:
    """One ONNX Runtime session with the profiler on; ``finish`` parses what it recorded."""

    def __init__(self, path: Path, threads: int, prefix: Path,
                 config: dict[str, str] | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.enable_profiling = True
        options.profile_file_prefix = str(prefix)
        options.log_severity_level = 3
        for key, value in (config or {}).items():
            options.add_session_config_entry(key, value)
        self.session = ort.InferenceSession(str(path), options,
                                            providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.past_shapes = {i.name: i.shape for i in self.session.get_inputs()
                            if i.name.startswith("past_key_values.")}
        # a cache engine's step returns its presents too; a plain engine's logits only
        self.fetch = (None if self.past_shapes else ["logits"])
        logits = next(o for o in self.session.get_outputs() if o.name == "logits")
        self.vocab = logits.shape[-1] if isinstance(logits.shape[-1], int) else None
        self.walls: list[float] = []

    def run(self, feed: dict[str, np.ndarray], timed: bool) -> None:
        start = time.perf_counter()
        self.session.run(self.fetch, {k: v for k, v in feed.items() if k in self.inputs})
        if timed:
            self.walls.append(time.perf_counter() - start)

    def finish(self, skip_runs: int) -> dict[str, Any]:
        """Per op type: microseconds per timed run; also run time and time outside nodes."""
        events = json.loads(Path(self.session.end_profiling()).read_text())
        runs = sorted((e for e in events if e.get("name") == "model_run"),
                      key=lambda e: e["ts"])[skip_runs:]
        if not runs:
            raise SystemExit("the profile holds no timed run")
        per_op: dict[str, float] = defaultdict(float)
        node_total = 0.0
        for event in events:
            if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time"):
                continue
            if not any(r["ts"] <= event["ts"] <= r["ts"] + r["dur"] for r in runs):
                continue
            per_op[event["args"]["op_name"]] += event["dur"]
            node_total += event["dur"]
        count = len(runs)
        run_us = sum(r["dur"] for r in runs) / count
        return {"run_us": run_us, "nodes_us": node_total / count,
                "outside_us": run_us - node_total / count,
                "ops_us": {k: v / count for k, v in sorted(per_op.items(),
                                                            key=lambda kv: -kv[1])},
                "p50_wall_ms": 1e3 * statistics.median(self.walls)}


def feeds_for(batch: int, seq: int, vocab: int, past: int = 0,
              past_shapes: dict[str, list[Any]] | None = None) -> dict[str, np.ndarray]:
    """Token ids for timing: kernels' time does not depend on the values, only the shapes. With
    ``past_shapes`` (a cache engine's past inputs, [batch, kv_heads, past, head_dim]) a
    zero-filled past of ``past`` positions, the mask over past and new tokens, positions."""
    rng = np.random.default_rng(1)
    ids = rng.integers(0, vocab, (batch, seq), dtype=np.int64)
    feed = {"input_ids": ids, "attention_mask": np.ones((batch, past + seq), np.int64),
            "labels": ids.copy(),
            "position_ids": np.tile(np.arange(past, past + seq, dtype=np.int64), (batch, 1))}
    for name, shape in (past_shapes or {}).items():
        feed[name] = np.zeros((batch, int(shape[1]), past, int(shape[3])), np.float32)
    return feed


def grouped(ops_us: dict[str, float]) -> dict[str, float]:
    out: dict[str, float] = defaultdict(float)
    for op, us in ops_us.items():
        out[GROUP_OF.get(op, "other")] += us
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def profile_shape(paths: dict[str, Path], batch: int, seq: int, args: argparse.Namespace,
                  tmp: Path, past: int | None = None) -> dict[str, Any]:
    config = dict(entry.partition("=")[::2] for entry in args.session_config)
    sessions = {name: ProfiledSession(path, args.threads, tmp / f"{name}-{batch}x{seq}", config)
                for name, path in paths.items()}
    vocab = min((s.vocab for s in sessions.values() if s.vocab), default=1000)
    cache = [name for name, s in sessions.items() if s.past_shapes]
    if (past is not None) != (len(cache) == len(sessions)):
        raise ValueError(f"shape {batch}x{seq}{'' if past is None else f'+{past}'}: a past "
                         "length goes with KV-cache engines only, and every engine then needs one"
                         f" (cache engines: {', '.join(cache) or 'none'})")
    feeds = {name: feeds_for(batch, seq, vocab, past or 0, s.past_shapes)
             for name, s in sessions.items()}
    for i in range(args.warmup + args.iterations):
        for name, session in sessions.items():
            session.run(feeds[name], timed=i >= args.warmup)
    return {name: s.finish(args.warmup) for name, s in sessions.items()}


def print_shape(shape: str, result: dict[str, Any], top: int) -> None:
    names = list(result)
    ref = result[names[0]]
    print(f"\n## {shape}: p50 wall ms " + ", ".join(
        f"{n} {r['p50_wall_ms']:.1f} ({r['p50_wall_ms'] / ref['p50_wall_ms']:.2f}×)"
        for n, r in result.items()))
    groups = {n: grouped(r["ops_us"]) for n, r in result.items()}
    keys = sorted({g for gs in groups.values() for g in gs},
                  key=lambda g: -max(gs.get(g, 0.0) for gs in groups.values()))
    print("| what | " + " | ".join(f"{n} ms/run | share" for n in names) + " |")
    print("| --- |" + " ---: | ---: |" * len(names))
    for key in [*keys, "outside nodes"]:
        cells = []
        for n in names:
            us = (result[n]["outside_us"] if key == "outside nodes"
                  else groups[n].get(key, 0.0))
            cells.append(f"{us / 1e3:.1f} | {100 * us / result[n]['run_us']:.0f} %")
        print(f"| {key} | " + " | ".join(cells) + " |")
    for n in names:
        ops = list(result[n]["ops_us"].items())[:top]
        print(f"{n} top op types: " + ", ".join(f"{op} {us / 1e3:.1f} ms" for op, us in ops))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from quantkit.environment import cpu_isa, environment_info

    paths: dict[str, Path] = {}
    for spec in args.engine:
        name, _, path = spec.partition("=")
        if not path:
            print(f"--engine {spec!r}: expected NAME=PATH", file=sys.stderr)
            return 2
        onnx_path = engine_onnx(Path(path))
        if not onnx_path.is_file():
            print(f"--engine {spec!r}: no ONNX file at {onnx_path}", file=sys.stderr)
            return 2
        paths[name] = onnx_path
    env = environment_info()
    print(f"CPU: {env.get('cpu')}, {cpu_isa().describe()}, {os.cpu_count()} cores; "
          f"{args.threads} threads; {args.iterations} timed runs after {args.warmup} warm-up, "
          f"engines in turn; load average {os.getloadavg()[0]:.1f}", flush=True)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="quantkit-profile-") as tmp:
        for shape in args.shapes.split(","):
            size, _, past = shape.partition("+")
            batch, seq = (int(v) for v in size.lower().split("x"))
            try:
                results[shape] = profile_shape(paths, batch, seq, args, Path(tmp),
                                               int(past) if past else None)
            except ValueError as exc:  # a past length for engines without a cache, or none
                print(exc, file=sys.stderr)
                return 2
            print_shape(shape, results[shape], args.top)
            sys.stdout.flush()
    if args.json is not None:
        args.json.write_text(json.dumps({"environment": env, "engines": {
            k: str(v) for k, v in paths.items()}, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
