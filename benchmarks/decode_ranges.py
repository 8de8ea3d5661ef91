"""Decode-step activation ranges against full-sequence ranges (issue #17).

A KV-cache engine is built with the table of the plain export, whose ranges come from
full-sequence passes. This measures, per quantized MatMul input, how the ranges of decode steps
(one new token against a cached past) compare with them, over the same text:

* full: ``collect_activation_stats`` on the plain export (what ``quantkit calibrate`` does),
  ``--num-samples`` blocks of ``--seq-len`` tokens;
* decode: the same blocks on the cache export: a prefill of the first ``--prefill`` tokens, then
  one step per token up to the block's end, all blocks in one batch; only the decode steps'
  activations are collected (the same collector, fed step by step).

Per tensor it reports decode/full ratios of amax and of the 99.99th percentile, the ratio of the
ranges that ``--method`` (quantkit's default, entropy) computes from each regime's histograms,
and the share of decode values above the full-sequence table's range. Causal attention makes a
decode step's activations equal to the full pass's row at that position (for K and V: its rows
0..t), so decode amax is at most the full amax; the amax ratios say how much of the full range
comes from the first ``--prefill`` positions alone. The full pass's attention probabilities also
hold the causal mask's zeros (half of P), which decode steps lack: that changes P's histogram,
hence its percentile and entropy ranges, though not its values.

``--agreement PLAN`` (repeatable; ``int8`` for every MatMul, else a plan file) also builds INT8
cache engines of the plan with three tables of ``--agreement-method``: *full* (what ``build
--table`` gives the cache graph today), *decode* (the decode steps' ranges) and *max* (the larger
of the two per tensor, what merging decode statistics into the table would give), and scores
each with ``quantkit.generation_check.greedy_agreement`` against the FP32 cache engine.

    PYTHONPATH=. python benchmarks/decode_ranges.py --plain out/smollm2 --cache out/smollm2-cache \\
        --dataset ../shared/data/wikitext-2-raw/wiki.test.raw --split 'test[:40%]' \\
        --num-samples 16 --seq-len 512 --prefill 64 --json decode_ranges.json \
        --agreement configs/smollm2-135m.yaml --agreement int8 --engines /tmp/decode-engines
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

PCT = 99.99


def decode_feeds(cache_onnx: Path, blocks: np.ndarray, prefill: int,
                 threads: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """The feeds of every decode step of ``blocks`` (one batch, all rows at the same position):
    a prefill of ``blocks[:, :prefill]`` on an FP32 session of the cache graph, then token ``t``
    against the past ``0..t-1`` for ``t`` in ``prefill..seq-1``. Each step is yielded before the
    session runs it to make the next step's past."""
    import onnxruntime as ort

    from quantkit.export import export_manifest
    from quantkit.export_cache import CacheLayout

    manifest = export_manifest(cache_onnx) or {}
    if not manifest.get("cache"):
        raise SystemExit(f"{cache_onnx} is not a --with-cache export")
    layout = CacheLayout.from_dict(manifest["cache"])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or 0
    options.log_severity_level = 3
    sess = ort.InferenceSession(str(cache_onnx), options, providers=["CPUExecutionProvider"])
    rows, seq = blocks.shape
    presents = layout.present_names

    def run(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = sess.run(presents, feed)
        return {p: o for p, o in zip(layout.past_names, out, strict=True)}

    past = run({"input_ids": blocks[:, :prefill],
                "attention_mask": np.ones((rows, prefill), dtype=np.int64),
                "position_ids": np.broadcast_to(np.arange(prefill), (rows, prefill)).copy(),
                **layout.empty_past(rows)})
    for t in range(prefill, seq):
        feed = {"input_ids": np.ascontiguousarray(blocks[:, t:t + 1]),
                "attention_mask": np.ones((rows, t + 1), dtype=np.int64),
                "position_ids": np.full((rows, 1), t, dtype=np.int64), **past}
        yield feed
        if t + 1 < seq:
            past = run(feed)


def operand_pairs(plain_onnx: Path, cache_onnx: Path) -> list[dict[str, Any]]:
    """Each activation operand of each quantizable MatMul/Gemm: its node, kind, operand index
    and tensor names in the plain and the cache graph (nodes are paired by name, as
    ``quantkit.cache_tables.carry_table`` pairs them)."""
    import onnx

    from quantkit.graph_edit import constant_weight
    from quantkit.tune.groups import node_kind, quantizable_nodes

    plain = onnx.load(str(plain_onnx), load_external_data=False)
    cache = onnx.load(str(cache_onnx), load_external_data=False)
    p_nodes = {n.name: n for n in plain.graph.node}
    c_nodes = {n.name: n for n in cache.graph.node}
    inits = {t.name: t for t in plain.graph.initializer}
    producers = {o: n for n in plain.graph.node for o in n.output}
    pairs = []
    for entry in quantizable_nodes(plain):
        node, twin = p_nodes[entry.name], c_nodes.get(entry.name)
        if twin is None:
            continue
        kind = node_kind(*entry)
        for i, (p_name, c_name) in enumerate(zip(node.input[:2], twin.input[:2], strict=True)):
            if constant_weight(p_name, inits, producers) is not None:
                continue
            pairs.append({"node": entry.name, "kind": kind, "operand": i, "plain": p_name,
                          "cache": c_name})
    return pairs


def tensor_numbers(stats: Any, name: str) -> dict[str, float] | None:
    """amax and the 99.99th percentile of ``name``'s histogram (None if not collected)."""
    from quantkit.calib.algorithms import compute_amax

    hist = stats.histograms.get(name)
    if hist is None:
        return None
    return {"amax": hist.amax, "p9999": compute_amax(hist, "percentile", percentile=PCT)}


def clipped_share(hist: Any, amax: float) -> float:
    """Share of the histogram's values above ``amax`` (bins wholly above it)."""
    edges, counts = hist.edges, hist.counts
    return float(counts[edges[:-1] >= amax].sum() / max(hist.total, 1))


def label(pair: dict[str, Any]) -> str:
    """Kind plus, for the two attention MatMuls, which operand (Q / K, P / V)."""
    names = {"attn_scores": ("Q", "K"), "attn_values": ("P", "V")}.get(pair["kind"])
    return f"{pair['kind']}.{names[pair['operand']]}" if names else pair["kind"]


def summarise(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per label: min / median / max of the ratios and the largest clipped share."""
    out: dict[str, dict[str, float]] = {}
    for key in sorted({r["label"] for r in rows}):
        group = [r for r in rows if r["label"] == key]
        amax = [r["amax_ratio"] for r in group]
        pct = [r["p9999_ratio"] for r in group]
        tab = [r["table_ratio"] for r in group]
        out[key] = {"tensors": len(group), "amax_min": min(amax),
                    "amax_median": statistics.median(amax), "amax_max": max(amax),
                    "p9999_min": min(pct), "p9999_median": statistics.median(pct),
                    "p9999_max": max(pct),
                    "table_min": min(tab), "table_median": statistics.median(tab),
                    "table_max": max(tab),
                    "clipped_max": max(r["decode_clipped"] for r in group),
                    "full_clipped_max": max(r["full_clipped"] for r in group)}
    return out


def range_tables(full: Any, decode: Any, method: str, plain: Path,
                 cache: Path) -> dict[str, Any]:
    """The cache graph's tables *full* (carried from the plain graph), *decode* and *max*."""
    from dataclasses import replace

    from quantkit.cache_tables import carry_table
    from quantkit.calib.stats import calibrate

    carried = carry_table(calibrate(full, method), plain, cache)
    own = calibrate(decode, method)
    decoded = replace(own, model_hash=carried.model_hash)
    larger = {k: max(v, own.amax.get(k, 0.0)) for k, v in carried.amax.items()}
    return {"full": carried, "decode": decoded, "max": replace(carried, amax=larger)}


def agreement(tables: dict[str, Any], plans: list[str], cache: Path, engines: Path,
              threads: int | None) -> dict[str, Any]:
    """Greedy agreement with the FP32 cache engine of each plan x table's INT8 cache engine."""
    from quantkit.build import build_engine
    from quantkit.generation_check import describe, greedy_agreement

    fp32 = engines / "fp32"
    if not fp32.exists():
        build_engine(fp32, precision="fp32", onnx=cache)
    out: dict[str, Any] = {}
    for plan in plans:
        tag = "int8" if plan == "int8" else Path(plan).stem
        for name, table in tables.items():
            engine = engines / f"{tag}-{name}"
            if not engine.exists():
                build_engine(engine, precision="int8", onnx=cache, table=table,
                             plan=None if plan == "int8" else Path(plan))
            result = greedy_agreement(fp32, engine, threads=threads)
            out[f"{tag}/{name}"] = result
            print(f"{tag:16} {name:6} {describe(result)}", flush=True)
    return out


def cpu_name() -> str:
    """Model name, family, model and VNNI from /proc/cpuinfo."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    vnni = "avx512_vnni" in text
    return (f"{fields.get('model name', '?')}, cpu family {fields.get('cpu family', '?')} "
            f"model {fields.get('model', '?')}, {'with' if vnni else 'without'} AVX-512 VNNI")


def main(argv: list[str] | None = None) -> int:
    """Measure, print the per-kind table, optionally write JSON; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plain", type=Path, required=True, help="plain export (dir or .onnx)")
    parser.add_argument("--cache", type=Path, required=True, help="--with-cache export")
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--split", default="test[:40%]")
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--prefill", type=int, default=64)
    parser.add_argument("--method", default="entropy", help="the full-sequence table's method")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--save-stats", type=Path, default=None,
                        help="folder for both regimes' histograms (full.npz, decode.npz)")
    parser.add_argument("--agreement", action="append", default=[], metavar="PLAN",
                        help="score INT8 cache engines of this plan ('int8': every MatMul)")
    parser.add_argument("--agreement-method", default="percentile")
    parser.add_argument("--engines", type=Path, default=None,
                        help="folder for --agreement's engines (kept; existing ones reused)")
    args = parser.parse_args(argv)
    if not 0 < args.prefill < args.seq_len:
        parser.error("--prefill must be between 1 and --seq-len - 1")
    if args.agreement and args.engines is None:
        parser.error("--agreement needs --engines")

    from quantkit.calib.collect import collect_activation_stats
    from quantkit.calib.stats import calibrate
    from quantkit.data import TokenBlocks, resolve_text_source
    from quantkit.export import find_onnx, tokenizer_beside

    plain, cache = find_onnx(args.plain), find_onnx(args.cache)
    source = resolve_text_source(args.dataset, None, args.split, "text")
    blocks = TokenBlocks(source, tokenizer_beside(plain), seq_len=args.seq_len,
                         num_samples=args.num_samples, batch_size=4)
    t0 = time.perf_counter()
    full = collect_activation_stats(plain, blocks, tensors="quantizable",
                                    num_threads=args.threads)
    t1 = time.perf_counter()
    decode = collect_activation_stats(
        cache, decode_feeds(cache, blocks.blocks, args.prefill, args.threads),
        tensors="quantizable", num_threads=args.threads)
    t2 = time.perf_counter()
    if args.save_stats is not None:
        args.save_stats.mkdir(parents=True, exist_ok=True)
        full.save(args.save_stats / "full.npz")
        decode.save(args.save_stats / "decode.npz")
    table = calibrate(full, args.method)
    decode_table = calibrate(decode, args.method)

    rows = []
    for pair in operand_pairs(plain, cache):
        f, d = tensor_numbers(full, pair["plain"]), tensor_numbers(decode, pair["cache"])
        if (f is None or d is None or pair["plain"] not in table.amax
                or pair["cache"] not in decode_table.amax):
            continue
        limit = table.amax[pair["plain"]]
        rows.append({**pair, "label": label(pair), "full": f, "decode": d,
                     "amax_ratio": d["amax"] / f["amax"], "p9999_ratio": d["p9999"] / f["p9999"],
                     "table_amax": limit, "decode_amax_over_table": d["amax"] / limit,
                     "table_ratio": decode_table.amax[pair["cache"]] / limit,
                     "decode_clipped": clipped_share(decode.histograms[pair["cache"]], limit),
                     "full_clipped": clipped_share(full.histograms[pair["plain"]], limit)})
    summary = summarise(rows)
    print(f"CPU: {cpu_name()}")
    print(f"full: {full.num_samples} x {args.seq_len} tokens in {t1 - t0:.0f} s; decode: "
          f"{args.seq_len - args.prefill} steps x {args.num_samples} rows (past "
          f"{args.prefill}..{args.seq_len - 1}) in {t2 - t1:.0f} s; {len(rows)} operands; "
          f"table: {args.method}")
    head = (f"{'operand':14} {'n':>3}  amax ratio min/med/max  p99.99 ratio min/med/max  "
            f"{args.method} ratio min/med/max  clipped dec/full (max)")
    print(head)
    for key, s in summary.items():
        print(f"{key:14} {s['tensors']:3d}  {s['amax_min']:.3f} {s['amax_median']:.3f} "
              f"{s['amax_max']:.3f}     {s['p9999_min']:.3f} {s['p9999_median']:.3f} "
              f"{s['p9999_max']:.3f}       {s['table_min']:.3f} {s['table_median']:.3f} "
              f"{s['table_max']:.3f}        {s['clipped_max']:.1e} / {s['full_clipped_max']:.1e}")
    agreed = None
    if args.agreement:
        tables = range_tables(full, decode, args.agreement_method, plain, cache)
        agreed = agreement(tables, args.agreement, cache, args.engines, args.threads)
    if args.json is not None:
        args.json.write_text(json.dumps({"cpu": cpu_name(), "args": {
            k: str(v) for k, v in vars(args).items()}, "summary": summary, "rows": rows,
            "agreement": agreed}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
