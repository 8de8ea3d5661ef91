"""Perplexity-evaluation throughput against the engine's raw forward throughput, same windows.

For each way of getting NLL -- the fused ``nll`` output, and ``logits`` reduced on the host -- it
times, on one runner:

* raw: only ``runner.run(feeds, outputs=[that output])`` over the batches of windows, with every
  feed built beforehand (the engine's forward throughput, nothing else);
* eval: the whole ``evaluate_perplexity`` loop over the same windows and batches (feeds, engine,
  slicing, logits reduction, checks, accumulation). The runner it gets is wrapped so the time
  spent inside ``runner.run`` during the loop is recorded too.

Tokens/s counts the tokens fed to the engine (the sum of window lengths), the same number for both.
Two ratios are printed:

* ``ratio`` = eval tokens/s / raw tokens/s, from separate passes. Passes are interleaved (raw and
  eval of each output, their order alternating between repeats) ``--repeats`` times; on a busy
  machine the passes see different load, so the per-repeat ratios scatter.
* ``in-loop`` = time inside ``runner.run`` / whole loop time, within the same eval pass: the share
  of the loop that is the engine's forward pass, which machine load hits alike on both sides.

Target: both >= 0.90.

    python benchmarks/eval_throughput.py --engine out/fp32 \\
        --dataset ../shared/data/wikitext-2-raw/wiki.test.raw --limit-tokens 4096 --threads 2
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

TARGET = 0.90
REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run from a checkout: use its quantkit, not an installed one
    sys.path.insert(0, str(REPO))


class TimedRunner:
    """Delegates to a runner and adds up the seconds spent in ``run``."""

    def __init__(self, runner: Any) -> None:
        self.runner = runner
        self.seconds = 0.0

    @property
    def output_names(self) -> list[str]:
        return list(self.runner.output_names)

    def run(self, feeds: Any, outputs: Any = None) -> Any:
        start = time.perf_counter()
        try:
            return self.runner.run(feeds, outputs=outputs)
        finally:
            self.seconds += time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", required=True, type=Path, help="engine directory")
    parser.add_argument("--dataset", default="sample", help="text source (as quantkit eval)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit-tokens", type=int, default=4096)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--stride", type=int, default=None, help="default: max-length")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", default="nll,logits", help="comma-separated: nll, logits")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = parser.parse_args(argv)

    from quantkit.backends.base import Engine
    from quantkit.data import resolve_text_source
    from quantkit.environment import environment_info
    from quantkit.eval.perplexity import (
        evaluate_perplexity,
        logits_batch_cap,
        plan_windows,
        tokenize_text,
        window_batches,
        window_feeds,
    )
    from quantkit.eval.text import load_evaluation_text
    from quantkit.models import load_tokenizer

    engine = Engine.load(args.engine)
    stride = args.stride or args.max_length
    tokenizer = load_tokenizer(engine.path / str(engine.manifest.get("tokenizer", "tokenizer")))
    text = load_evaluation_text(resolve_text_source(args.dataset, split=args.split))
    ids = tokenize_text(tokenizer, text.text, args.limit_tokens).ids
    windows = plan_windows(len(ids), args.max_length, stride)
    vocab = int(engine.manifest.get("vocab_size") or len(tokenizer))
    fed = sum(w.length for w in windows)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]

    with engine.runner(threads=args.threads) as runner:
        missing = [m for m in modes if m not in runner.output_names]
        if missing:
            parser.error(f"engine has no output {', '.join(missing)}")
        batch_of = {
            "nll": args.batch_size,
            "logits": min(args.batch_size, logits_batch_cap(args.max_length, vocab)),
        }
        feeds = {m: [window_feeds(ids, b) for b in window_batches(windows, batch_of[m])]
                 for m in modes}

        def raw(mode: str) -> float:
            start = time.perf_counter()
            for feed in feeds[mode]:
                runner.run(feed, outputs=[mode])
            return time.perf_counter() - start

        def full(mode: str) -> tuple[float, float, float]:
            timed = TimedRunner(runner)
            start = time.perf_counter()
            result = evaluate_perplexity(timed, ids, args.max_length, stride, args.batch_size,
                                         use_nll=(mode == "nll"), vocab_size=vocab)
            return time.perf_counter() - start, timed.seconds, result.perplexity

        for mode in modes:  # warm-up: one batch each way
            runner.run(feeds[mode][0], outputs=[mode])
        times: dict[str, dict[str, list[float]]] = {
            m: {"raw": [], "eval": [], "in_loop": []} for m in modes}
        ppl: dict[str, float] = {}
        for repeat in range(args.repeats):
            for mode in modes:
                if repeat % 2:  # alternate which pass goes first
                    seconds, inside, ppl[mode] = full(mode)
                    times[mode]["raw"].append(raw(mode))
                else:
                    times[mode]["raw"].append(raw(mode))
                    seconds, inside, ppl[mode] = full(mode)
                times[mode]["eval"].append(seconds)
                times[mode]["in_loop"].append(inside)
                print(f"  repeat {repeat + 1}/{args.repeats} {mode:6s}: raw "
                      f"{times[mode]['raw'][-1]:.2f} s, eval {seconds:.2f} s "
                      f"({inside:.2f} s in runner.run)", file=sys.stderr)
        described = runner.describe()

    env = environment_info()
    print(f"\nengine {engine.path} ({engine.backend}, {engine.precision}); runner {described}")
    print(f"machine: {env['cpu']}, {env['cpu_count']} cores; load average at end "
          f"{os.getloadavg()[0]:.1f}")
    print(f"text: {args.dataset} first {len(ids)} tokens; {len(windows)} windows of "
          f"{args.max_length} (stride {stride}); {fed} tokens fed per pass; "
          f"{args.repeats} interleaved repeats\n")
    header = (f"{'output':8s} {'batch':>5s} {'raw tok/s':>10s} {'eval tok/s':>11s} "
              f"{'ratio':>6s}  {'per-repeat ratios':24s} {'in-loop':>7s}  perplexity")
    print(header)
    print("-" * len(header))
    rows: list[dict[str, Any]] = []
    ok = True
    for mode in modes:
        raw_s = statistics.median(times[mode]["raw"])
        eval_s = statistics.median(times[mode]["eval"])
        ratios = [r / e for r, e in zip(times[mode]["raw"], times[mode]["eval"], strict=True)]
        ratio = raw_s / eval_s
        in_loop = sum(times[mode]["in_loop"]) / sum(times[mode]["eval"])
        ok &= ratio >= TARGET and in_loop >= TARGET
        print(f"{mode:8s} {batch_of[mode]:5d} {fed / raw_s:10.1f} {fed / eval_s:11.1f} "
              f"{ratio:6.3f}  {' '.join(f'{r:.3f}' for r in ratios):24s} {in_loop:7.3f}  "
              f"{ppl[mode]:.4f}")
        rows.append({"output": mode, "batch": batch_of[mode], "raw_seconds": times[mode]["raw"],
                     "eval_seconds": times[mode]["eval"],
                     "in_runner_seconds": times[mode]["in_loop"], "raw_tokens_per_s": fed / raw_s,
                     "eval_tokens_per_s": fed / eval_s, "ratio": ratio, "in_loop": in_loop,
                     "perplexity": ppl[mode]})
    print(f"\ntarget: eval >= {TARGET:.0%} of raw forward throughput: "
          f"{'met' if ok else 'NOT met'}")
    if args.json:
        args.json.write_text(json.dumps({
            "engine": str(engine.path), "runner": described, "environment": env,
            "num_tokens": len(ids), "num_windows": len(windows), "tokens_fed": fed,
            "max_length": args.max_length, "stride": stride, "repeats": args.repeats,
            "command": " ".join([Path(sys.executable).name, *sys.argv]), "results": rows,
        }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
