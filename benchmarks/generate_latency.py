"""Generation on a CPU: time to first token, time per output token and tokens/s of quantkit's
FP32 and INT8 KV-cache engines, ONNX Runtime's own ``quantize_static`` model of the same cache
graph, and Hugging Face transformers (PyTorch FP32, its own KV cache) — one run, same prompt,
same threads, engines interleaved round by round so load from other processes hits all alike.

Every engine greedy-decodes ``--new-tokens`` after the same ``--prompt-tokens`` of real text
(the bundled sample's evaluation file) at batch 1: TTFT is the prefill of the prompt, the
per-token time a decode step against a cache of ``prompt-tokens`` to ``prompt-tokens +
new-tokens`` positions. Also printed: the share of each engine's greedy tokens equal to quantkit
FP32's (free-running, ``quantkit.agreement``), beside its perplexity-free speed.

    python benchmarks/generate_latency.py --cache-export out/smollm2-cache \\
        --plain-export out/smollm2 --out out/bench-generate

``--cache-export``: ``quantkit export --model smollm2-135m --with-cache``; ``--plain-export``:
the plain export of the same model (``--with-nll``), which quantkit calibrates (percentile
ranges on the sample's calibration file) and whose table carries over to the cache graph. The
quantkit INT8 engine uses ``--plan`` (default ``configs/smollm2-135m.yaml``: every MatMul INT8
but the MLP down projections); ``--quantize-engine`` adds the cache engine that ``quantkit
quantize --with-cache`` built (the searched plan on the rotated cache graph). quantkit's engines
are built as ``quantkit build`` builds them (attention fused, ``quantkit.attention_fusion``);
``--exported-attention`` adds the same two with attention as exported, timed in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache-export", type=Path, required=True)
    p.add_argument("--plain-export", type=Path, required=True)
    p.add_argument("--model", default="smollm2-135m", help="for transformers (PyTorch FP32)")
    p.add_argument("--plan", type=Path, default=REPO / "configs" / "smollm2-135m.yaml")
    p.add_argument("--quantize-engine", type=Path, action="append", default=[],
                   help="also time this cache engine: `quantkit quantize --with-cache`'s "
                        "OUT/engines/cache-quantized (the searched plan, rotated, GPTQ weights); "
                        "repeatable")
    p.add_argument("--cache-engine", action="append", default=[], metavar="NAME=DIR",
                   help="also time this KV-cache engine folder under NAME (repeatable)")
    p.add_argument("--exported-attention", action="store_true",
                   help="also build and time quantkit's FP32 and INT8 engines with attention as "
                        "exported (build option attention=graph), beside the fused ones")
    p.add_argument("--out", type=Path, required=True, help="work folder (engines, table)")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (first is warm-up)")
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


class SessionRunner:
    """The ``run(feeds, outputs)`` that ``quantkit.generate.greedy_decode`` needs, over a plain
    ONNX file (ONNX Runtime's quantized model has no quantkit manifest)."""

    def __init__(self, path: Path, threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options,
                                            providers=["CPUExecutionProvider"])

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        names = [i.name for i in self.session.get_inputs()]
        return dict(zip(outputs, self.session.run(outputs, {k: feeds[k] for k in names}),
                        strict=True))


class TorchRunner:
    """Greedy decoding in PyTorch with transformers' own cache: what a user runs without
    quantkit (``model.generate(do_sample=False)`` does the same steps)."""

    def __init__(self, model: Any, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)
        self.model = model.eval()

    def decode(self, prompt: list[int], new_tokens: int) -> tuple[list[int], float, list[float]]:
        import torch

        with torch.no_grad():
            start = time.perf_counter()
            out = self.model(input_ids=torch.tensor([prompt]), use_cache=True)
            token = int(out.logits[0, -1].argmax())
            ttft = time.perf_counter() - start
            tokens, steps, past = [token], [], out.past_key_values
            for _ in range(new_tokens - 1):
                t0 = time.perf_counter()
                out = self.model(input_ids=torch.tensor([[token]]), past_key_values=past,
                                 use_cache=True)
                token, past = int(out.logits[0, -1].argmax()), out.past_key_values
                steps.append(time.perf_counter() - t0)
                tokens.append(token)
        return tokens, ttft, steps


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def prompt_ids(tokenizer: Any, count: int) -> list[int]:
    from quantkit.data import SAMPLE_DIR

    text = (SAMPLE_DIR / "evaluation.txt").read_text(encoding="utf-8")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < count:
        raise SystemExit(f"the sample has {len(ids)} tokens, fewer than --prompt-tokens {count}")
    return list(ids[:count])


def build_engines(args: argparse.Namespace) -> dict[str, Path]:
    """quantkit FP32 and INT8 cache engines, and ONNX Runtime's quantize_static model."""
    from benchmarks.latency_ort_int8 import ort_quantize_static
    from quantkit.backends.base import Engine
    from quantkit.build import build_engine
    from quantkit.calib.run import CalibrationRequest, run_calibration
    from quantkit.export import find_onnx
    from quantkit.generate import engine_cache_layout

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    calib = out / "calibration"
    if not (calib / "table.json").is_file():
        run_calibration(CalibrationRequest(onnx=args.plain_export, dataset="sample",
                                           split="train", num_samples=32, seq_len=256,
                                           method="percentile", tensors="quantizable"), calib)
    engines = {"quantkit FP32": out / "fp32", "quantkit INT8": out / "int8"}
    variants = [("", "auto")]
    if args.exported_attention:
        variants.append((" (attention as exported)", "graph"))
        engines.update({f"quantkit FP32{variants[1][0]}": out / "fp32-graph",
                        f"quantkit INT8{variants[1][0]}": out / "int8-graph"})
    for label, attention in variants:
        fp32, int8 = engines[f"quantkit FP32{label}"], engines[f"quantkit INT8{label}"]
        if not (fp32 / "manifest.json").is_file():
            build_engine(fp32, precision="fp32", onnx=args.cache_export,
                         options={"attention": attention})
        if not (int8 / "manifest.json").is_file():
            build_engine(int8, precision="mixed", onnx=args.cache_export, plan=args.plan,
                         table=calib / "table.json", table_onnx=find_onnx(args.plain_export),
                         options={"attention": attention})
    ort_model = out / "ort-quantize-static.onnx"
    if not ort_model.is_file():
        layout = engine_cache_layout(Engine.load(engines["quantkit FP32"]))
        from quantkit.data import TokenBlocks, resolve_text_source
        from quantkit.export_cache import hf_positions
        from quantkit.models import load_tokenizer

        tokenizer = load_tokenizer(args.cache_export / "tokenizer")
        blocks = TokenBlocks(resolve_text_source("sample", split="train"), tokenizer,
                             seq_len=256, num_samples=32, batch_size=1, seed=0)
        feeds = [{**b, "position_ids": hf_positions(b["attention_mask"]),
                  **layout.empty_past(1)} for b in blocks]
        ort_quantize_static(find_onnx(args.cache_export), ort_model, feeds)
    for path in args.quantize_engine:
        manifest = Engine.load(path).manifest
        coverage = manifest.get("int8_coverage")
        share = f", {100 * coverage:.1f} % INT8" if isinstance(coverage, float) else ""
        fused = (manifest.get("attention") or {}).get("fused")
        engines[f"quantkit quantize plan{share}, attention "
                f"{'fused' if fused else 'as exported'}"] = path
    for spec in args.cache_engine:
        name, _, path = spec.partition("=")
        if not path:
            print(f"--cache-engine {spec!r}: expected NAME=DIR", file=sys.stderr)
            raise SystemExit(2)
        engines[name] = Path(path)
    return {**engines, "ONNX Runtime quantize_static": ort_model}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from quantkit.agreement import compare_tokens
    from quantkit.backends.base import Engine
    from quantkit.environment import cpu_isa
    from quantkit.generate import engine_cache_layout, greedy_decode
    from quantkit.models import load_model, load_tokenizer

    paths = build_engines(args)
    layout = engine_cache_layout(Engine.load(paths["quantkit FP32"]))
    tokenizer = load_tokenizer(args.cache_export / "tokenizer")
    prompt = prompt_ids(tokenizer, args.prompt_tokens)
    runners: dict[str, Any] = {}
    for name, path in paths.items():
        onnx = path if path.suffix == ".onnx" else path / "engine.onnx"
        runners[name] = SessionRunner(onnx, args.threads)
    torch_runner = TorchRunner(load_model(args.model).model, args.threads)

    ttft: dict[str, list[float]] = {k: [] for k in [*runners, "transformers (PyTorch FP32)"]}
    steps: dict[str, list[float]] = {k: [] for k in ttft}
    tokens: dict[str, list[int]] = {}
    for round_ in range(args.rounds):
        for name, runner in runners.items():
            got, timing = greedy_decode(runner, layout, [prompt], args.new_tokens, pad_id=0)
            if round_:
                ttft[name].append(timing.ttft_s)
                steps[name] += timing.decode_steps_s
            tokens[name] = got[0]
        got_t, t_ttft, t_steps = torch_runner.decode(prompt, args.new_tokens)
        if round_:
            ttft["transformers (PyTorch FP32)"].append(t_ttft)
            steps["transformers (PyTorch FP32)"] += t_steps
        tokens["transformers (PyTorch FP32)"] = got_t

    print(f"CPU: {cpu_model()}, {cpu_isa().describe()}; {args.threads} threads; batch 1, "
          f"prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens, "
          f"{args.rounds - 1} timed rounds (+1 warm-up)")
    fp32 = tokens["quantkit FP32"]
    base = statistics.median(steps["quantkit FP32"])
    hf = statistics.median(steps["transformers (PyTorch FP32)"])
    print("| engine | TTFT p50 ms | per-token p50 ms | per-token p90 ms | tokens/s | "
          "vs quantkit FP32 per token | decode speed vs transformers | greedy tokens = FP32 |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name in ttft:
        p50 = statistics.median(steps[name])
        p90 = float(np.percentile(steps[name], 90))
        first = statistics.median(ttft[name])
        rate = args.new_tokens / (first + p50 * (args.new_tokens - 1))
        same = compare_tokens([fp32], [tokens[name]]).token_match
        print(f"| {name} | {1e3 * first:.1f} | {1e3 * p50:.1f} | {1e3 * p90:.1f} | "
              f"{rate:.2f} | {p50 / base:.2f}× | {hf / p50:.2f}× | {100 * same:.0f} % |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
