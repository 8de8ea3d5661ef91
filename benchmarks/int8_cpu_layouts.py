"""INT8 ONNX Runtime engines per weight layout on this CPU: fused integer kernels against the
same graph with its Q/DQ executed literally, in perplexity, logits and latency.

For each layout (``quantkit.qdq``: ``s8`` int8 weights on ONNX Runtime's u8 x s8 kernels, ``u8``
the same values as uint8 + 128 on its u8 x u8 kernels, ``s7`` 7-bit weights) one engine is built
from the same export, table and plan, and run three ways:

* ``fused``: ONNX Runtime as quantkit runs it (``ORT_ENABLE_ALL``: Q/DQ fused into
  MatMulIntegerToFloat / QLinearMatMul);
* ``literal``: ``ORT_DISABLE_ALL``: every DequantizeLinear runs and feeds a float MatMul (the
  engine's Q/DQ reference; the script checks that no integer kernel is left in that graph);
* ``unfused`` (with ``--unfused``): ``ORT_ENABLE_BASIC``, the other optimizations without the
  Q/DQ fusions (layout (c) of issue 15: keep the MatMuls out of the integer kernels).

Perplexity uses the engines' fused ``nll`` output on the first ``--limit-tokens`` tokens;
``max |dlogit|`` compares the fused and literal logits of the first window, relative to the
largest |logit| (and the mean |dlogit| relative to the mean |logit|, and the share of positions
whose top-1 token agrees). Latency: p50 of ``--iterations`` timed runs at each ``--shapes``
point, every configuration run in turn within each iteration (so outside load hits all alike),
the FP32 export among them.

    python benchmarks/int8_cpu_layouts.py --onnx out/smollm2 --table out/calib/table.json \\
        --dataset ../shared/data/wikitext-2-raw/wiki.test.raw --split "test[50%:]" \\
        --limit-tokens 4096 --workdir out/layout-bench
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

RUNS_BY_LEVEL = {"all": "ORT_ENABLE_ALL", "disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--onnx", type=Path, required=True, help="FP32 export (with the nll output)")
    p.add_argument("--table", type=Path, required=True, help="calibration table.json")
    p.add_argument("--plan", type=Path, default=REPO / "configs" / "int8.yaml")
    p.add_argument("--layouts", default="s8,u8,s7", help="comma list of s8, u8, s7")
    p.add_argument("--noise-floor", default=None, metavar="LAYOUT",
                   help="also run LAYOUT's engine literally with every activation scale "
                        "multiplied by 1 + 1e-6: how far float-rounding-sized changes alone move "
                        "the Q/DQ reference (rounding flips at quantization boundaries)")
    p.add_argument("--unfused", action="store_true",
                   help="also run the s8 engine with the Q/DQ fusions off (ORT_ENABLE_BASIC)")
    p.add_argument("--dataset", required=True)
    p.add_argument("--split", default="test")
    p.add_argument("--limit-tokens", type=int, default=4096)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--shapes", default="1x512", help="BATCHxSEQ list for latency")
    p.add_argument("--iterations", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workdir", type=Path, required=True, help="engines are built (and kept) here")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    return p.parse_args(argv)


def build(args: argparse.Namespace, layout: str | None) -> Any:
    """The engine of ``layout`` (None: FP32), built once into the workdir."""
    from quantkit.backends.base import Engine
    from quantkit.build import build_engine

    out = args.workdir / (f"int8-{layout}" if layout else "fp32")
    if (out / "manifest.json").is_file():
        return Engine.load(out)
    start = time.perf_counter()
    if layout is None:
        engine = build_engine(out, precision="fp32", onnx=args.onnx)
    else:
        engine = build_engine(out, precision="int8", onnx=args.onnx, table=args.table,
                              plan=args.plan, options={"weight_layout": layout})
    print(f"built {out} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return engine


def perturbed(engine: Any, out: Path, factor: float = 1 + 1e-6) -> Any:
    """A copy of ``engine`` whose activation scales (shared by each Q/DQ pair) are multiplied by
    ``factor``; weights untouched."""
    import shutil

    import onnx
    from onnx import numpy_helper

    from quantkit.backends.base import Engine

    if (out / "manifest.json").is_file():
        return Engine.load(out)
    model = onnx.load(str(engine.path / engine.manifest["onnx"]))
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[1] in inits:
            name = node.input[1]
            value = numpy_helper.to_array(inits[name]).astype(np.float64) * factor
            inits[name].CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))
    out.mkdir(parents=True)
    onnx.save(model, str(out / engine.manifest["onnx"]))
    shutil.copy(engine.path / "manifest.json", out / "manifest.json")
    shutil.copytree(engine.path / "tokenizer", out / "tokenizer")
    return Engine.load(out)


def literal_graph_check(engine: Any) -> dict[str, int]:
    """Op counts of the graph ONNX Runtime runs with ORT_DISABLE_ALL: DequantizeLinear and float
    MatMul must be there, no integer kernel."""
    import tempfile

    import onnx
    import onnxruntime as ort

    from quantkit.backends.onnxruntime import INTEGER_OPS, fusion_report

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.optimized_model_filepath = str(Path(tmp) / "literal.onnx")
        ort.InferenceSession(str(engine.path / engine.manifest["onnx"]), options,
                             providers=["CPUExecutionProvider"])
        literal = onnx.load(str(Path(tmp) / "literal.onnx"), load_external_data=False)
    graph = literal.graph
    counts = {"DequantizeLinear": sum(1 for n in graph.node if n.op_type == "DequantizeLinear"),
              "MatMul": len(fusion_report(literal)["unfused_dequantized_matmuls"]),
              "integer_ops": sum(1 for n in graph.node if n.op_type in INTEGER_OPS)}
    if counts["integer_ops"] or not counts["DequantizeLinear"] or not counts["MatMul"]:
        raise SystemExit(f"{engine.path}: ORT_DISABLE_ALL did not run the Q/DQ literally: {counts}")
    return counts


def isolated_matmul(k: int = 576, n: int = 256, m: int = 64) -> dict[str, float]:
    """One Q/DQ MatMul with full-range operands (activations +-127 steps, weights +-qmax): fused
    against literal, max |dy| / max |y|, per weight layout. Saturation shows here alone."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from quantkit.weight_quant import stored_weight, weight_qmax

    rng = np.random.default_rng(0)
    x = (rng.choice([-127.0, 127.0], size=(m, k)) * 0.05).astype(np.float32)
    out: dict[str, float] = {}
    for layout in ("s8", "u8", "s7"):
        qmax = weight_qmax(layout)
        stored, zero = stored_weight(rng.choice([-qmax, qmax], size=(k, n)).astype(np.int8),
                                     layout)
        inits = [numpy_helper.from_array(np.array(0.05, np.float32), "xs"),
                 numpy_helper.from_array(np.array(0, np.int8), "xz"),
                 numpy_helper.from_array(stored, "wq"),
                 numpy_helper.from_array(np.full(n, 0.01, np.float32), "ws"),
                 numpy_helper.from_array(np.full(n, zero), "wz")]
        nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
                 helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
                 helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=1),
                 helper.make_node("MatMul", ["xd", "wd"], ["y"])]
        graph = helper.make_graph(
            nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])], inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
        ys = []
        for level in (ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                      ort.GraphOptimizationLevel.ORT_DISABLE_ALL):
            options = ort.SessionOptions()
            options.graph_optimization_level = level
            session = ort.InferenceSession(model.SerializeToString(), options,
                                           providers=["CPUExecutionProvider"])
            ys.append(session.run(["y"], {"x": x})[0])
        out[layout] = float(np.max(np.abs(ys[0] - ys[1])) / np.max(np.abs(ys[1])))
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from quantkit.data import resolve_text_source
    from quantkit.environment import environment_info
    from quantkit.eval.latency import latency_feeds, parse_grid
    from quantkit.eval.perplexity import (
        evaluate_perplexity,
        plan_windows,
        tokenize_text,
        window_feeds,
    )
    from quantkit.eval.text import load_evaluation_text
    from quantkit.models import load_tokenizer

    args.workdir.mkdir(parents=True, exist_ok=True)
    layouts = [x.strip() for x in args.layouts.split(",") if x.strip()]
    engines: dict[str, Any] = {"fp32": build(args, None)}
    for layout in layouts:
        engines[layout] = build(args, layout)
    configs: list[tuple[str, str, str]] = [("fp32", "fp32", "all")]  # (label, engine, level)
    for layout in layouts:
        configs += [(f"{layout} fused", layout, "all"), (f"{layout} literal", layout, "disable")]
    if args.unfused and "s8" in layouts:
        configs.append(("s8 unfused", "s8", "basic"))
    accuracy_only: list[str] = []
    if args.noise_floor:
        name = f"{args.noise_floor}+1e-6"
        engines[name] = perturbed(engines[args.noise_floor], args.workdir / f"int8-{name}")
        configs.append((f"{args.noise_floor} literal, scales x(1+1e-6)", name, "disable"))
        accuracy_only.append(configs[-1][0])

    fp32 = engines["fp32"]
    tokenizer = load_tokenizer(fp32.path / str(fp32.manifest.get("tokenizer", "tokenizer")))
    text = load_evaluation_text(resolve_text_source(args.dataset, split=args.split))
    ids = tokenize_text(tokenizer, text.text, args.limit_tokens).ids
    first = window_feeds(ids, plan_windows(len(ids), args.max_length, args.max_length)[:1])
    vocab = int(fp32.manifest.get("vocab_size") or len(tokenizer))
    grid = parse_grid(args.shapes)
    feeds = {(p.batch, p.seq): latency_feeds(p.batch, p.seq, vocab) for p in grid}

    runners = {label: engines[name].runner(threads=args.threads, optimization=level)
               for label, name, level in configs}
    results: dict[str, dict[str, Any]] = {}
    try:
        for runner in runners.values():
            runner.activate()
        logits: dict[str, np.ndarray] = {}
        for label, name, _ in configs:
            start = time.perf_counter()
            ppl = evaluate_perplexity(runners[label], ids, args.max_length, args.max_length)
            logits[label] = runners[label].run(first, outputs=["logits"])["logits"]
            results[label] = {"engine": name, "optimization": RUNS_BY_LEVEL[
                runners[label].optimization], "perplexity": ppl.perplexity,
                "num_scored_tokens": ppl.num_scored_tokens}
            print(f"{label:12s} perplexity {ppl.perplexity:.3f} "
                  f"({time.perf_counter() - start:.0f} s)", file=sys.stderr)
        for label, name, _ in configs:
            if name == "fp32":
                continue
            reference = logits[f"{name.split('+')[0]} literal"]
            delta = np.max(np.abs(logits[label] - reference)) / np.max(np.abs(reference))
            results[label]["max_dlogit_vs_literal"] = float(delta)
            results[label]["mean_dlogit_vs_literal"] = float(
                np.mean(np.abs(logits[label] - reference)) / np.mean(np.abs(reference)))
            results[label]["top1_vs_literal"] = float(
                np.mean(logits[label].argmax(-1) == reference.argmax(-1)))
            results[label]["max_dlogit_vs_fp32"] = float(
                np.max(np.abs(logits[label] - logits["fp32"])) / np.max(np.abs(logits["fp32"])))
        times: dict[tuple[str, tuple[int, int]], list[float]] = {}
        timed = [label for label in runners if label not in accuracy_only]
        for key, feed in feeds.items():
            for label in timed:
                for _ in range(args.warmup):
                    runners[label].run(feed, outputs=["logits"])
            for _ in range(args.iterations):
                for label in timed:
                    start = time.perf_counter()
                    runners[label].run(feed, outputs=["logits"])
                    times.setdefault((label, key), []).append(time.perf_counter() - start)
        for label in runners:
            results[label]["p50_ms"] = {f"{b}x{s}": 1e3 * statistics.median(times[(label, (b, s))])
                                        for b, s in feeds} if label in timed else {}
            results[label]["runner"] = runners[label].describe()
    finally:
        for runner in runners.values():
            runner.deactivate()

    env = environment_info()
    isa = env["isa"]
    print(f"\nmachine: {env['cpu']} ({env['cpu_count']} cores), ISA {isa['name']} "
          f"(u8 x s8 saturates: {isa['u8s8_saturates']}); onnxruntime "
          f"{env['libraries']['onnxruntime']}; {args.threads} threads; load average at end "
          f"{os.getloadavg()[0]:.1f}")
    print(f"text: {args.dataset} [{args.split}], first {len(ids)} tokens, windows of "
          f"{args.max_length}; latency p50 of {args.iterations} interleaved runs\n")
    shapes = [f"{b}x{s}" for b, s in feeds]
    fp32_ms = results["fp32"]["p50_ms"]
    print("| run | weights | ORT optimization | integer kernels / float MatMuls on DQ | "
          "perplexity | vs literal: max / mean |dlogit|, top-1 | "
          + " | ".join(f"p50 ms {s} (x FP32)" for s in shapes) + " |")
    print("| --- " * (5 + len(shapes)) + "| --- |")
    for label, name, _ in configs:
        r = results[label]
        fusion = "—"
        if name != "fp32":
            manifest = engines[name].manifest
            fused = manifest.get("onnxruntime_fusion") or {}
            if r["optimization"] == "ORT_ENABLE_ALL":
                fusion = (f"{sum(fused.get('integer_ops', {}).values())} / "
                          f"{len(fused.get('unfused_dequantized_matmuls', []))}")
            elif r["optimization"] == "ORT_DISABLE_ALL" and name in layouts:
                counts = literal_graph_check(engines[name])
                r["literal_graph"] = counts
                fusion = f"0 / {counts['MatMul']}"
            elif r["optimization"] == "ORT_DISABLE_ALL":
                fusion = "0 / all"
            else:
                fusion = "0 / all"
        delta = "—" if "max_dlogit_vs_literal" not in r else (
            f"{r['max_dlogit_vs_literal']:.2e} / {r['mean_dlogit_vs_literal']:.2e}, "
            f"{100 * r['top1_vs_literal']:.1f} %")
        lat = " | ".join(f"{r['p50_ms'][s]:.1f} ({r['p50_ms'][s] / fp32_ms[s]:.2f})"
                         if s in r["p50_ms"] else "—" for s in shapes)
        print(f"| {label} | {name} | {r['optimization']} | {fusion} | {r['perplexity']:.3f} | "
              f"{delta} | {lat} |")
    isolated = isolated_matmul()
    print("\none Q/DQ MatMul 64x576 @ 576x256, full-range operands, fused vs literal max |dy| / "
          "max |y|: " + ", ".join(f"{k} {v:.2e}" for k, v in isolated.items()))
    if args.json:
        args.json.write_text(json.dumps({
            "environment": env, "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "num_tokens": len(ids), "max_length": args.max_length, "results": results,
            "isolated_matmul": isolated,
        }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
