"""The switchable probe graph: FP32 when every flag is off, the INT8 engine's numbers when on."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from quantkit.calib.table import CalibrationTable
from quantkit.errors import QuantkitError
from quantkit.tune.groups import groups_of_model
from quantkit.tune.probe import ProbeSession, build_probe_model
from tests.build_helpers import run_onnx, token_feeds


@pytest.fixture(scope="module")
def setup(fragile_export, fragile_calibration):
    path = fragile_export.onnx_path
    groups = groups_of_model(onnx.load(str(path), load_external_data=False))
    table = CalibrationTable.load(fragile_calibration / "table.json")
    probe = ProbeSession(path, groups, table.amax, threads=1)
    yield path, groups, table, probe
    probe.close()


def test_all_flags_off_is_fp32_exactly(setup) -> None:
    path, _, _, probe = setup
    feed = token_feeds(1, batch=2, seq=40, seed=7)[0]
    probe.configure(())
    got = probe.run(feed, ["nll"])["nll"]
    np.testing.assert_array_equal(got, run_onnx(path, feed, "nll"))


def test_all_flags_on_matches_the_int8_engine(setup, tmp_path) -> None:
    """The probe with every group on computes what the Q/DQ engine computes (up to the order
    of float accumulation against ONNX Runtime's integer kernels)."""
    from quantkit.build import build_engine

    path, groups, table, probe = setup
    feed = token_feeds(1, batch=2, seq=40, seed=8)[0]
    probe.configure([g.name for g in groups])
    got = probe.run(feed, ["nll"])["nll"]
    engine = build_engine(tmp_path / "int8", precision="int8", onnx=path.parent,
                          table=table)
    with engine.runner(threads=1) as runner:
        want = runner.run(feed, outputs=["nll"])["nll"]
    fp32 = run_onnx(path, feed, "nll")
    assert np.abs(got - want).max() < 0.02 * np.abs(fp32 - want).max() + 1e-4
    assert np.abs(got - fp32).max() > 1e-3  # it did quantize


def test_one_group_changes_only_when_on_and_ranges_are_feeds(setup) -> None:
    _, groups, table, probe = setup
    feed = token_feeds(1, batch=1, seq=32, seed=9)[0]
    probe.configure(())
    fp32 = probe.run(feed)["nll"]
    probe.configure(["layers.1.mlp_down"])
    one = probe.run(feed)["nll"]
    tensor = probe.group_tensors["layers.1.mlp_down"][0]
    probe.configure(["layers.1.mlp_down"], {tensor: table.amax[tensor] / 50})
    clipped = probe.run(feed)["nll"]
    assert not np.array_equal(one, fp32) and not np.array_equal(one, clipped)
    probe.configure(())
    np.testing.assert_array_equal(probe.run(feed)["nll"], fp32)


def test_unknown_group_and_missing_ranges(setup) -> None:
    path, groups, table, probe = setup
    with pytest.raises(QuantkitError, match="unknown quantization group"):
        probe.configure(["layers.9.qkv"])
    model = onnx.load(str(path))
    with pytest.raises(QuantkitError, match="no range for"):
        build_probe_model(model, groups, {})
