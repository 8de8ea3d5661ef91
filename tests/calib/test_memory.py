"""The memory check before a calibration: estimates from the weights and settings, and one
clear refusal (exit 2, nothing written) naming the flag that makes it fit."""

from __future__ import annotations

import onnx
import pytest
from click.testing import CliRunner

from quantkit.calib.memory import (
    MemoryEstimate,
    check_fits,
    estimate_calibration,
)
from quantkit.environment import available_memory_bytes
from quantkit.errors import QuantkitError


def test_available_memory_reads_memavailable() -> None:
    text = "MemTotal:       24000000 kB\nMemFree:  100 kB\nMemAvailable:   20000000 kB\n"
    assert available_memory_bytes(text) == 20000000 * 1024
    assert available_memory_bytes("MemTotal: 1 kB\n") is None


def test_estimates_follow_the_weights_and_settings(tiny_llama_export) -> None:
    from quantkit.onnx_io import tensor_bytes

    model = onnx.load(str(tiny_llama_export.onnx_path), load_external_data=False)
    weights = sum(tensor_bytes(t) for t in model.graph.initializer)
    at_once = estimate_calibration(model, layer_segment_bytes=None, num_samples=8, seq_len=64,
                                   gptq_memory=None, gptq=False)
    assert at_once.statistics == int(3.0 * weights) and at_once.gptq is None
    layered = estimate_calibration(model, layer_segment_bytes=1 << 20, num_samples=8,
                                   seq_len=64, gptq_memory=None, gptq=True)
    more = estimate_calibration(model, layer_segment_bytes=1 << 20, num_samples=16,
                                seq_len=64, gptq_memory=None, gptq=True)
    assert more.statistics > layered.statistics  # carried hidden states grow with samples
    # layer by layer GPTQ holds one segment's Hessians more than the statistics
    assert layered.gptq == layered.statistics + (1 << 20)
    passes = estimate_calibration(model, layer_segment_bytes=None, num_samples=8, seq_len=64,
                                  gptq_memory=None, gptq=True)
    small = estimate_calibration(model, layer_segment_bytes=None, num_samples=8, seq_len=64,
                                 gptq_memory=1 << 20, gptq=True)
    assert passes.gptq is not None and small.gptq is not None and small.gptq < passes.gptq


def test_refusals_name_what_makes_it_fit() -> None:
    weights = 4_400_000_000
    gptq = MemoryEstimate(statistics=3_000_000_000, gptq=int(weights * 1.15) + 2_200_000_000)
    check_fits(gptq, 20_000_000_000, gptq_memory=None, weights=weights)  # fits: no error
    check_fits(gptq, None, gptq_memory=None, weights=weights)  # unknown: no error
    with pytest.raises(QuantkitError, match="GPTQ needs about 7.3 GB") as err:
        check_fits(gptq, 6_000_000_000, gptq_memory=None, weights=weights)
    assert "--gptq-memory" in err.value.hint
    with pytest.raises(QuantkitError) as err:
        check_fits(gptq, 4_000_000_000, gptq_memory=None, weights=weights)
    assert "--weights rtn" in err.value.hint
    stats = MemoryEstimate(statistics=13_000_000_000, gptq=None)
    with pytest.raises(QuantkitError, match="statistics need about 13.0 GB") as err:
        check_fits(stats, 8_000_000_000, gptq_memory=None, weights=weights)
    assert "--num-samples" in err.value.hint


def test_calibrate_refuses_before_any_work(tiny_llama_export, tmp_path, monkeypatch) -> None:
    import quantkit.environment
    from quantkit.cli.main import cli

    monkeypatch.setattr(quantkit.environment, "available_memory_bytes", lambda: 1 << 20)
    result = CliRunner().invoke(cli, [
        "calibrate", "--onnx", str(tiny_llama_export.directory), "--dataset", "sample",
        "--num-samples", "4", "--seq-len", "32", "--weights", "gptq",
        "--out", str(tmp_path / "calib")])
    assert result.exit_code == 2, result.output
    assert "GPTQ needs about" in result.output and "available" in result.output
    assert not (tmp_path / "calib").exists()
