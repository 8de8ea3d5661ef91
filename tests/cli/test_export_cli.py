"""`quantkit export` through click's CliRunner."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from quantkit.cli.main import cli


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_gpt2):
    path = tmp_path_factory.mktemp("models") / "tiny-gpt2"
    tiny_gpt2.model.save_pretrained(path)
    tiny_gpt2.tokenizer.save_pretrained(path)
    return path


def test_export_writes_checked_onnx(model_dir, tmp_path):
    out = tmp_path / "exp"
    result = CliRunner().invoke(cli, ["export", "--model", str(model_dir), "--out", str(out),
                                      "--with-nll"])
    assert result.exit_code == 0, result.output
    assert "max|dlogits|/max|logits|" in result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "onnx-export"
    assert manifest["check"]["relative_error"] < 1e-4
    assert manifest["outputs"] == ["logits", "nll"]
    assert (out / "model.onnx").is_file()

    again = CliRunner().invoke(cli, ["export", "--model", str(model_dir), "--out", str(out)])
    assert again.exit_code == 2
    assert again.output.strip().splitlines() == [f"Error: {out} already exists (pass --force to "
                                                  "replace it)"]


def test_missing_model_is_one_line_exit_2(tmp_path):
    result = CliRunner().invoke(cli, ["export", "--model", "./missing-model-dir",
                                      "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert len(result.output.strip().splitlines()) == 1
    assert "not found" in result.output
    assert not (tmp_path / "o").exists()


def test_hub_unreachable_is_one_line_exit_2(tmp_path):
    result = CliRunner().invoke(cli, ["export", "--model", "gpt2", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "Hugging Face Hub" in result.output and "smollm2-135m" in result.output
    assert "Traceback" not in result.output
