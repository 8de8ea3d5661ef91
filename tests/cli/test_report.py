"""`quantkit report` through click's CliRunner: output, one-line errors with exit code 2."""

from __future__ import annotations

import json

from click.testing import CliRunner

from quantkit.cli.main import cli
from tests.report.helpers import CALIB, ORT, TRT, altered


def test_report_writes_and_summarises(tmp_path):
    out = tmp_path / "r"
    result = CliRunner().invoke(cli, ["report", str(TRT), str(ORT), "--calibration", str(CALIB),
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert lines[0] == ("7 engines; Pareto front: int8@results-trt-h100, mixed, fp16, "
                        "fp32@results-trt-h100")
    assert lines[-1] == f"Wrote {out / 'report.md'}, report.html and report.json"
    data = json.loads((out / "report.json").read_text())
    assert data["generator"]["command"].startswith("quantkit ")
    assert data["calibration"]["histogram"]["image"] == "calibration-histogram.png"


def test_histogram_tensor_is_chosen(tmp_path):
    tensor = "/model/layers.0/input_layernorm/Mul_1_output_0"
    result = CliRunner().invoke(cli, ["report", str(TRT), "--calibration", str(CALIB),
                                      "--histogram-tensor", tensor, "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "r" / "report.json").read_text())
    amax = json.loads((CALIB / "table.json").read_text())["amax"][tensor]
    assert data["calibration"]["histogram"]["tensor"] == tensor
    assert data["calibration"]["histogram"]["amax"] == amax


def test_existing_output_without_force(tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    result = CliRunner().invoke(cli, ["report", str(TRT), "--out", str(out)])
    assert result.exit_code == 2
    assert result.output.strip() == f"Error: {out} already exists (pass --force to replace it)"
    forced = CliRunner().invoke(cli, ["report", str(TRT), "--out", str(out), "--force"])
    assert forced.exit_code == 0, forced.output
    assert (out / "report.html").is_file()


def test_missing_results_file(tmp_path):
    result = CliRunner().invoke(cli, ["report", str(tmp_path / "nope.json"), "--out",
                                      str(tmp_path / "r")])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"Error: results file {tmp_path / 'nope.json'} does not exist (pass a results.json "
        "written by 'quantkit eval')"]


def test_wrong_schema_version(tmp_path):
    bad = altered(TRT, tmp_path / "old.json", lambda d: d.update(schema="quantkit.results/0"))
    result = CliRunner().invoke(cli, ["report", str(bad), "--out", str(tmp_path / "r")])
    assert result.exit_code == 2
    assert "results schema 'quantkit.results/0' is not supported" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_incomparable_results(tmp_path):
    other = altered(ORT, tmp_path / "other.json", lambda d: d["dataset"].update(stride=256))
    result = CliRunner().invoke(cli, ["report", str(TRT), str(other), "--out",
                                      str(tmp_path / "r")])
    assert result.exit_code == 2
    assert "not comparable" in result.output and "stride: 512" in result.output
    assert not (tmp_path / "r").exists()


def test_histogram_tensor_needs_calibration(tmp_path):
    result = CliRunner().invoke(cli, ["report", str(TRT), "--histogram-tensor", "x", "--out",
                                      str(tmp_path / "r")])
    assert result.exit_code == 2
    assert "--histogram-tensor needs --calibration" in result.output


def test_help_lists_report():
    result = CliRunner().invoke(cli, ["--help"])
    assert "report" in result.output
