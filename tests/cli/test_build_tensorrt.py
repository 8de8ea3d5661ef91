"""``quantkit build --backend tensorrt`` and ``quantkit eval`` of TensorRT engines, without
libnvinfer: option routing and validation, the calibration text handed to the backend, and the
one-line missing-TensorRT error that leaves nothing behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from quantkit.backends.tensorrt._trt import tensorrt_available
from tests.cli.cli_helpers import invoke, one_line_error

pytest_plugins = ("tests.fixtures_build",)
MISSING = "Error: tensorrt is not installed (install it with: pip install 'quantkit[tensorrt]')"
no_tensorrt = pytest.mark.skipif(tensorrt_available(),
                                 reason="checks the error where TensorRT is not installed")



@pytest.fixture(scope="module")
def table_file(tmp_path_factory, llama_table):
    path = tmp_path_factory.mktemp("trt-tables") / "llama.json"
    llama_table.save(path)
    return path


def trt_build(export, out, *extra):
    return invoke("build", "--backend", "tensorrt", "--onnx", export.directory, "--out", out,
                  *extra)


@no_tensorrt
@pytest.mark.parametrize("extra", [
    ["--precision", "fp32"],
    ["--precision", "fp16", "--profile", "1x1:1x64:4x64"],
    ["--precision", "int8", "--dataset", "sample", "--num-samples", "8", "--seq-len", "16",
     "--batch-size", "4"],
])
def test_missing_tensorrt_is_one_line_and_writes_nothing(tiny_llama_export, tmp_path, extra):
    out = tmp_path / "engine"
    assert one_line_error(trt_build(tiny_llama_export, out, *extra)) == MISSING
    assert list(tmp_path.iterdir()) == []  # no engine, no temporary directory


@no_tensorrt
def test_missing_tensorrt_is_found_before_exporting_a_model(tiny_llama, tmp_path):
    model_dir = tmp_path / "model"
    tiny_llama.model.save_pretrained(model_dir)
    tiny_llama.tokenizer.save_pretrained(model_dir)
    result = invoke("build", "--backend", "tensorrt", "--model", model_dir, "--precision",
                    "fp32", "--out", tmp_path / "engine")
    assert one_line_error(result) == MISSING
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_option_errors_come_before_tensorrt_is_needed(tiny_llama_export, table_file, tmp_path):
    out = tmp_path / "never"
    sample = ["--dataset", "sample", "--seq-len", "16"]
    cases = [
        (["--precision", "int8"], "an INT8 TensorRT build needs scales"),
        (["--precision", "int8", *sample, "--num-samples", "3", "--batch-size", "4"],
         "INT8 calibration would receive zero batches: 3 token block(s), fewer than one "
         "calibration batch of 4"),
        (["--precision", "int8", *sample, "--num-samples", "8", "--batch-size", "4",
          "--option", "calibration_shape=[4, 32]"],
         "the calibration shape's seq is 32, the token blocks are 16 tokens long"),
        (["--precision", "int8", "--num-samples", "8"],
         "--num-samples describe calibration text and need --dataset"),
        (["--precision", "int8", *sample, "--table", table_file],
         "give --table or calibration text (--dataset), not both"),
        (["--precision", "fp32", *sample], "calibration text (--dataset) is for INT8 builds"),
        (["--precision", "int8", *sample, "--mode", "explicit"],
         "the explicit (Q/DQ) path takes its scales from a calibration table"),
        (["--precision", "fp32", "--mode", "fast"], "unknown TensorRT build mode 'fast'"),
        (["--precision", "fp32", "--constraints", "strict"],
         "unknown precision constraints 'strict'"),
        (["--precision", "fp32", "--profile", "1x1:1x512"], "is not MIN:OPT:MAX of BATCHxSEQ"),
        (["--precision", "fp32", "--profile", "1x1:8x64:4x64"],
         "profile batch must satisfy min <= opt <= max"),
        (["--precision", "fp32", "--mode", "explicit", "--option", "mode=explicit"],
         "--option mode repeats a dedicated flag"),
        (["--precision", "fp32", "--profile", "1x1:1x1:8x1,past=1:8:16"],
         "has a past length, and this graph has no KV cache"),
        (["--precision", "fp32", "--profile", "1x1:1x1:8x1,pest=1:8:16"],
         "after the comma comes past=MIN:OPT:MAX"),
        (["--precision", "fp32", "--option", "fp16_mode=true"],
         "unknown TensorRT option(s): fp16_mode"),
        (["--precision", "int8", "--table", table_file, "--option", "calibrator=percentile"],
         "TensorRT has no 'percentile' calibrator"),
    ]
    for extra, expected in cases:
        line = one_line_error(trt_build(tiny_llama_export, out, *extra))
        assert expected in line, (extra, line)
    assert list(tmp_path.iterdir()) == []


def test_cache_graph_profiles_are_checked_before_tensorrt_is_needed(tiny_llama_cache_export,
                                                                    tmp_path):
    """A KV-cache export's profiles carry a past length within the model's positions (256 for
    the tiny Llama); without --profile it gets the prefill and decode defaults."""
    out = tmp_path / "never"
    cases = [(["--profile", "1x1:1x64:4x64"], "has no past length, and this is a KV-cache"),
             (["--profile", "1x1:1x1:4x1,past=1:32:256"],
              "reaches 257 positions; the model has 256")]
    for extra, expected in cases:
        line = one_line_error(trt_build(tiny_llama_cache_export, out, "--precision", "fp32",
                                        *extra))
        assert expected in line, (extra, line)
    if not tensorrt_available():  # the defaults pass every check; TensorRT is what is missing
        assert one_line_error(trt_build(tiny_llama_cache_export, out, "--precision",
                                        "fp32")) == MISSING
        assert one_line_error(trt_build(tiny_llama_cache_export, out, "--precision", "fp32",
                                        "--profile", "1x1:1x1:4x1,past=1:32:255")) == MISSING
    assert list(tmp_path.iterdir()) == []


def test_tensorrt_flags_are_refused_for_onnxruntime(tiny_llama_export, table_file, tmp_path):
    for extra in (["--dataset", "sample"], ["--profile", "1x1:1x64:4x64"], ["--mode", "auto"]):
        line = one_line_error(invoke("build", "--onnx", tiny_llama_export.directory, "--out",
                                     tmp_path / "e", "--precision", "int8", "--table",
                                     table_file, *extra))
        assert "are tensorrt options, not onnxruntime ones" in line, line


class _Recorder:
    """Stands in for libnvinfer: records what the backend was given, writes a minimal engine."""

    def __init__(self, monkeypatch) -> None:
        import quantkit.backends.tensorrt as trt_pkg
        from quantkit.backends.tensorrt import backend

        self.calls: list[dict] = []
        monkeypatch.setattr(trt_pkg, "require_tensorrt_gpu", lambda: None)
        monkeypatch.setattr(backend, "require_tensorrt", lambda: None)
        recorder = self

        def fake_build(self, request, out_dir):
            from quantkit.backends.onnxruntime import copy_export_context

            recorder.calls.append({"data": self.calibration_data, "request": request})
            (out_dir / "engine.plan").write_bytes(b"plan")
            fields = copy_export_context(Path(request.onnx_path), out_dir)
            fields.update(size_bytes=4, int8_coverage=0.5, tensorrt={
                "version": "10.13.0.35", "path": "implicit", "strongly_typed": False,
                "layer_precisions": {"by_precision": {"fp32": 3, "int8": 5}},
                "calibration": {"used_cache": False, "batches_fed": 2,
                                "algorithm": "EntropyCalibration2"}, "warnings": 0})
            return fields

        monkeypatch.setattr(backend.TensorRTBackend, "_build_impl", fake_build)


def test_calibration_text_and_flags_reach_the_backend(tiny_llama_export, tmp_path, monkeypatch):
    from quantkit.data import TokenBlocks

    recorder = _Recorder(monkeypatch)
    out = tmp_path / "int8"
    result = trt_build(tiny_llama_export, out, "--precision", "int8", "--dataset", "sample",
                       "--num-samples", "8", "--seq-len", "16", "--batch-size", "4",
                       "--profile", "1x1:4x16:4x32", "--constraints", "prefer",
                       "--timing-cache", tmp_path / "timing.cache", "--option",
                       "workspace_mib=512")
    assert result.exit_code == 0, result.output
    (call,) = recorder.calls
    blocks = call["data"]
    assert isinstance(blocks, TokenBlocks)
    assert (blocks.num_samples, blocks.seq_len, blocks.batch_size) == (8, 16, 4)
    assert len(list(blocks)) == 2 and blocks.blocks.max() < 512  # the export's tokenizer
    assert dict(call["request"].options) == {
        "profiles": [{"min": [1, 1], "opt": [4, 16], "max": [4, 32]}], "constraints": "prefer",
        "timing_cache": str(tmp_path / "timing.cache"), "workspace_mib": 512}
    assert call["request"].table is None and call["request"].precision == "int8"
    lines = result.output.strip().splitlines()
    assert lines[0] == (f"Built tensorrt int8 engine in {out}: TensorRT 10.13.0.35, implicit "
                        "path, 0.0 MB")
    assert "Engine layers by precision (engine inspector): fp32 3, int8 5" in lines
    assert "INT8 coverage: 50.0% of the plan's INT8 nodes run in INT8 engine layers" in lines
    assert "Calibration: 2 batches through TensorRT's EntropyCalibration2" in lines
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["backend"] == "tensorrt" and manifest["inputs"]["options"]["constraints"] \
        == "prefer"


def test_a_table_reaches_the_backend_without_calibration_text(tiny_llama_export, table_file,
                                                              tmp_path, monkeypatch):
    recorder = _Recorder(monkeypatch)
    result = trt_build(tiny_llama_export, tmp_path / "e", "--precision", "int8", "--table",
                       table_file, "--mode", "explicit")
    assert result.exit_code == 0, result.output
    (call,) = recorder.calls
    assert call["data"] is None and call["request"].table is not None
    assert call["request"].options == {"mode": "explicit"}


def test_too_little_text_for_the_blocks_fails_before_the_build(tiny_llama_export, tmp_path,
                                                               monkeypatch):
    recorder = _Recorder(monkeypatch)
    line = one_line_error(trt_build(tiny_llama_export, tmp_path / "e", "--precision", "int8",
                                    "--dataset", "sample", "--num-samples", "100000",
                                    "--seq-len", "16", "--batch-size", "4"))
    assert "100000 were asked for" in line
    assert recorder.calls == [] and not (tmp_path / "e").exists()


# -- quantkit eval -------------------------------------------------------------------------------

def fake_trt_engine(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "manifest.json").write_text(json.dumps(
        {"kind": "engine", "backend": "tensorrt", "precision": "int8",
         "source_model_hash": "a" * 64, "tensorrt": {"version": "10.13.0.35", "io": []}}))
    return path


@no_tensorrt
def test_eval_of_a_tensorrt_engine_without_tensorrt(tmp_path):
    engine = fake_trt_engine(tmp_path / "trt-int8")
    out = tmp_path / "results.json"
    result = invoke("eval", "--engine", engine, "--dataset", "sample", "--out", out)
    assert one_line_error(result) == MISSING
    assert not out.exists()


def test_build_help_imports_neither_tensorrt_nor_torch():
    import subprocess
    import sys

    code = ("import sys; from click.testing import CliRunner; from quantkit.cli.main import cli; "
            "r = CliRunner().invoke(cli, ['build', '--help']); assert r.exit_code == 0; "
            "assert '--dataset' in r.output and '--profile' in r.output; "
            "import quantkit.build, quantkit.backends.tensorrt; "
            "print('tensorrt' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "False False"
