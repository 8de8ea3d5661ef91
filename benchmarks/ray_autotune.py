"""``quantkit autotune`` serially and with ``--ray`` on a local Ray of 1, 2, ... CPUs: wall time,
the plan (it must be the same) and Ray's own cost per task.

Each mode starts from an empty measurement cache of its own, so every mode runs every
measurement. Ray is started before the timed call (its start is reported apart) with the
``runtime_env`` that ``--ray local`` gives it; the timed call includes the workers building their
probe sessions (the driver's too, after an untimed first load that pays the imports). Ratios
are against the serial run of the same inputs in this run. The overhead per task is the mean
round trip of ``--noop-tasks`` empty tasks submitted ``workers`` at a time.

    python benchmarks/ray_autotune.py --onnx out/smollm2 --table out/calib/table.json \\
        --dataset sample --split test --max-length 128 --methods minmax --workers 1,2

Compare with ``--threads 1`` (the default here): one measurement per CPU, so the serial run is
one worker.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def _noop() -> None:
    return None


def noop_overhead(ray: Any, count: int, width: int) -> float:
    """Mean seconds per empty task, ``width`` in flight at a time."""
    task = ray.remote(num_cpus=1)(_noop)
    ray.get([task.remote() for _ in range(width)])  # workers started
    started = time.perf_counter()
    for i in range(0, count, width):
        ray.get([task.remote() for _ in range(min(width, count - i))])
    return (time.perf_counter() - started) / count


def comparable(out: Path) -> Any:
    """What must not depend on how the search ran."""
    tuned = json.loads((out / "autotune.json").read_text())
    for key in ("seconds", "parallel"):
        tuned.pop(key, None)
    return (tuned, (out / "plan.yaml").read_bytes(), (out / "table.json").read_bytes())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--onnx", type=Path, required=True)
    parser.add_argument("--table", type=Path, required=True)
    parser.add_argument("--dataset", default="sample")
    parser.add_argument("--split", default="test")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--rank-windows", type=int, default=1)
    parser.add_argument("--search-windows", type=int, default=2)
    parser.add_argument("--holdout-windows", type=int, default=2)
    parser.add_argument("--methods", default="minmax")
    parser.add_argument("--budget", default="1%")
    parser.add_argument("--max-evals", type=int, default=12)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workers", default="1,2", help="Ray CPUs of each Ray run")
    parser.add_argument("--noop-tasks", type=int, default=200)
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    import ray

    import quantkit
    from quantkit.tune.autotune import autotune
    from quantkit.tune.budget import AutotuneSettings, Budget
    from quantkit.tune.context import TuneSettings, load_context

    work = args.work or Path(tempfile.mkdtemp(prefix="ray-autotune-"))
    settings = AutotuneSettings(budget=Budget.parse(args.budget), max_evals=args.max_evals,
                                methods=tuple(m for m in args.methods.split(",") if m),
                                build=False)
    # imports and first-load costs paid before any timed run (the first would carry them)
    load_context(TuneSettings(onnx=args.onnx, table=args.table, dataset=args.dataset,
                              split=args.split, max_length=args.max_length,
                              threads=args.threads, cache_dir=work / "warmup"),
                 settings.methods).close()
    rows: list[dict[str, Any]] = []
    modes = [0, *(int(w) for w in args.workers.split(","))]  # 0: serial
    for workers in modes:
        name = "serial" if workers == 0 else f"ray-{workers}"
        tune = TuneSettings(onnx=args.onnx, table=args.table, dataset=args.dataset,
                            split=args.split, max_length=args.max_length,
                            rank_windows=args.rank_windows, search_windows=args.search_windows,
                            holdout_windows=args.holdout_windows, batch_size=1,
                            threads=args.threads, cache_dir=work / name / "cache")
        row: dict[str, Any] = {"mode": name, "ray_start_s": None, "noop_ms": None}
        if workers:
            started = time.perf_counter()
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False,
                     runtime_env={"py_modules": [str(Path(quantkit.__file__).parent)]})
            row["ray_start_s"] = time.perf_counter() - started
            row["noop_ms"] = 1000 * noop_overhead(ray, args.noop_tasks, workers)
        try:
            started = time.perf_counter()
            result = autotune(tune, settings, work / name / "out", force=True,
                              ray_address="local" if workers else None)
            row["autotune_s"] = time.perf_counter() - started
        finally:
            if workers:
                ray.shutdown()
        row["model_runs"] = result.model_runs
        row["tasks"] = (result.parallel or {}).get("tasks")
        row["unread"] = (result.parallel or {}).get("unread")
        row["plan"] = hashlib.sha256((work / name / "out" / "plan.yaml").read_bytes()
                                     ).hexdigest()[:16]
        row["same_as_serial"] = comparable(work / name / "out") == \
            comparable(work / "serial" / "out")
        rows.append(row)
        print(json.dumps(row), flush=True)
    from benchmarks.markdown import or_dash, print_table

    base = rows[0]["autotune_s"]
    print()
    print_table(["mode", "Ray start s", "empty task ms", "autotune s", "vs serial",
                 "model runs", "tasks (unread)", "plan sha256", "same as serial"],
                [[r["mode"], or_dash(r["ray_start_s"], ".1f"), or_dash(r["noop_ms"], ".2f"),
                  f"{r['autotune_s']:.1f}", f"{base / r['autotune_s']:.2f}x",
                  str(r["model_runs"]),
                  f"{r['tasks']} ({r['unread']})" if r["tasks"] is not None else "—",
                  str(r["plan"]), "yes" if r["same_as_serial"] else "NO"] for r in rows])


if __name__ == "__main__":
    main()
