"""Peak memory of creating (and optionally running) an ONNX Runtime session on one ONNX file,
under the session settings that could change it: each setting in a fresh process, its peak RSS
(``ru_maxrss``) printed beside a process that only imports onnxruntime, measured in the same run.

    python benchmarks/ort_session_memory.py out/engine/engine.onnx --run-seq 512

What the settings are for: a build inspects its engine by letting ONNX Runtime write its
optimized graph (``optimized_model_filepath``), inline or with the initializers in a file of
their own; ``session.disable_prepacking`` keeps weights in the layout they were loaded in
(no second, prepacked copy); ``session.use_env_allocators`` shares the environment's allocator.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

SETTINGS = {
    "import only": {},
    "run session (all optimizations)": {"session": True},
    "run session, disable_prepacking": {"session": True, "disable_prepacking": True},
    "run session, use_env_allocators": {"session": True, "use_env_allocators": True},
    "inspect: optimized model inline": {"session": True, "dump": "inline"},
    "inspect: optimized model, external initializers": {"session": True, "dump": "external"},
    "inspect: external initializers, disable_prepacking": {
        "session": True, "dump": "external", "disable_prepacking": True},
}

_CHILD = r"""
import json, resource, sys, time
import numpy as np
import onnxruntime as ort
cfg = json.loads(sys.argv[1])
start = time.perf_counter()
if cfg.get("session"):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if cfg.get("disable_prepacking"):
        so.add_session_config_entry("session.disable_prepacking", "1")
    if cfg.get("use_env_allocators"):
        so.add_session_config_entry("session.use_env_allocators", "1")
    if cfg.get("dump"):
        so.optimized_model_filepath = cfg["dump_path"]
        if cfg["dump"] == "external":
            so.add_session_config_entry(
                "session.optimized_model_external_initializers_file_name", "optimized.onnx.data")
            so.add_session_config_entry(
                "session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    sess = ort.InferenceSession(cfg["onnx"], so, providers=["CPUExecutionProvider"])
    created = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if cfg.get("run_seq"):
        ids = np.ones((1, cfg["run_seq"]), np.int64)
        names = [i.name for i in sess.get_inputs()]
        feed = {n: ids for n in names if n in ("input_ids", "attention_mask")}
        sess.run(["logits"], feed)
else:
    created = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"created_kb": created,
                  "peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "seconds": time.perf_counter() - start}))
"""


def measure(onnx_path: Path, setting: dict, run_seq: int | None) -> dict:
    with tempfile.TemporaryDirectory(prefix="ort-mem-") as tmp:
        cfg = {**setting, "onnx": str(onnx_path), "dump_path": str(Path(tmp) / "optimized.onnx"),
               "run_seq": run_seq if setting.get("session") and not setting.get("dump") else None}
        done = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(cfg)], check=True,
                              capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("onnx", type=Path)
    p.add_argument("--run-seq", type=int, default=None,
                   help="also run one 1 x N forward pass in the run sessions")
    p.add_argument("--only", nargs="*", default=None, help="settings to measure (names)")
    args = p.parse_args(argv)
    if not args.onnx.is_file():
        print(f"{args.onnx} is not a file", file=sys.stderr)
        return 2
    data = Path(f"{args.onnx}.data")
    weights = sum(f.stat().st_size for f in (args.onnx, data) if f.is_file())
    print(f"{args.onnx}: {weights / 1e9:.3f} GB on disk")
    print("| setting | peak RSS after creation | peak RSS | seconds |")
    print("| --- | ---: | ---: | ---: |")
    for name, setting in SETTINGS.items():
        if args.only and name not in args.only:
            continue
        r = measure(args.onnx, setting, args.run_seq)
        created, peak = r["created_kb"] * 1024 / 1e9, r["peak_kb"] * 1024 / 1e9
        print(f"| {name} | {created:.2f} GB | {peak:.2f} GB | "
              f"{r['seconds']:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
