"""GPTQ int8 weights: the algorithm, weights.npz beside the table, and every consumer using it
(ONNX Runtime builds, fused siblings, the autotune probe)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from quantkit.backends.onnxruntime import ENGINE_ONNX
from quantkit.calib.gptq import (
    QuantizedWeight,
    _output_error,
    gptq_quantize,
    load_weights,
    save_weights,
    weight_targets,
)
from quantkit.calib.table import CalibrationTable
from quantkit.cli.main import cli
from quantkit.errors import QuantkitError
from quantkit.weight_quant import quantize_weight


def _correlated(rng: np.random.Generator, tokens: int, channels: int) -> np.ndarray:
    """Activations with correlated channels of very different sizes, as in a transformer."""
    mix = rng.standard_normal((channels, channels)) / np.sqrt(channels)
    x = rng.standard_normal((tokens, channels)) @ mix + 0.3 * rng.standard_normal((tokens, 1))
    return x * np.exp(rng.standard_normal(channels))


def test_identity_hessian_is_round_to_nearest() -> None:
    """Uncorrelated inputs of equal size leave nothing to compensate: GPTQ is RTN."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((48, 20)).astype(np.float32)
    q, scale = gptq_quantize(w, np.eye(48), damping=0.0)
    rtn, rtn_scale = quantize_weight(w, 1)
    np.testing.assert_array_equal(q, rtn)
    np.testing.assert_array_equal(scale, rtn_scale)


def test_gptq_lowers_the_output_error_on_correlated_inputs() -> None:
    rng = np.random.default_rng(1)
    x = _correlated(rng, 2048, 96)
    w = (rng.standard_normal((96, 64)) * 0.1).astype(np.float32)
    h = x.T @ x
    q, scale = gptq_quantize(w, h)
    rtn, rtn_scale = quantize_weight(w, 1)
    np.testing.assert_array_equal(scale, rtn_scale)  # only the integers differ
    assert q.dtype == np.int8 and np.abs(q.astype(int)).max() <= 127
    assert _output_error(w, q, scale, h) < 0.7 * _output_error(w, rtn, scale, h)
    # a dead input channel (never active) is quantized to zero and harms nothing
    h_dead = h.copy()
    h_dead[5, :] = h_dead[:, 5] = 0.0
    q_dead, _ = gptq_quantize(w, h_dead)
    assert not q_dead[5].any()
    with pytest.raises(QuantkitError, match="Hessian of shape"):
        gptq_quantize(w, np.eye(10))


def test_weights_file_round_trips_and_belongs_to_the_table(tmp_path) -> None:
    weights = {"w": QuantizedWeight(np.arange(-6, 6, dtype=np.int8).reshape(3, 4),
                                    np.ones(4, np.float32), 1),
               "emb|T1,0": QuantizedWeight(np.ones((2, 5), np.int8), np.full(5, 0.5, np.float32),
                                           1)}
    save_weights(tmp_path / "w.npz", weights)
    back = load_weights(tmp_path / "w.npz")
    assert set(back) == set(weights)
    for key, value in weights.items():
        np.testing.assert_array_equal(back[key].q, value.q)
        np.testing.assert_array_equal(back[key].scale, value.scale)
        assert back[key].axis == value.axis
    table = CalibrationTable(method="minmax", amax={"x": 1.0}, weights=weights)
    (tmp_path / "calib").mkdir()
    table.save(tmp_path / "calib" / "table.json")
    assert json.loads((tmp_path / "calib" / "table.json").read_text())["weights"] == "weights.npz"
    loaded = CalibrationTable.load(tmp_path / "calib" / "table.json")
    assert loaded.weights is not None and set(loaded.weights) == set(weights)
    (tmp_path / "calib" / "weights.npz").unlink()
    with pytest.raises(QuantkitError, match="not beside it"):
        CalibrationTable.load(tmp_path / "calib" / "table.json")


