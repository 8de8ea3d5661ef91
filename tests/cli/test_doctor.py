"""``quantkit doctor``: the machine table, its JSON, the TensorRT check list and table, and the
routing of ``--tensorrt`` (for real where TensorRT is absent, with stand-in checks otherwise)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from quantkit import doctor
from quantkit.cli.main import cli
from quantkit.doctor import (
    TRT_CHECKS,
    CheckResult,
    check_rows,
    defaults,
    judge,
    machine_report,
    machine_rows,
    planned_checks,
    relative_logit_error,
    render_table,
    run_tensorrt_checks,
    tensorrt_failed,
    tensorrt_summary,
)
from quantkit.environment import cpu_isa, weight_layout_for

TENSORRT_INSTALLED = doctor.tensorrt_status()[0] != "absent"


def test_machine_table_says_the_isa_and_the_layout_built_here():
    report = machine_report(check_hub=False)
    rows = dict((k, v) for k, v in machine_rows(report) if k)
    isa = cpu_isa()
    layout, reason = weight_layout_for(isa)
    assert rows["instruction set"].startswith(isa.name)
    assert rows["INT8 weights here"] == f"{layout}: {reason}"
    assert rows["Hugging Face Hub"] == "not checked"
    assert rows["onnxruntime"].startswith(report["onnxruntime"]["version"])
    assert "CPUExecutionProvider" in rows["onnxruntime"]
    assert report["cores"] >= 1 and report["memory_gib"] > 0
    json.dumps(report)  # the --json form is plain data
    text = render_table(machine_rows(report))
    assert text.splitlines()[0].startswith("quantkit ")
    assert f"INT8 weights {layout}" in text  # the default build line


def fake_report(**over):
    report = {
        "int8_weight_layout": {"layout": "s8", "reason": "avx512_vnni: exact"},
        "onnxruntime": {"version": "1.32.0", "providers": ["CPUExecutionProvider"]},
        "torch": {"version": "2.13.0", "cuda_available": False, "cuda_version": None,
                  "devices": []},
        "tensorrt": None, "hub_reachable": False, "cores": 16, "cores_usable": 8,
        "cache_dir": {"path": "/c", "exists": True},
    }
    report.update(over)
    return report


def test_defaults_follow_what_is_installed():
    lines = defaults(fake_report())
    assert lines[0] == ("build: ONNX Runtime engines for CPUExecutionProvider, INT8 weights s8 "
                        "(--weight-layout auto; see above)")
    assert "not available (TensorRT is not installed)" in lines[1]
    assert "all 8 usable cores" in lines[2]
    assert "Hub is not reachable" in lines[3]
    gpu = fake_report(tensorrt="10.13.0.35", torch={
        "version": "2.13.0", "cuda_available": True, "cuda_version": "13.0",
        "devices": ["NVIDIA H100"]}, onnxruntime={
        "version": "1.32.0", "providers": ["CUDAExecutionProvider", "CPUExecutionProvider"]})
    lines = defaults(gpu)
    assert lines[0].endswith("CUDAExecutionProvider, INT8 weights s8")
    assert lines[1] == "--backend tensorrt: TensorRT 10.13.0.35 on NVIDIA H100"
    no_gpu = defaults(fake_report(tensorrt="10.13.0.35"))
    assert "torch sees no CUDA GPU" in no_gpu[1]
    assert defaults(fake_report(onnxruntime=None))[0].startswith(
        "build: onnxruntime is not installed")


def test_defaults_say_what_cache_engines_and_blockwise_get_here():
    lines = defaults(fake_report(fused_attention=None, blockwise_activations=None))
    assert lines[-2] == ("KV-cache engines: attention fused into one ONNX Attention node per "
                         "layer (--attention auto)")
    assert lines[-1] == "--activations blockwise: available (VNNI)"
    lines = defaults(fake_report(fused_attention="ONNX Runtime 1.20.0 cannot run ...",
                                 blockwise_activations="avx2 without VNNI: not measured there"))
    assert lines[-2] == ("KV-cache engines: attention as exported (ONNX Runtime 1.20.0 cannot "
                         "run ...)")
    assert lines[-1] == ("--activations blockwise: refused here (avx2 without VNNI: not "
                         "measured there)")
    report = machine_report(check_hub=False)
    here = cpu_isa()
    assert report["blockwise_activations"] == (
        f"{here.name} without VNNI: not measured there" if here.u8s8_saturates else None)


def test_check_list_per_tensorrt_version():
    assert [c.name for c in TRT_CHECKS] == [
        "fp32", "fp16", "int8-implicit", "int8-explicit", "calibration-cache"]
    on_10 = planned_checks("10.13.0.35")
    assert [skip for _, skip in on_10] == [None] * 5
    on_11 = dict((c.name, skip) for c, skip in planned_checks("11.0.0"))
    assert on_11["fp32"] is None and on_11["int8-explicit"] is None
    assert on_11["int8-implicit"] == on_11["calibration-cache"] == (
        "TensorRT 11 has no INT8 calibrator (removed in 11)")


def test_judge_and_logit_error():
    check = TRT_CHECKS[0]  # fp32, 1e-3
    assert judge(check, 5e-4, "d").status == "pass"
    assert judge(check, 2e-3, "d").status == "fail"
    assert judge(check, float("nan"), "d").status == "fail"
    want = np.array([[[1.0, -4.0], [2.0, 0.0]], [[1.0, 1.0], [9.0, 9.0]]])
    got = want.copy()
    got[0, 0, 1] = -3.0  # error 1 on max |want| 4 over the valid positions
    got[1, 1, :] = 0.0  # a padded position: not compared
    mask = np.array([[1, 1], [1, 0]])
    assert relative_logit_error(got, want, mask) == pytest.approx(1 / 4)


def test_pass_fail_table_from_constructed_results():
    results = [
        CheckResult("fp32", "pass", 2.5e-5, 1e-3, "layers fp32 40"),
        CheckResult("fp16", "pass", 3.1e-3, 1e-2, "layers fp16 38"),
        CheckResult("int8-implicit", "skip", None, 0.1, "TensorRT 11 has no INT8 calibrator"),
        CheckResult("int8-explicit", "fail", 0.2, 5e-2, "layers int8 19"),
        CheckResult("calibration-cache", "fail", None, 1e-2, "build failed: out of memory"),
    ]
    report = {"status": "ready", "detail": "11.0.0", "results": [r.to_dict() for r in results],
              "versions": {"tensorrt": "11.0.0", "torch": "2.13.0", "cuda": "13.0",
                           "gpus": ["NVIDIA H100"]}}
    text = tensorrt_summary(report)
    lines = text.splitlines()
    assert lines[0] == "TensorRT 11.0.0, torch 2.13.0, CUDA 13.0, GPU NVIDIA H100"
    assert lines[1].split()[:2] == ["check", "result"]
    rows = {line.split()[0]: line for line in lines[3:8]}
    assert rows["fp32"].split()[1:4] == ["PASS", "2.50e-05", "≤"]
    assert "SKIP" in rows["int8-implicit"] and "no INT8 calibrator" in rows["int8-implicit"]
    assert rows["int8-explicit"].split()[1:3] == ["FAIL", "2.00e-01"]
    assert "FAIL" in rows["calibration-cache"] and "out of memory" in rows["calibration-cache"]
    assert lines[-1] == "2 of 5 checks failed"
    assert tensorrt_failed(report)
    assert check_rows(results)[0][4] == "ONNX Runtime FP32"
    passed = {**report, "results": [r.to_dict() for r in results[:3]]}
    assert not tensorrt_failed(passed)
    assert tensorrt_summary(passed).splitlines()[-1] == "all 2 checks that apply passed"


def test_routing_runs_every_check_that_applies(monkeypatch, tmp_path):
    """With stand-in checks: skips by version, pass/fail by tolerance, an exception fails its
    check in one line and the others still run."""
    calls = []

    class FakeContext:
        def __init__(self, workdir, say):
            calls.append("context")

    def measured(value):
        def run(ctx):
            calls.append(value)
            return value, "ok"
        return run

    def broken(ctx):
        raise RuntimeError("engine build failed\nsecond line")

    monkeypatch.setattr(doctor, "tensorrt_status", lambda: ("ready", "11.0.0"))
    monkeypatch.setattr(doctor, "_TrtContext", FakeContext)
    monkeypatch.setattr(doctor, "_CHECK_FUNCTIONS", {
        "fp32": measured(1e-4), "fp16": measured(0.5), "int8-explicit": broken})
    report = run_tensorrt_checks(tmp_path)
    got = {r["name"]: (r["status"], r["detail"]) for r in report["results"]}
    assert got == {"fp32": ("pass", "ok"), "fp16": ("fail", "ok"),
                   "int8-implicit": ("skip", "TensorRT 11 has no INT8 calibrator (removed in 11)"),
                   "int8-explicit": ("fail", "engine build failed"),
                   "calibration-cache": ("skip",
                                         "TensorRT 11 has no INT8 calibrator (removed in 11)")}
    assert calls == ["context", 1e-4, 0.5]
    assert list(tmp_path.iterdir()) == []  # the temporary build directory is gone
    # the command exits 1 when a check failed
    monkeypatch.setattr(doctor, "run_tensorrt_checks", lambda workdir, say: report)
    result = CliRunner().invoke(cli, ["doctor", "--tensorrt", "--no-hub"])
    assert result.exit_code == 1
    assert "2 of 5 checks failed" in result.output


def test_no_gpu_is_said_and_not_a_failure(monkeypatch):
    monkeypatch.setattr(doctor, "tensorrt_status",
                        lambda: ("no-gpu", "TensorRT 10.13.0.35 is installed, but torch sees "
                                           "no CUDA GPU"))
    report = run_tensorrt_checks()
    assert report == {"status": "no-gpu", "detail": "TensorRT 10.13.0.35 is installed, but "
                      "torch sees no CUDA GPU", "results": []}
    assert tensorrt_summary(report) == ("TensorRT checks: skipped: TensorRT 10.13.0.35 is "
                                        "installed, but torch sees no CUDA GPU.")
    assert not tensorrt_failed(report)


@pytest.mark.skipif(TENSORRT_INSTALLED, reason="checks the machine without TensorRT")
def test_tensorrt_absent_for_real():
    result = CliRunner().invoke(cli, ["doctor", "--tensorrt", "--no-hub"])
    assert result.exit_code == 0, result.output
    assert ("TensorRT checks: skipped: TensorRT is not installed (install it with: pip install "
            "'quantkit[tensorrt]')." in result.output)
    assert "instruction set" in result.output
    as_json = CliRunner().invoke(cli, ["doctor", "--tensorrt", "--no-hub", "--json"])
    assert as_json.exit_code == 0
    data = json.loads(as_json.output)
    assert data["schema"] == "quantkit.doctor/1"
    assert data["tensorrt_checks"]["status"] == "absent"
    assert data["cpu"]["isa"]["name"] == cpu_isa().name
    assert data["int8_weight_layout"]["layout"] == weight_layout_for(cpu_isa())[0]


def test_doctor_never_imports_tensorrt_itself():
    """Every ``import tensorrt`` stays in quantkit/backends/tensorrt/."""
    code = ("import sys, quantkit.doctor, quantkit.cli.doctor\n"
            "print('tensorrt' in sys.modules, 'onnxruntime' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.split() == ["False", "False"]
