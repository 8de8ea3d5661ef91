"""A sensitivity pass (autotune's first step: the FP32 baseline and one measurement per group,
submitted together) serially and on a local Ray of 1, 2, 4, ... CPUs: wall time, speedup, and
Ray's cost per task measured two ways; then a projection for a host with more workers.

Each mode starts from an empty measurement cache of its own, so every mode runs every
measurement, through ``quantkit.tune.sensitivity.measure_sensitivity`` and (Ray) the same
``quantkit.tune.ray_measure.attach`` that ``autotune --ray`` uses. Ray is started before the
timed pass (its start is reported apart) with the ``runtime_env`` ``--ray local`` gives it, and
its workers build their probe sessions before it too: ``workers`` copies of the baseline
measurement submitted at once, through the same executor, not cached (the setup, reported
apart: a serial run builds its one probe while loading, untimed). The driver's context is loaded
once untimed first (imports, the first read of the model).

Per-task overhead, two ways:

* empty task: the mean round trip of ``--noop-tasks`` tasks that return at once, ``workers`` in
  flight (Ray's dispatch alone);
* in the pass: ``(workers x wall - sum of the tasks' compute seconds) / tasks``, the worker
  time per task that went to anything but scoring (dispatch, results, the driver's cache
  writes, idle workers at the end); compute seconds are each measurement's own timing
  (``score``). With more workers than free cores, time slicing also lengthens the compute
  seconds themselves.

Projection (printed as such, not measured): ``pass(W) = max(ceil(N / W) x (t + o), N x o)``
with N the pass's measurements, t the serial compute seconds per measurement and o the
one-worker overhead per task, all of it taken as the driver's serial share (the conservative
bound: with one worker nothing overlaps it); plus S, the one-worker setup (Ray start and probe
build; W workers build theirs side by side), once per command.

    python benchmarks/random_model.py --like smollm2-135m --out out/random-smollm2
    quantkit export --model out/random-smollm2 --out out/random-smollm2-onnx --with-nll
    quantkit calibrate --onnx out/random-smollm2-onnx --dataset sample --split train \\
        --num-samples 16 --seq-len 128 --method minmax --tensors quantizable --out out/rcal
    python benchmarks/ray_sensitivity.py --onnx out/random-smollm2-onnx \\
        --table out/rcal/table.json --max-length 128 --workers 1,2,4
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def _noop() -> None:
    return None


def noop_overhead(ray: Any, count: int, width: int) -> float:
    """Mean seconds per empty task, ``width`` in flight at a time (workers started first)."""
    task = ray.remote(num_cpus=1)(_noop)
    ray.get([task.remote() for _ in range(width)])
    started = time.perf_counter()
    for i in range(0, count, width):
        ray.get([task.remote() for _ in range(min(width, count - i))])
    return (time.perf_counter() - started) / count


def rss_gib() -> float:
    """This process's peak resident memory (GiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--onnx", type=Path, required=True)
    parser.add_argument("--table", type=Path, required=True)
    parser.add_argument("--dataset", default="sample")
    parser.add_argument("--split", default="test")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--rank-windows", type=int, default=1)
    parser.add_argument("--groups", type=int, default=0,
                        help="measure the first N groups only (0: every group)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workers", default="1,2,4", help="Ray CPUs of each Ray run")
    parser.add_argument("--noop-tasks", type=int, default=200)
    parser.add_argument("--project", default="8,16,64", help="workers to project for")
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    import ray

    import quantkit
    from quantkit.tune.context import TuneSettings, load_context
    from quantkit.tune.ray_measure import attach
    from quantkit.tune.sensitivity import measure_sensitivity

    work = args.work or Path(tempfile.mkdtemp(prefix="ray-sensitivity-"))

    def settings(name: str) -> TuneSettings:
        return TuneSettings(onnx=args.onnx, table=args.table, dataset=args.dataset,
                            split=args.split, max_length=args.max_length,
                            rank_windows=args.rank_windows, batch_size=1,
                            threads=args.threads, cache_dir=work / name)

    subsets = {"rank": args.rank_windows}
    context = load_context(settings("warmup"), subsets=subsets)  # imports, first read
    only = [g.name for g in context.groups][: args.groups or None]
    print(json.dumps({"groups": len(context.groups), "measured_groups": len(only),
                      "driver_peak_rss_gib": round(rss_gib(), 2)}), flush=True)
    context.close()

    rows: list[dict[str, Any]] = []
    serial: dict[str, Any] = {}
    for workers in [0, *(int(w) for w in args.workers.split(","))]:  # 0: serial
        name = "serial" if workers == 0 else f"ray-{workers}"
        row: dict[str, Any] = {"mode": name, "workers": workers, "ray_start_s": None,
                               "noop_ms": None, "setup_s": None}
        if workers:
            started = time.perf_counter()
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False,
                     runtime_env={"py_modules": [str(Path(quantkit.__file__).parent)]})
            row["ray_start_s"] = time.perf_counter() - started
            row["noop_ms"] = 1000 * noop_overhead(ray, args.noop_tasks, workers)
        try:
            context = load_context(settings(name), subsets=subsets)
            executor = attach(ray, context, 2) if workers else None
            if executor is not None:  # each worker builds its probe: the setup, timed apart
                started = time.perf_counter()
                for _, done in executor.run([("rank", (), {})] * workers):
                    assert not isinstance(done, Exception), done
                row["setup_s"] = time.perf_counter() - started
                executor.submitted = 0
            started = time.perf_counter()
            result = measure_sensitivity(context, only=only)
            row["pass_s"] = time.perf_counter() - started
            measurer = context.measurer
            row["measurements"] = measurer.executed
            row["compute_s"] = (measurer.window_seconds() or 0.0) * measurer.executed \
                * args.rank_windows
            row["tasks"] = executor.submitted if executor is not None else None
            context.close()
        finally:
            if workers:
                ray.shutdown()
        numbers = {"baseline": result.baseline,
                   "groups": [(g.name, g.perplexity) for g in result.groups]}
        if not serial:
            serial = numbers
        row["same_as_serial"] = numbers == serial
        n = row["measurements"]
        row["compute_per_task_s"] = row["compute_s"] / n
        row["overhead_per_task_ms"] = 1000 * (max(1, workers) * row["pass_s"]
                                              - row["compute_s"]) / n
        rows.append(row)
        print(json.dumps(row), flush=True)

    from benchmarks.markdown import or_dash, print_table

    base = rows[0]["pass_s"]
    print()
    print_table(["mode", "Ray start s", "probe builds s", "empty task ms", "pass s", "vs serial",
                 "measurements", "compute s/task", "overhead ms/task", "same numbers"],
                [[r["mode"], or_dash(r["ray_start_s"], ".1f"), or_dash(r["setup_s"], ".1f"),
                  or_dash(r["noop_ms"], ".2f"), f"{r['pass_s']:.1f}",
                  f"{base / r['pass_s']:.2f}x", str(r["measurements"]),
                  f"{r['compute_per_task_s']:.3f}", f"{r['overhead_per_task_ms']:.0f}",
                  "yes" if r["same_as_serial"] else "NO"] for r in rows])

    one = next((r for r in rows if r["workers"] == 1), None)
    if one is None:
        return
    n, t = rows[0]["measurements"], rows[0]["compute_per_task_s"]
    o = one["overhead_per_task_ms"] / 1000
    fixed = one["ray_start_s"] + one["setup_s"]
    print(f"\nProjection (not measured): pass(W) = max(ceil(N/W) x (t + o), N x o); "
          f"N = {n} measurements, t = {t:.3f} s (serial compute per measurement), "
          f"o = {o * 1000:.0f} ms (one-worker overhead per task, all of it taken as the "
          f"driver's serial share); plus S = {fixed:.1f} s once per command (Ray start and "
          f"the workers' probe builds, side by side)")
    projected = {w: max(math.ceil(n / w) * (t + o), n * o)
                 for w in (int(x) for x in args.project.split(","))}
    print_table(["workers", "projected pass s", "vs serial pass (measured)", "with S"],
                [[str(w), f"{p:.1f}", f"{base / p:.1f}x", f"{fixed + p:.1f}"]
                 for w, p in projected.items()])


if __name__ == "__main__":
    main()
