"""Entropy calibration: wall time and peak memory of quantkit's streaming collector against
ONNX Runtime's entropy calibrator and a plain FP32 ONNX Runtime pass over the same batches.

Every measurement runs in a subprocess of its own (a fresh interpreter, so ``ru_maxrss`` is that
run's peak) on the same ONNX file and the same saved batches. Times cover everything after the
imports: loading the model, the passes over the batches and, for the calibrators, computing the
entropy ranges. Ratios are against the plain pass of the same model and batches in this run.

    python benchmarks/calibrate_memory_speed.py --models gpt2 --batches 16,64
    python benchmarks/calibrate_memory_speed.py --models smollm2 --batches 2 \\
        --batch-size 8 --seq-len 512 --runs plain,quantkit-all

Models: ``gpt2`` is the GPT-2 124M shape with random weights (GPT2Config(), seed 0; batches of
random token ids); ``smollm2`` is SmolLM2-135M from ``quantkit.models`` (batches of WikiText-2
test text from ../shared when present, else the bundled sample). Exports are cached in --work.

Runs: ``plain`` (InferenceSession.run over the batches), ``quantkit-all`` / ``quantkit-quantizable``
(collect_activation_stats with tensors=all / quantizable, then calibrate(entropy)), the same
with ``-thread`` (histograms on a second thread while the next segment runs),
``ort-entropy`` (create_calibrator(..., CalibrationMethod.Entropy, num_bins 2048) on all tensors)
and ``ort-entropy-matmul`` (the same on MatMul/Gemm inputs and outputs only).

Peak RSS is the child's VmHWM (/proc/self/status; ``ru_maxrss`` would include the parent's memory
at fork). ONNX Runtime's calibrator keeps every batch's outputs; its children run under an
address-space limit (--mem-limit-gb) so that they fail with MemoryError instead of taking the
machine down.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
RUNS = ("plain", "quantkit-all", "quantkit-quantizable", "quantkit-all-thread",
        "quantkit-quantizable-thread", "ort-entropy", "ort-entropy-matmul")


# ---------------------------------------------------------------- preparation (parent)
def prepare_model(name: str, work: Path) -> Path:
    out = work / name
    onnx_path = out / "model.onnx"
    if onnx_path.is_file():
        return onnx_path
    sys.path.insert(0, str(REPO))
    from quantkit.export import export_model
    from quantkit.models import LoadedModel, ModelSpec, load_model

    if name == "gpt2":
        import torch
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config()).eval()
        loaded = LoadedModel(model, None, ModelSpec("dir", "gpt2-124m-random"),
                             {"kind": "benchmark", "name": "gpt2-124m-random"})
    elif name == "smollm2":
        loaded = load_model("smollm2-135m")
    else:
        raise SystemExit(f"unknown model {name}")
    print(f"exporting {name} to {out} ...", flush=True)
    export_model(loaded, out, force=True)
    return onnx_path


def prepare_batches(name: str, work: Path, count: int, batch: int, seq: int) -> Path:
    path = work / f"batches-{name}-{count}x{batch}x{seq}.npz"
    if path.is_file():
        return path
    if name == "gpt2":
        rng = np.random.default_rng(0)
        ids = rng.integers(0, 50257, size=(count * batch, seq), dtype=np.int64)
    else:
        sys.path.insert(0, str(REPO))
        from quantkit.data import TokenBlocks, resolve_text_source
        from quantkit.models import load_tokenizer

        wiki = REPO.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
        source = resolve_text_source(str(wiki) if wiki.is_file() else "sample", split="train")
        tokenizer = load_tokenizer(work / name / "tokenizer")
        blocks = TokenBlocks(source, tokenizer, seq_len=seq, num_samples=count * batch,
                             batch_size=batch)
        ids = blocks.blocks
    np.savez(path, input_ids=ids, batch=np.array(batch))
    return path


# ---------------------------------------------------------------- measurement (child)
def load_batches(path: Path, count: int) -> list[dict[str, np.ndarray]]:
    with np.load(path) as data:
        ids, batch = data["input_ids"], int(data["batch"])
    out = []
    for i in range(count):
        block = np.ascontiguousarray(ids[i * batch : (i + 1) * batch])
        out.append({"input_ids": block, "attention_mask": np.ones_like(block)})
    return out


def peak_rss_mb() -> float:
    """High-water mark of this process's resident memory (reset at exec, unlike ru_maxrss)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(args: argparse.Namespace) -> None:
    if args.run.startswith("ort-entropy") and args.mem_limit_gb:
        limit = int(args.mem_limit_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    sys.path.insert(0, str(REPO))
    import onnxruntime as ort

    batches = load_batches(Path(args.batches_file), args.count)
    result: dict[str, object] = {"run": args.run, "ok": True}
    start = time.perf_counter()
    cpu0 = time.process_time()
    try:
        if args.run == "plain":
            sess = ort.InferenceSession(args.onnx, providers=["CPUExecutionProvider"])
            result["setup_s"] = time.perf_counter() - start
            for feed in batches:
                sess.run(None, feed)
        elif args.run.startswith("quantkit"):
            from quantkit.calib import calibrate
            from quantkit.calib.collect import collect_activation_stats

            marks: list[float] = []
            stats = collect_activation_stats(
                args.onnx, batches, tensors=args.run.split("-")[1],
                background=args.run.endswith("-thread"),
                progress=lambda b, t: marks.append(time.perf_counter()))
            collected = time.perf_counter()
            table = calibrate(stats, "entropy")
            result.update(
                first_batch_s=marks[0] - start, collect_s=collected - start,
                entropy_s=time.perf_counter() - collected, tensors=len(stats.histograms),
                fetched=len(stats.unique_histograms()), skipped=len(stats.skipped),
                ranges=len(table.amax), peak_activation_mb=stats.peak_activation_bytes / 2**20,
                histogram_mb=stats.nbytes / 2**20)
        elif args.run.startswith("ort-entropy"):
            from onnxruntime.quantization.calibrate import (
                CalibrationDataReader,
                CalibrationMethod,
                create_calibrator,
            )

            class Reader(CalibrationDataReader):
                def __init__(self) -> None:
                    self.it = iter(batches)

                def get_next(self):  # noqa: ANN201
                    return next(self.it, None)

            with tempfile.TemporaryDirectory() as tmp:
                ops = ["MatMul", "Gemm"] if args.run == "ort-entropy-matmul" else []
                cal = create_calibrator(args.onnx, ops, augmented_model_path=f"{tmp}/aug.onnx",
                                        calibrate_method=CalibrationMethod.Entropy,
                                        extra_options={"num_bins": 2048})
                cal.collect_data(Reader())
                ranges = cal.compute_data()
                result["ranges"] = len(list(ranges.keys()))
    except (MemoryError, Exception) as exc:  # report the failure as a measurement
        result["ok"] = False
        # ONNX Runtime puts the cause (e.g. a failed allocation) at the end of a long message
        message = " ".join(str(exc).split())
        if len(message) > 300:
            message = message[:150] + " ... " + message[-150:]
        result["error"] = f"{type(exc).__name__}: {message}"
    result["wall_s"] = time.perf_counter() - start
    result["cpu_s"] = time.process_time() - cpu0
    result["maxrss_mb"] = peak_rss_mb()
    print("RESULT " + json.dumps(result), flush=True)


def run_child(run: str, onnx: Path, batches_file: Path, count: int, mem_limit: float,
              timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--child", run, "--onnx", str(onnx),
           "--batches-file", str(batches_file), "--count", str(count),
           "--mem-limit-gb", str(mem_limit)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"run": run, "ok": False, "error": f"timed out after {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"run": run, "ok": False, "error": f"exit {proc.returncode}: {tail[:160]}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="gpt2", help="comma list: gpt2, smollm2")
    parser.add_argument("--batches", default="16,64", help="comma list of batch counts")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma list of {RUNS}")
    parser.add_argument("--ort-batches", default="2,4",
                        help="batch counts for ort-entropy (it keeps all outputs in memory)")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "qk-bench")
    parser.add_argument("--mem-limit-gb", type=float, default=12.0)
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--prepare", help=argparse.SUPPRESS)
    parser.add_argument("--onnx", help=argparse.SUPPRESS)
    parser.add_argument("--batches-file", help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.run = args.child
        child(args)
        return
    if args.prepare:
        prepare_model(args.prepare, args.work)
        for count in (int(c) for c in args.batches.split(",")):
            prepare_batches(args.prepare, args.work, count, args.batch_size, args.seq_len)
        return

    args.work.mkdir(parents=True, exist_ok=True)
    runs = [r for r in args.runs.split(",") if r]
    counts = [int(c) for c in args.batches.split(",")]
    ort_counts = [int(c) for c in args.ort_batches.split(",")]
    rows = []
    print(f"machine: {os.cpu_count()} cpus; batch {args.batch_size} x seq {args.seq_len}",
          flush=True)
    for model in args.models.split(","):
        # export and tokenize in a subprocess: this process stays small while children run
        subprocess.run([sys.executable, __file__, "--prepare", model, "--work", str(args.work),
                        "--batches", ",".join(map(str, sorted(set(counts) | set(ort_counts)))),
                        "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len)],
                       check=True)
        onnx_path = args.work / model / "model.onnx"
        ort_runs = any(r.startswith("ort-entropy") for r in runs)
        for count in sorted(set(counts) | (set(ort_counts) if ort_runs else set())):
            batches_file = (args.work /
                            f"batches-{model}-{count}x{args.batch_size}x{args.seq_len}.npz")
            plain = None
            for run in runs:
                is_ort = run.startswith("ort-entropy")
                if (is_ort and count not in ort_counts) or (not is_ort and count not in counts):
                    continue
                res = run_child(run, onnx_path, batches_file, count, args.mem_limit_gb,
                                args.timeout)
                res.update(model=model, batches=count)
                if run == "plain" and res.get("ok"):
                    plain = res
                if plain and res.get("ok"):
                    res["wall_ratio"] = res["wall_s"] / plain["wall_s"]
                    res["rss_ratio"] = res["maxrss_mb"] / plain["maxrss_mb"]
                    # CPU time of the whole process: less sensitive to other load than wall
                    res["cpu_ratio"] = res["cpu_s"] / plain["cpu_s"]
                rows.append(res)
                print(json.dumps(res), flush=True)
    print()
    print(f"| model | batches ({args.batch_size}x{args.seq_len}) | run | wall s | wall / plain "
          "| cpu s | cpu / plain | peak RSS MB | RSS / plain | note |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        note = r.get("error", "")
        if r.get("ok") and r["run"].startswith("quantkit"):
            note = (f"collect {r['collect_s']:.1f} s + entropy {r['entropy_s']:.1f} s; "
                    f"{r['fetched']} fetched / {r['tensors']} tensors, {r['skipped']} skipped")
        wall = f"{r['wall_s']:.1f}" if "wall_s" in r else "-"
        cpu = f"{r['cpu_s']:.1f}" if "cpu_s" in r else "-"
        rss = f"{r['maxrss_mb']:.0f}" if "maxrss_mb" in r else "-"
        wr = f"{r['wall_ratio']:.2f}" if "wall_ratio" in r else "-"
        rr = f"{r['rss_ratio']:.2f}" if "rss_ratio" in r else "-"
        cr = f"{r['cpu_ratio']:.2f}" if "cpu_ratio" in r else "-"
        print(f"| {r['model']} | {r['batches']} | {r['run']} | {wall} | {wr} | {cpu} | {cr} "
              f"| {rss} | {rr} | {note} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
