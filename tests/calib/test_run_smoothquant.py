"""`quantkit calibrate --smoothquant`: the table belongs to the smoothed export it writes."""

from __future__ import annotations

import json

from click.testing import CliRunner

from quantkit.cli.main import cli


def test_calibrate_with_smoothquant_writes_the_smoothed_export(tiny_llama_export, tmp_path):
    out = tmp_path / "calib"
    result = CliRunner().invoke(cli, [
        "calibrate", "--onnx", str(tiny_llama_export.directory), "--dataset", "sample",
        "--num-samples", "4", "--seq-len", "32", "--batch-size", "2", "--method", "minmax",
        "--tensors", "quantizable", "--smoothquant", "0.5", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "build engines from" in result.output
    table = json.loads((out / "table.json").read_text())
    smoothed = json.loads((out / "smoothed" / "manifest.json").read_text())
    assert table["model_hash"] == smoothed["model_hash"]
    assert table["model_hash"] != tiny_llama_export.manifest["model_hash"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["files"]["onnx"] == "smoothed/model.onnx"

    build = CliRunner().invoke(cli, [
        "build", "--onnx", str(tiny_llama_export.directory), "--precision", "int8",
        "--table", str(out / "table.json"), "--out", str(tmp_path / "wrong")])
    assert build.exit_code == 2
    assert "smoothed/" in build.output
    ok = CliRunner().invoke(cli, [
        "build", "--onnx", str(out / "smoothed"), "--precision", "int8",
        "--table", str(out / "table.json"), "--out", str(tmp_path / "int8")])
    assert ok.exit_code == 0, ok.output


def test_bad_alpha_is_one_line(tiny_llama_export, tmp_path):
    result = CliRunner().invoke(cli, [
        "calibrate", "--onnx", str(tiny_llama_export.directory), "--dataset", "sample",
        "--num-samples", "4", "--seq-len", "32", "--smoothquant", "1.5",
        "--out", str(tmp_path / "c")])
    assert result.exit_code == 2
    assert "alpha must be within 0..1" in result.output
    assert not (tmp_path / "c").exists()
