"""`quantkit calibrate` through click's CliRunner, on the tiny Llama export."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from quantkit.calib import ActivationStats, CalibrationTable, TrtCache, calibrate
from quantkit.calib.trt_cache import check_trt_cache
from quantkit.cli.main import cli

SMALL = ["--dataset", "sample", "--num-samples", "4", "--seq-len", "32", "--batch-size", "2"]


def invoke(*args: str):
    return CliRunner().invoke(cli, ["calibrate", *args])


@pytest.fixture(scope="module")
def export_dir(tiny_llama_export):
    return tiny_llama_export.directory


def test_calibrate_writes_table_cache_stats_summary_manifest(export_dir, tmp_path):
    out = tmp_path / "calib"
    result = invoke("--onnx", str(export_dir), *SMALL, "--trt-version", "10.3.0",
                    "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "Calibrated" in result.output and "mask: " in result.output
    assert sorted(p.name for p in out.iterdir()) == [
        "calibration.cache", "manifest.json", "stats.npz", "summary.json", "table.json"]

    table = CalibrationTable.load(out / "table.json")
    assert table.method == "entropy" and table.num_samples == 4 and table.num_tokens == 128
    assert any(why.startswith("mask:") for why in table.skipped.values())

    cache = TrtCache.read(out / "calibration.cache")
    assert cache.header == "TRT-100300-EntropyCalibration2"
    assert set(cache.scales) == set(table.amax)
    check_trt_cache(cache, algorithm="EntropyCalibration2", trt_version="10.3.0",
                    tensor_names=set(table.amax) | set(table.skipped))

    stats = ActivationStats.load(out / "stats.npz")
    assert calibrate(stats, "entropy") == table  # the stats recompute the same table
    assert set(calibrate(stats, "minmax").amax) == set(table.amax)

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "calibration"
    assert manifest["inputs"]["model_hash"] == table.model_hash
    assert manifest["inputs"]["data"]["num_samples"] == 4
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_ranges"] == len(table.amax)
    assert all(0.0 <= t["clipped_fraction"] <= 1.0 for t in summary["per_tensor"].values())

    again = invoke("--onnx", str(export_dir), *SMALL, "--out", str(out))
    assert again.exit_code == 2
    assert again.output.strip().splitlines() == [
        f"Error: {out} already exists (pass --force to replace it)"]
    forced = invoke("--onnx", str(export_dir), *SMALL, "--method", "percentile",
                    "--percentile", "99.9", "--tensors", "quantizable", "--out", str(out),
                    "--force")
    assert forced.exit_code == 0, forced.output
    replaced = CalibrationTable.load(out / "table.json")
    assert replaced.method == "percentile" and replaced.params == {"percentile": 99.9}
    assert set(replaced.amax) < set(table.amax)


@pytest.mark.parametrize("args,message", [
    (["--method", "kl"], "unknown calibration method 'kl' (available: entropy, minmax, mse, "
                         "percentile)"),
    (["--percentile", "99"], "--percentile applies to --method percentile only"),
    (["--num-samples", "100000"], "blocks of 32"),
    (["--dataset", "./nothing-here.txt"], "not found"),
])
def test_user_errors_are_one_line(export_dir, tmp_path, args, message):
    out = tmp_path / "o"
    result = invoke("--onnx", str(export_dir), *SMALL, *args, "--out", str(out))
    assert result.exit_code == 2, result.output
    lines = result.output.rstrip("\n").splitlines()  # no blank line before the error either
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], \
        result.output
    assert not out.exists()


def test_model_or_onnx_is_required(tmp_path):
    result = invoke(*SMALL, "--out", str(tmp_path / "o"))
    assert result.exit_code == 2 and "give either a model or an ONNX file" in result.output


def test_ctrl_c_leaves_no_partial_output(export_dir, tmp_path, monkeypatch):
    import quantkit.calib.collect as collect

    real = collect.collect_activation_stats

    def interrupted(*args, **kwargs):
        def progress(batches, tokens):
            raise KeyboardInterrupt

        kwargs["progress"] = progress
        return real(*args, **kwargs)

    monkeypatch.setattr(collect, "collect_activation_stats", interrupted)
    out = tmp_path / "calib"
    result = invoke("--onnx", str(export_dir), *SMALL, "--out", str(out))
    assert result.exit_code == 130
    assert "no partial output" in result.output
    assert list(tmp_path.iterdir()) == []  # neither the output nor a temporary directory


def test_calibrate_a_model_exports_it_first(tiny_gpt2, tmp_path):
    model_dir = tmp_path / "tiny-gpt2"
    tiny_gpt2.model.save_pretrained(model_dir)
    tiny_gpt2.tokenizer.save_pretrained(model_dir)
    out = tmp_path / "calib"
    result = invoke("--model", str(model_dir), *SMALL, "--method", "minmax", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert (out / "export" / "model.onnx").is_file()
    assert TrtCache.read(out / "calibration.cache").algorithm == "MinMaxCalibration"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["files"]["onnx"] == "export/model.onnx"


def test_damaged_or_stale_cache_beside_the_table_is_named(export_dir, tmp_path):
    """calibration.cache is checked against table.json whenever the table is loaded (build,
    tune, report): other TensorRT tools read that file, so it must not be silently wrong."""
    out = tmp_path / "calib"
    assert invoke("--onnx", str(export_dir), *SMALL, "--out", str(out)).exit_code == 0
    cache_path = out / "calibration.cache"
    good = cache_path.read_bytes()

    def build_error() -> str:
        result = CliRunner().invoke(cli, ["build", "--onnx", str(export_dir), "--precision",
                                          "int8", "--table", str(out / "table.json"),
                                          "--out", str(tmp_path / "engine")])
        assert result.exit_code == 2, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in result.output, result.output
        assert not (tmp_path / "engine").exists()
        return lines[0]

    cache_path.write_bytes(b"\x00\x01 not a cache")
    line = build_error()
    assert f"damaged calibration cache beside table.json: {cache_path}" in line, line
    assert "recalibrate, or delete it" in line

    header, first, *rest = good.decode().splitlines()
    name = first.rpartition(": ")[0]
    cache_path.write_text("\n".join([header, f"{name}: 3f800000", *rest]) + "\n")
    line = build_error()
    assert f"{cache_path} does not match table.json beside it: 1 of" in line, line
    assert repr(name) in line

    cache_path.write_text("\n".join([header, *rest]) + "\n")  # one tensor missing
    assert "does not match" in build_error()

    cache_path.write_bytes(good)
    assert CalibrationTable.load(out / "table.json").amax  # intact again: loads
    cache_path.unlink()
    assert CalibrationTable.load(out / "table.json").amax  # no cache beside it: fine
