"""The report on real inputs: ``quantkit eval`` results of two FP32 ONNX Runtime engines of a tiny
random Llama, and a ``quantkit calibrate`` directory (table.json, stats.npz, manifest.json) of its
ONNX export on the bundled sample text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from quantkit.cli.main import cli
from tests.eval.engines import built


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    models = tmp_path_factory.mktemp("eval-models")
    first, twin = built(models, "llama"), built(models, "llama-twin")
    results = root / "results.json"
    run = CliRunner().invoke(cli, [
        "eval", "--engine", str(first), "--engine", str(twin), "--dataset", "sample",
        "--limit-tokens", "400", "--max-length", "64", "--latency-grid", "1x32,2x64",
        "--warmup", "1", "--iterations", "3", "--threads", "1", "--out", str(results)])
    assert run.exit_code == 0, run.output

    calib = root / "calib"
    run = CliRunner().invoke(cli, [
        "calibrate", "--onnx", str(first.parent / "llama-export"), "--dataset", "sample",
        "--num-samples", "8", "--seq-len", "32", "--batch-size", "4", "--method", "percentile",
        "--percentile", "99.9", "--tensors", "quantizable", "--out", str(calib)])
    assert run.exit_code == 0, run.output
    from quantkit.calib import CalibrationTable

    table = CalibrationTable.load(calib / "table.json")
    return root, results, calib, table


def test_report_of_measured_results(measured):
    root, results, calib, table = measured
    out = root / "report"
    run = CliRunner().invoke(cli, ["report", str(results), "--calibration", str(calib),
                                   "--out", str(out)])
    assert run.exit_code == 0, run.output
    source = json.loads(results.read_text())
    report = json.loads((out / "report.json").read_text())
    assert [e["name"] for e in report["engines"]] == [e["name"] for e in source["engines"]]
    for mine, theirs in zip(report["engines"], source["engines"], strict=True):
        assert mine["perplexity"] == theirs["perplexity"]
        assert mine["delta_vs_fp32"] == {"abs": 0.0, "pct": 0.0}  # each FP32 engine is its own
        by_shape = {(r["batch"], r["seq"]): r for r in theirs["latency"]}
        assert mine["at_reference_shape"]["p50_ms"] == by_shape[(2, 64)]["p50_ms"]
        assert mine["at_reference_shape"]["speedup_vs_fp32"] == 1.0
    # Both engines run the same ONNX file on the same text: the same perplexity.
    assert report["engines"][0]["perplexity"] == report["engines"][1]["perplexity"]
    assert report["reference_shape"] == {"batch": 2, "seq": 64}
    assert report["precision_maps"] == []  # FP32 engines: nothing to map
    calib_summary = report["calibration"]
    assert calib_summary["method"] == "percentile"
    assert calib_summary["params"] == {"percentile": 99.9}
    assert calib_summary["num_samples"] == 8 and calib_summary["num_tokens"] == 8 * 32
    top = max(table.amax, key=lambda t: (table.amax[t], t))
    assert calib_summary["histogram"]["tensor"] == top
    assert calib_summary["histogram"]["image"] == "calibration-histogram.png"
    assert calib_summary["histogram"]["stats_file"] == "stats.npz"
    assert calib_summary["histogram"]["values"] > 0
    assert (out / "calibration-histogram.png").is_file()
    md = (out / "report.md").read_text()
    assert source["commands"][0] in md
    assert f"{source['engines'][0]['perplexity']:.3f}" in md


def test_reports_from_different_windows_are_refused(measured, tmp_path):
    root, results, _, _ = measured
    other = tmp_path / "other.json"
    data = json.loads(results.read_text())
    data["dataset"]["max_length"] = 32
    other.write_text(json.dumps(data))
    run = CliRunner().invoke(cli, ["report", str(results), str(other), "--out",
                                   str(tmp_path / "r")])
    assert run.exit_code == 2
    assert "not comparable" in run.output and "max_length: 64" in run.output
    assert not Path(tmp_path / "r").exists()
