"""``quantkit report``: results files -> report.md, report.html (self-contained) and report.json."""

from __future__ import annotations

from pathlib import Path

import click

from quantkit.cli.options import force_option, typed_command


@click.command("report")
@click.argument("results", nargs=-1, required=True, type=click.Path(path_type=Path),
                metavar="RESULTS.json...")
@click.option("--calibration", type=click.Path(path_type=Path), default=None, metavar="DIR",
              help="Calibration directory (quantkit calibrate) to summarise.")
@click.option("--histogram-tensor", default=None, metavar="NAME",
              help="Tensor whose histogram is drawn [default: the one with the largest amax].")
@click.option("--tuning", type=click.Path(path_type=Path), default=None, metavar="DIR",
              help="quantkit autotune (or sensitivity) directory: ranking and search path.")
@click.option("--out", required=True, type=click.Path(path_type=Path), metavar="DIR",
              help="Output directory for report.md, report.html, report.json and the plots.")
@force_option
def command(results: tuple[Path, ...], calibration: Path | None, histogram_tensor: str | None,
            tuning: Path | None, out: Path, force: bool) -> None:
    """Write an accuracy/speed report of the engines in RESULTS.json (from quantkit eval).

    Several results files are merged when they scored the same text with the same windows.
    Example:

      quantkit report results-gpu.json results-cpu.json --calibration out/calib --out out/report
    """
    from quantkit.report import build_report

    if histogram_tensor is not None and calibration is None:
        raise click.UsageError("--histogram-tensor needs --calibration")
    command_line = typed_command(click.get_current_context())
    report = build_report(list(results), out, calibration=calibration,
                          histogram_tensor=histogram_tensor, tuning=tuning, force=force,
                          command=command_line)
    front = report.data["pareto"]["front"]
    click.echo(f"{len(report.data['engines'])} engines; Pareto front: "
               f"{', '.join(front) if front else 'none'}")
    for note in report.data["notes"]:
        click.echo(f"Note: {note}")
    click.echo(f"Wrote {report.markdown}, {report.html.name} and {report.json.name}")
