"""``quantkit doctor``: this machine, what quantkit does on it, and (``--tensorrt``) a TensorRT
self-test."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click


@click.command("doctor")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--tensorrt", "tensorrt", is_flag=True,
              help="Also build and run a tiny model through every TensorRT path (FP32, FP16, "
                   "implicit INT8 with the calibrator on TensorRT 10, explicit Q/DQ INT8) and "
                   "compare with ONNX Runtime; where TensorRT or a GPU is absent, say so.")
@click.option("--no-hub", is_flag=True, help="Do not test whether the Hugging Face Hub answers.")
@click.option("--workdir", type=click.Path(path_type=Path), default=None,
              help="Where --tensorrt builds its engines (a temporary directory inside it, "
                   "removed afterwards).")
def command(as_json: bool, tensorrt: bool, no_hub: bool, workdir: Path | None) -> None:
    """Print the CPU and its instruction set (and which INT8 weight layout quantkit builds here),
    cores, memory, ONNX Runtime, torch, GPUs, TensorRT, the Hub, the cache, and the defaults.

    \b
    quantkit doctor
    quantkit doctor --json
    quantkit doctor --tensorrt     # exits 1 if a TensorRT check fails, 0 if TensorRT is absent
    """
    from quantkit.doctor import (
        machine_report,
        machine_rows,
        render_table,
        run_tensorrt_checks,
        tensorrt_failed,
        tensorrt_summary,
    )

    report = machine_report(check_hub=not no_hub)
    checks = None
    if tensorrt:
        say = None if as_json else (lambda m: click.echo(m, err=True))
        checks = run_tensorrt_checks(workdir, say)
        report["tensorrt_checks"] = checks
    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))
    else:
        click.echo(render_table(machine_rows(report)))
        if checks is not None:
            click.echo("")
            click.echo(tensorrt_summary(checks))
    if checks is not None and tensorrt_failed(checks):
        sys.exit(1)