@pytest.fixture(scope="module")
def gptq_calibration(tiny_llama_export, tmp_path_factory):
    out = tmp_path_factory.mktemp("gptq") / "calib"
    result = CliRunner().invoke(cli, [
        "calibrate", "--onnx", str(tiny_llama_export.directory), "--dataset", "sample",
        "--num-samples", "16", "--seq-len", "64", "--batch-size", "4", "--method", "minmax",
        "--tensors", "quantizable", "--weights", "gptq", "--gptq-samples", "8",
        "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "GPTQ:" in result.output
    return out


def test_calibrate_writes_gptq_weights_for_every_linear(tiny_llama_export, gptq_calibration):
    table = CalibrationTable.load(gptq_calibration / "table.json")
    model = onnx.load(str(tiny_llama_export.onnx_path), load_external_data=False)
    keys = {t.key for t in weight_targets(model)}
    assert table.weights is not None and set(table.weights) == keys
    manifest = json.loads((gptq_calibration / "manifest.json").read_text())
    info = manifest["inputs"]["weights"]
    assert info["method"] == "gptq" and info["tokens"] == 8 * 64
    assert info["rtn_to_gptq_output_error"]["median"] > 1.0  # lower error on its own data
    assert manifest["files"]["weights"] == "weights.npz"


def stored_ints(model) -> list[np.ndarray]:
    """The 2-D integer weights of an engine as symmetric integers, whatever their layout (s8:
    int8; u8: uint8 with zero point 128)."""
    from onnx import numpy_helper

    out = []
    for t in model.graph.initializer:
        if len(t.dims) != 2:
            continue
        if t.data_type == onnx.TensorProto.INT8:
            out.append(numpy_helper.to_array(t))
        elif t.data_type == onnx.TensorProto.UINT8:
            out.append((numpy_helper.to_array(t).astype(np.int16) - 128).astype(np.int8))
    return out


@pytest.mark.parametrize("layout", ["s8", "u8"])
@pytest.mark.parametrize("shared_inputs", ["fuse", "dedicated"])
def test_int8_build_uses_the_gptq_weights(tiny_llama_export, gptq_calibration, tmp_path,
                                          shared_inputs, layout) -> None:
    from quantkit.build import build_engine

    table = CalibrationTable.load(gptq_calibration / "table.json")
    engine = build_engine(tmp_path / "int8", precision="int8",
                          onnx=tiny_llama_export.directory, table=table,
                          options={"shared_inputs": shared_inputs, "weight_layout": layout})
    built = onnx.load(str(engine.path / ENGINE_ONNX))
    int8 = stored_ints(built)
    export = onnx.load(str(tiny_llama_export.onnx_path), load_external_data=False)
    key_of = {t.node: t.key for t in weight_targets(export)}

    def gptq_of(part: str) -> np.ndarray:
        return table.weights[next(key for node, key in key_of.items() if part in node)].q

    down = gptq_of("layers.0/mlp/down_proj")
    assert any(a.shape == down.shape and np.array_equal(a, down) for a in int8)
    q, k, v = (gptq_of(f"layers.0/self_attn/{p}_proj") for p in ("q", "k", "v"))
    stacked = np.concatenate([q, k, v], axis=1)
    if shared_inputs == "fuse":  # the fused q/k/v weight is the three GPTQ weights side by side
        assert any(a.shape == stacked.shape and np.array_equal(a, stacked) for a in int8)
    else:
        assert any(a.shape == q.shape and np.array_equal(a, q) for a in int8)
    plain = CalibrationTable(method=table.method, amax=table.amax, model_hash=table.model_hash)
    rtn = build_engine(tmp_path / "rtn", precision="int8", onnx=tiny_llama_export.directory,
                       table=plain, options={"weight_layout": layout})
    rtn_ints = stored_ints(onnx.load(str(rtn.path / ENGINE_ONNX)))
    assert not any(a.shape == down.shape and np.array_equal(a, down) for a in rtn_ints)


def test_gptq_weights_refuse_the_7_bit_layout(tiny_llama_export, gptq_calibration,
                                              tmp_path) -> None:
    """7-bit weights would round GPTQ's 8-bit choice again: refused, in the build and the probe."""
    from quantkit.build import build_engine
    from quantkit.tune.groups import groups_of_model
    from quantkit.tune.probe import build_probe_model

    table = CalibrationTable.load(gptq_calibration / "table.json")
    with pytest.raises(QuantkitError, match="GPTQ weights are 8-bit; the s7 weight layout"):
        build_engine(tmp_path / "s7", precision="int8", onnx=tiny_llama_export.directory,
                     table=table, options={"weight_layout": "s7"})
    assert not (tmp_path / "s7").exists()
    model = onnx.load(str(tiny_llama_export.onnx_path))
    with pytest.raises(QuantkitError, match="GPTQ weights are 8-bit"):
        build_probe_model(model, groups_of_model(model), table.amax, weights=table.weights,
                          weight_layout="s7")


def test_probe_uses_the_gptq_weights(tiny_llama_export, gptq_calibration, tmp_path) -> None:
    """With every group on, the probe computes what the GPTQ INT8 engine computes."""
    from quantkit.build import build_engine
    from quantkit.tune.groups import groups_of_model
    from quantkit.tune.probe import ProbeSession
    from tests.build_helpers import run_onnx, token_feeds

    table = CalibrationTable.load(gptq_calibration / "table.json")
    path = tiny_llama_export.onnx_path
    groups = groups_of_model(onnx.load(str(path), load_external_data=False))
    feed = token_feeds(1, batch=2, seq=40, seed=8)[0]
    with ProbeSession(path, groups, table.amax, threads=1, weights=table.weights) as probe:
        probe.configure([g.name for g in groups])
        got = probe.run(feed, ["nll"])["nll"]
    engine = build_engine(tmp_path / "int8", precision="int8", onnx=path.parent, table=table)
    with engine.runner(threads=1) as runner:
        want = runner.run(feed, outputs=["nll"])["nll"]
    fp32 = run_onnx(path, feed, "nll")
    assert np.abs(got - want).max() < 0.02 * np.abs(fp32 - want).max() + 1e-4


def test_bad_weights_option_is_one_line(tiny_llama_export, tmp_path) -> None:
    result = CliRunner().invoke(cli, [
        "calibrate", "--onnx", str(tiny_llama_export.directory), "--dataset", "sample",
        "--num-samples", "4", "--seq-len", "32", "--weights", "gptq", "--gptq-samples", "0",
        "--out", str(tmp_path / "c")])
    assert result.exit_code == 2
    assert "gptq-samples must be at least 1" in result.output
    assert not (tmp_path / "c").exists()


def test_calibrate_refuses_zero_gptq_samples(tiny_llama_export, tmp_path) -> None:
    out = tmp_path / "calib"
    result = CliRunner().invoke(cli, [
        "calibrate", "--onnx", str(tiny_llama_export.directory), "--dataset", "sample",
        "--num-samples", "4", "--seq-len", "32", "--weights", "gptq", "--gptq-samples", "0",
        "--out", str(out)])
    assert result.exit_code != 0
    assert "gptq-samples must be at least 1" in result.output
    assert not out.exists()


def test_hessian_passes_group_consecutive_activations_within_the_budget() -> None:
    from quantkit.calib.gptq import WeightTarget, hessian_passes

    targets = [WeightTarget(f"n{i}", act, f"w{i}", None, 1)
               for i, act in enumerate(["a", "a", "b", "c", "d"])]
    widths = {"a": 4, "b": 4, "c": 8, "d": 2}  # Hessians of 64, 64, 256 and 16 bytes
    assert hessian_passes(targets, widths, 10**6) == [["a", "b", "c", "d"]]
    assert hessian_passes(targets, widths, 128) == [["a", "b"], ["c"], ["d"]]
    # a Hessian past the budget still gets a pass of its own, never a split
    assert hessian_passes(targets, widths, 1) == [["a"], ["b"], ["c"], ["d"]]


def test_gptq_in_several_passes_gives_the_same_weights(tiny_llama_export) -> None:
    """Hessians held a group of layers at a time (one pass each over the samples): the same
    integers as all at once, bit for bit, and never more than the budget held."""
    from quantkit.calib.gptq import gptq_weights
    from tests.build_helpers import token_feeds

    feeds = token_feeds(2, batch=2, seq=24, seed=4)
    whole, whole_info = gptq_weights(tiny_llama_export.onnx_path, feeds)
    split, split_info = gptq_weights(tiny_llama_export.onnx_path, feeds, memory=1)
    assert whole_info["passes"] == 1
    targets = weight_targets(onnx.load(str(tiny_llama_export.onnx_path)))
    assert split_info["passes"] == len({t.activation for t in targets}) > 3
    assert split_info["hessian_bytes_per_group_max"] < whole_info["hessian_bytes_per_group_max"]
    assert whole_info["tokens"] == split_info["tokens"] == 2 * 2 * 24
    assert whole.keys() == split.keys()
    for key, weight in whole.items():
        np.testing.assert_array_equal(split[key].q, weight.q)
        np.testing.assert_array_equal(split[key].scale, weight.scale)


def test_gptq_layer_by_layer_gives_the_same_weights(tiny_llama_export) -> None:
    """Segments of a few layers' weights, each over every sequence, their weights quantized as
    soon as they are done: one pass, the same integers as the whole graph at once."""
    from quantkit.calib.gptq import gptq_weights
    from tests.build_helpers import token_feeds

    feeds = token_feeds(2, batch=2, seq=24, seed=4)
    whole, whole_info = gptq_weights(tiny_llama_export.onnx_path, feeds)
    layered, info = gptq_weights(tiny_llama_export.onnx_path, feeds, segment_bytes=64 << 10)
    assert info["mode"] == "layer_by_layer" and info["passes"] == 1 and info["groups"] > 3
    assert info["tokens"] == whole_info["tokens"]
    assert info["hessian_bytes_per_group_max"] < whole_info["hessian_bytes_per_group_max"]
    assert whole.keys() == layered.keys()
    for key, weight in whole.items():
        np.testing.assert_array_equal(layered[key].q, weight.q)
        np.testing.assert_array_equal(layered[key].scale, weight.scale)


def test_exposing_only_some_tensors_runs_just_what_they_need(tiny_llama_export) -> None:
    from quantkit.graph_edit import exposing_session
    from tests.build_helpers import token_feeds

    targets = weight_targets(onnx.load(str(tiny_llama_export.onnx_path)))
    early = [targets[0].activation]
    feeds = next(iter(token_feeds(1, batch=2, seq=16, seed=1)))
    full = exposing_session(tiny_llama_export.onnx_path, early)
    cut = exposing_session(tiny_llama_export.onnx_path, early, only=True)
    assert [o.name for o in cut.get_outputs()] == early
    inputs = [i.name for i in cut.get_inputs()]
    np.testing.assert_array_equal(cut.run(early, {k: feeds[k] for k in inputs})[0],
                                  full.run(early, {i.name: feeds[i.name]
                                                   for i in full.get_inputs()})[0])
    model = onnx.load(str(tiny_llama_export.onnx_path))
    from quantkit.graph_edit import keep_ancestors

    keep_ancestors(model.graph, early)
    assert 0 < len(model.graph.node) < len(onnx.load(str(tiny_llama_export.onnx_path)).graph.node)


def test_calibrate_takes_a_gptq_memory_bound(tiny_llama_export, tmp_path) -> None:
    result = CliRunner().invoke(cli, [
        "calibrate", "--onnx", str(tiny_llama_export.directory), "--dataset", "sample",
        "--num-samples", "4", "--seq-len", "32", "--method", "minmax", "--tensors",
        "quantizable", "--weights", "gptq", "--gptq-samples", "2", "--gptq-memory", "2KB",
        "--out", str(tmp_path / "calib")])
    assert result.exit_code == 0, result.output
    info = json.loads((tmp_path / "calib" / "manifest.json").read_text())["inputs"]["weights"]
    assert info["passes"] > 1
    bad = CliRunner().invoke(cli, [
        "calibrate", "--onnx", str(tiny_llama_export.directory), "--dataset", "sample",
        "--weights", "gptq", "--gptq-memory", "lots", "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "cannot read the size 'lots'" in bad.output
    assert not (tmp_path / "bad").exists()
