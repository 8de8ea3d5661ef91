"""One decode step of KV-cache engines on a CPU: how the timing schedule changes what it measures,
and what the RMSNorm export form (``quantkit.rms_norm``) changes.

Every engine times one decode step (batch ``--batch``, a zero-filled past of ``--past``
positions, every output fetched: ``quantkit.eval.decode``) through quantkit's runner, under three
schedules in one run:

* ``one by one``: the engines take turns, one timed run each (how ``quantkit eval`` timed them
  before 2026-12-08);
* ``settled``: ``quantkit.eval.latency.interleaved_times`` (each turn opens with an untimed run,
  then up to 3 timed runs);
* ``blocks``: each engine alone for ``--runs`` timed runs after 3 untimed ones.

With ``--divide-rms``, each engine is also copied with its RMSNorms rewritten by
``quantkit.rms_norm.divide_by_root`` (into ``--work``), and originals and copies are timed in
alternating blocks of ``--runs`` (order reversed every round, ``--rounds`` rounds).

    python benchmarks/decode_step.py --engine fp32=out/q/t0/engines/cache-fp32 \\
        --engine quantized=out/q/t0/engines/cache-quantized --divide-rms --work out/bench-decode
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", action="append", required=True, metavar="NAME=DIR",
                   help="a KV-cache engine folder (repeat)")
    p.add_argument("--past", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--runs", type=int, default=30, help="timed runs per engine and schedule")
    p.add_argument("--rounds", type=int, default=4, help="alternating rounds of --divide-rms")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--divide-rms", action="store_true")
    p.add_argument("--work", type=Path, default=Path("out/bench-decode"))
    return p.parse_args(argv)


def divided_copy(engine_dir: Path, out: Path) -> Path | None:
    """``engine_dir`` copied to ``out`` with its RMSNorms as divisions; None if it has none."""
    import onnx

    from quantkit.rms_norm import divide_by_root

    model = onnx.load(str(engine_dir / "engine.onnx"))
    if not divide_by_root(model.graph):
        return None
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(engine_dir, out, ignore=shutil.ignore_patterns("engine.onnx*"))
    onnx.save(model, str(out / "engine.onnx"))
    return out


def p50_ms(times: list[float]) -> float:
    return 1e3 * statistics.median(times)


def schedules(runners: list[Any], feeds: dict[str, Any], runs: int) -> dict[str, list[float]]:
    """p50 ms of each runner under the three schedules of the module docstring."""
    from quantkit.eval.latency import interleaved_times

    for runner in runners:
        runner.benchmark(feeds, 3, 1)
    one: list[list[float]] = [[] for _ in runners]
    for _ in range(runs):
        for j, runner in enumerate(runners):
            one[j] += runner.benchmark(feeds, 0, 1)
    settled = interleaved_times(runners, feeds, 0, runs)
    blocks = [runner.benchmark(feeds, 3, runs) for runner in runners]
    return {"one by one": [p50_ms(t) for t in one],
            "settled": [p50_ms(t) for t in settled],
            "blocks": [p50_ms(t) for t in blocks]}


def alternating_blocks(runners: list[Any], feeds: dict[str, Any], runs: int,
                       rounds: int) -> list[float]:
    times: list[list[float]] = [[] for _ in runners]
    for r in range(rounds):
        order = range(len(runners)) if r % 2 == 0 else reversed(range(len(runners)))
        for j in order:
            times[j] += runners[j].benchmark(feeds, 3, runs)
    return [p50_ms(t) for t in times]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import numpy as np

    from quantkit.backends.base import Engine
    from quantkit.environment import cpu_isa, cpu_model
    from quantkit.eval.decode import decode_feeds, synthetic_past
    from quantkit.generate import engine_cache_layout

    engines: dict[str, Path] = {}
    for spec in args.engine:
        name, _, path = spec.partition("=")
        if not path or not (Path(path) / "engine.onnx").is_file():
            print(f"--engine {spec!r}: expected NAME=DIR of a quantkit engine", file=sys.stderr)
            return 2
        engines[name] = Path(path)
    loaded = {name: Engine.load(path) for name, path in engines.items()}
    layouts = {name: engine_cache_layout(e) for name, e in loaded.items()}
    layout = next(iter(layouts.values()))
    feeds = decode_feeds(layout, np.full(args.batch, 5, dtype=np.int64),
                         synthetic_past(layout, args.batch, args.past), args.past)
    print(f"CPU: {cpu_model()}, {cpu_isa().describe()}; {args.threads} threads; decode step, "
          f"batch {args.batch}, past {args.past}; {args.runs} timed runs per schedule")
    runners = [e.runner(threads=args.threads) for e in loaded.values()]
    for runner in runners:
        runner.activate()
    table = schedules(runners, feeds, args.runs)
    print("| engine | one by one p50 ms | settled p50 ms | blocks p50 ms |")
    print("| --- | ---: | ---: | ---: |")
    for j, name in enumerate(engines):
        print(f"| {name} | {table['one by one'][j]:.2f} | {table['settled'][j]:.2f} | "
              f"{table['blocks'][j]:.2f} |")
    for runner in runners:
        runner.deactivate()
    if not args.divide_rms:
        return 0
    pairs: list[tuple[str, Any, Any]] = []
    for name, path in engines.items():
        copy = divided_copy(path, args.work / f"{name}-div")
        if copy is None:
            print(f"{name}: no Mul(x, Reciprocal(Sqrt)) to rewrite (already divisions)")
            continue
        pairs.append((name, loaded[name].runner(threads=args.threads),
                      Engine.load(copy).runner(threads=args.threads)))
    if not pairs:
        return 0
    flat = [r for _, a, b in pairs for r in (a, b)]
    for runner in flat:
        runner.activate()
    p50 = alternating_blocks(flat, feeds, args.runs, args.rounds)
    print(f"\nRMSNorm as exported vs as divisions: alternating blocks of {args.runs}, "
          f"{args.rounds} rounds ({args.runs * args.rounds} runs each)")
    print("| engine | Mul(x, Reciprocal(Sqrt)) p50 ms | Div(x, Sqrt) p50 ms | ratio |")
    print("| --- | ---: | ---: | ---: |")
    for k, (name, _, _) in enumerate(pairs):
        before, after = p50[2 * k], p50[2 * k + 1]
        print(f"| {name} | {before:.2f} | {after:.2f} | {after / before:.3f} |")
    for runner in flat:
        runner.deactivate()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
