"""`quantkit build` and `quantkit plan show` through click's CliRunner."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from quantkit.environment import cpu_isa
from tests.build_helpers import MACHINE_WEIGHT_LAYOUT
from tests.cli.cli_helpers import invoke, one_line_error

pytest_plugins = ("tests.fixtures_build",)
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.fixture(scope="module")
def table_file(tmp_path_factory, llama_table):
    path = tmp_path_factory.mktemp("tables") / "llama.json"
    llama_table.save(path)
    return path



def test_build_int8_and_mixed(tiny_llama_export, table_file, tmp_path):
    out = tmp_path / "int8"
    result = invoke("build", "--onnx", tiny_llama_export.directory, "--table", table_file,
                    "--precision", "int8", "--out", out)
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert lines[0].startswith(f"Built onnxruntime int8 engine in {out}: INT8 coverage 100.0% "
                               "of linear-layer MACs")
    assert "int8 19" in lines[1]
    assert lines[2].startswith("ONNX Runtime integer kernels:") and lines[2].endswith(
        "Q/DQ left unfused: 0")
    assert lines[3].startswith(f"INT8 weights: {MACHINE_WEIGHT_LAYOUT} ({cpu_isa().name}")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "engine" and manifest["precision"] == "int8"

    s7 = tmp_path / "s7"
    result = invoke("build", "--onnx", tiny_llama_export.directory, "--table", table_file,
                    "--precision", "int8", "--out", s7, "--weight-layout", "S7")
    assert result.exit_code == 0, result.output
    assert "INT8 weights: s7 (weight_layout option)" in result.output
    result = invoke("build", "--onnx", tiny_llama_export.directory, "--table", table_file,
                    "--precision", "int8", "--out", tmp_path / "bad", "--weight-layout", "s4")
    assert result.exit_code == 2
    assert "unknown weight_layout 's4' (use one of: auto, s8, u8, s7)" in result.output
    assert not (tmp_path / "bad").exists()
    result = invoke("build", "--backend", "tensorrt", "--onnx", tiny_llama_export.directory,
                    "--precision", "int8", "--table", table_file, "--out", tmp_path / "trt",
                    "--weight-layout", "u8")
    assert result.exit_code == 2 and "are onnxruntime options, not tensorrt ones" in result.output
    result = invoke("build", "--backend", "tensorrt", "--onnx", tiny_llama_export.directory,
                    "--precision", "int8", "--table", table_file, "--out", tmp_path / "trt",
                    "--activations", "dynamic")  # TensorRT's INT8 is static
    assert result.exit_code == 2 and "are onnxruntime options, not tensorrt ones" in result.output
    assert not (tmp_path / "trt").exists()

    mixed = tmp_path / "mixed"
    result = invoke("build", "--onnx", tiny_llama_export.onnx_path, "--table", table_file,
                    "--precision", "mixed", "--plan", CONFIGS / "mixed-safe.yaml", "--out", mixed,
                    "--shared-inputs", "dedicated")
    assert result.exit_code == 0, result.output
    manifest = json.loads((mixed / "manifest.json").read_text())
    assert 0.5 < manifest["int8_coverage"] < 1
    assert manifest["inputs"]["plan"]["source"]["path"].endswith("mixed-safe.yaml")
    assert manifest["rewrite"]["options"]["shared_inputs"] == "dedicated"

    again = invoke("build", "--onnx", tiny_llama_export.directory, "--table", table_file,
                   "--precision", "int8", "--out", out)
    assert "already exists" in one_line_error(again)


def test_bad_input_is_one_line_and_writes_nothing(tiny_llama_export, tiny_gpt2_bias_export,
                                                  llama_table, table_file, tmp_path):
    out = tmp_path / "never"
    export = tiny_llama_export.directory
    fp16_plan = tmp_path / "fp16.yaml"
    fp16_plan.write_text("default: fp16\n")
    cases = [
        (["--precision", "int4"], "unknown precision 'int4'"),
        (["--precision", "mixed"], "--precision mixed needs a plan"),
        (["--precision", "int8"], "an INT8 build needs a calibration table"),
        (["--precision", "int8", "--table", tmp_path / "missing.json"], "does not exist"),
        (["--precision", "fp16"], "has no float16 kernel for"),
        (["--precision", "int8", "--table", table_file, "--plan", fp16_plan],
         "the plan's default is fp16 but --precision is int8"),
        (["--precision", "int8", "--table", table_file, "--shared-inputs", "both"],
         "unknown shared_inputs mode 'both'"),
    ]
    for extra, expected in cases:
        line = one_line_error(invoke("build", "--onnx", export, "--out", out, *extra))
        assert expected in line, (extra, line)
    other = tmp_path / "other.json"
    replace(llama_table, model_hash="0" * 64).save(other)
    line = one_line_error(invoke("build", "--onnx", export, "--out", out, "--precision", "int8",
                                 "--table", other))
    assert "the calibration table was made for another model" in line
    line = one_line_error(invoke("build", "--onnx", tiny_gpt2_bias_export.directory, "--out",
                                 out, "--precision", "int8", "--table", table_file))
    assert "the calibration table was made for another model" in line
    partial = tmp_path / "partial.json"
    replace(llama_table, amax={k: v for k, v in llama_table.amax.items()
                               if "layers.1/mlp" not in k}).save(partial)
    line = one_line_error(invoke("build", "--onnx", export, "--out", out, "--precision", "int8",
                                 "--table", partial))
    assert "no range for 1 tensor(s) the plan quantizes: /model/layers.1/mlp/Mul_output_0" in line
    bad_plan = tmp_path / "bad.yaml"
    bad_plan.write_text("default: int8\nrules:\n  - {op_type: Softmx, precision: fp32}\n")
    line = one_line_error(invoke("build", "--onnx", export, "--out", out, "--precision", "mixed",
                                 "--plan", bad_plan, "--table", table_file))
    assert "unknown op type 'Softmx'" in line and "Softmax" in line
    assert not out.exists()


def test_tensorrt_backend_is_routed(tiny_llama_export, tmp_path):
    result = invoke("build", "--onnx", tiny_llama_export.directory, "--precision", "fp32",
                    "--backend", "tensorrt", "--out", tmp_path / "trt")
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        assert "tensorrt" in one_line_error(result).lower()
        assert not (tmp_path / "trt").exists()
    else:
        assert result.exit_code == 0, result.output
        assert "Built tensorrt fp32 engine" in result.output
    line = one_line_error(invoke("build", "--onnx", tiny_llama_export.directory, "--precision",
                                 "fp32", "--backend", "tensorrt", "--per-tensor-weights",
                                 "--out", tmp_path / "t2"))
    assert "are onnxruntime options, not tensorrt ones" in line
    line = one_line_error(invoke("build", "--onnx", tiny_llama_export.directory, "--precision",
                                 "fp32", "--backend", "openvino", "--out", tmp_path / "t3"))
    assert "unknown backend 'openvino'" in line


def test_plan_show_prints_rules_and_filters(tiny_llama_export):
    result = invoke("plan", "show", "--onnx", tiny_llama_export.directory, "--plan",
                    CONFIGS / "mixed-safe.yaml", "--linear")
    assert result.exit_code == 0, result.output
    assert "/lm_head/MatMul" in result.output and "exact:/lm_head/MatMul" in result.output
    assert "/model/layers.0/self_attn/q_proj/MatMul" in result.output
    assert result.output.strip().splitlines()[-1].startswith(
        "19 of 19 matching nodes shown (200 in the graph); fp32 1, int8 18")
    only = invoke("plan", "show", "--onnx", tiny_llama_export.directory, "--plan",
                  CONFIGS / "mixed-safe.yaml", "--op-type", "Softmax", "--rule", "op_type:")
    assert only.exit_code == 0, only.output
    assert "op_type:Softmax" in only.output and "q_proj" not in only.output
    assert only.output.strip().splitlines()[-1].startswith("2 of 2 matching nodes shown")
    regex = invoke("plan", "show", "--onnx", tiny_llama_export.directory, "--node",
                   "re:layers\\.1/mlp/.*MatMul", "--only", "int8")
    assert regex.output.strip().splitlines()[-1].startswith("3 of 3 matching nodes shown")
    plain = invoke("plan", "show", "--onnx", tiny_llama_export.directory, "--limit", "2")
    assert plain.output.strip().splitlines()[-1].startswith("2 of 200 matching nodes shown")


def test_plan_show_errors(tiny_llama_export, tmp_path):
    plan = tmp_path / "p.yaml"
    plan.write_text("default: int8\nrules:\n  - {node: /lm_head/Matmul, precision: fp32}\n")
    line = one_line_error(invoke("plan", "show", "--onnx", tiny_llama_export.directory,
                                 "--plan", plan))
    assert "rule 'exact:/lm_head/Matmul' matches no node of the graph" in line
    assert "closest node names: /lm_head/MatMul" in line
    plan.write_text("default: int8\nrules:\n  - {blocks: layers.0-5, precision: fp32}\n")
    line = one_line_error(invoke("plan", "show", "--onnx", tiny_llama_export.directory,
                                 "--plan", plan))
    assert "names blocks this graph lacks: layers.2, layers.3" in line
    assert "blocks in this graph: layers.0-1" in line
    line = one_line_error(invoke("plan", "show", "--onnx", tmp_path / "nothing"))
    assert "not found" in line


def test_build_from_a_model_exports_it_first(tiny_llama, tmp_path):
    model_dir = tmp_path / "model"
    tiny_llama.model.save_pretrained(model_dir)
    tiny_llama.tokenizer.save_pretrained(model_dir)
    out = tmp_path / "engine"
    result = invoke("build", "--model", model_dir, "--precision", "fp32", "--out", out)
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["precision"] == "fp32" and manifest["vocab_size"] == 512
    assert (out / "tokenizer").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engine", "model"]  # export removed
    both = one_line_error(invoke("build", "--model", model_dir, "--onnx", out, "--precision",
                                 "fp32", "--out", tmp_path / "x"))
    assert "exactly one of --onnx and --model" in both


def test_eval_of_an_s8_engine_on_a_saturating_cpu_warns_in_one_line(
        tiny_llama_export, table_file, tmp_path, monkeypatch):
    from quantkit.environment import CpuIsa

    out = tmp_path / "s8"
    result = invoke("build", "--onnx", tiny_llama_export.directory, "--table", table_file,
                    "--precision", "int8", "--out", out, "--weight-layout", "s8")
    assert result.exit_code == 0, result.output
    monkeypatch.setattr("quantkit.backends.onnxruntime.cpu_isa",
                        lambda: CpuIsa("x86_64", "avx2", ("avx2",)))
    result = invoke("eval", "--engine", out, "--dataset", "sample", "--split", "test",
                    "--max-length", "32", "--limit-tokens", "100", "--latency-grid", "1x16",
                    "--warmup", "0", "--iterations", "1", "--threads", "1",
                    "--out", tmp_path / "results.json")
    assert result.exit_code == 0, result.output
    warned = [line for line in result.output.splitlines() if line.startswith("Warning: ")]
    assert len(warned) >= 1 and all("saturating u8 x s8 kernels" in w for w in warned)
    assert "--weight-layout auto" in warned[0]
    assert "Traceback" not in result.output and "QuantkitWarning" not in result.output
