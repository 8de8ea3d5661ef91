"""Rotation rewrite: exact in FP32, refused where it cannot be, and it makes INT8 lose less."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from quantkit.cli.main import cli
from quantkit.errors import QuantkitError
from quantkit.graph_stats import linear_layer_macs
from quantkit.plan import ROTATION_SEGMENT, PlanRecipe, PlanRule, Precision, resolve_plan
from quantkit.qdq import QdqOptions, rewrite_model
from quantkit.rotation import (
    online_factors,
    random_orthogonal,
    rotate_export,
    sylvester_hadamard,
    trace_residual,
)
from quantkit.tune.groups import groups_of_model
from tests.build_helpers import MACHINE_WEIGHT_LAYOUT, make_table, run_onnx, token_feeds
from tests.conftest import loaded, make_tiny_llama


def _relative(ref: np.ndarray, new: np.ndarray) -> float:
    return float(np.abs(ref - new).max() / np.abs(ref).max())


def test_matrices_are_orthogonal():
    h = sylvester_hadamard(8)
    assert np.array_equal(h @ h.T, 8 * np.eye(8)) and np.array_equal(h, h.T)
    q = random_orthogonal(12, seed=3)
    assert np.allclose(q.T @ q, np.eye(12), atol=1e-12)
    assert not np.allclose(q, random_orthogonal(12, seed=4))
    with pytest.raises(QuantkitError, match="power of 2"):
        sylvester_hadamard(12)


@pytest.mark.parametrize(("channels", "limit", "expected"), [
    (1536, 512, (8, 8, 8)), (1536, 64, (8, 8)), (128, 512, (2, 8, 8)), (96, 512, (4, 8)),
    (6, 512, (2,)), (7, 512, ()), (1536, 0, ()),
])
def test_online_factors(channels, limit, expected):
    assert online_factors(channels, limit) == expected


def test_rotated_llama_is_equivalent_and_recorded(tiny_llama_export, tmp_path):
    out = rotate_export(tiny_llama_export.onnx_path, tmp_path / "rot")
    ids = np.random.default_rng(0).integers(0, 512, (2, 40), dtype=np.int64)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    assert _relative(run_onnx(tiny_llama_export.onnx_path, feed), run_onnx(out, feed)) < 1e-5
    manifest = json.loads((tmp_path / "rot" / "manifest.json").read_text())
    assert manifest["exporter"] == "quantkit.rotation"
    assert manifest["check"]["relative_error"] < 1e-5
    summary = manifest["rotation"]
    # 2 layers x 2 norms + the final norm; q/k/v + gate/up per layer + the LM head; o + down
    assert summary["residual"] == {"norms": 5, "readers": 11, "writers": 4}
    assert summary["heads"] == {"layers": 2, "head_dim": 16}
    assert summary["down"] == {"layers": 2, "block": 128, "factors": [2, 8, 8]}
    model = onnx.load(str(out))
    rotations = [n for n in model.graph.node if f"/{ROTATION_SEGMENT}/" in n.name]
    assert len([n for n in rotations if n.op_type == "MatMul"]) == 6  # 3 factors x 2 layers
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    for norm in trace_residual(model.graph).norms:  # gains folded into the readers
        gain = next(inits[i] for i in norm.input if i in inits)
        assert np.array_equal(gain, np.ones_like(gain))
    assert manifest["model_hash"] != json.loads(
        (tiny_llama_export.onnx_path.parent / "manifest.json").read_text())["model_hash"]


def test_rotation_refuses_layernorm_models_and_writes_nothing(tiny_gpt2_export, tmp_path):
    with pytest.raises(QuantkitError, match="LayerNormalization"):
        rotate_export(tiny_gpt2_export.onnx_path, tmp_path / "rot")
    assert not (tmp_path / "rot").exists()


def test_rotation_nodes_stay_fp32_and_count_in_coverage(tiny_llama_export, tmp_path):
    out = rotate_export(tiny_llama_export.onnx_path, tmp_path / "rot", down_block=64)
    model = onnx.load(str(out))
    plan = resolve_plan(PlanRecipe.uniform("int8"), model)
    rotation = [n for n in plan.decisions if f"/{ROTATION_SEGMENT}/" in n
                and plan.decisions[n].op_type == "MatMul"]
    assert rotation
    for name in rotation:
        assert plan.decisions[name].precision == Precision.FP32
        assert "int8 n/a for a rotation" in plan.decisions[name].rule
    assert all(plan.precision_of(n) == Precision.INT8 for n in plan.decisions
               if n.endswith("down_proj/MatMul"))
    grouped = {n for g in groups_of_model(model) for n in g.nodes}
    assert not grouped & set(rotation)  # sensitivity / autotune never switch them
    macs = linear_layer_macs(out, seq_len=16)
    assert all(macs[n] > 0 for n in rotation)  # FP32 work that INT8 coverage is measured over
    op_type = PlanRecipe(default=Precision.FP32, rules=[PlanRule(op_type="MatMul",
                                                                 precision=Precision.INT8)])
    assert resolve_plan(op_type, model).precision_of(rotation[0]) == Precision.FP32
    exact = PlanRecipe(default=Precision.FP32, rules=[PlanRule(node=rotation[0],
                                                               precision=Precision.INT8)])
    with pytest.raises(QuantkitError, match="no INT8 form"):
        resolve_plan(exact, model)
    from quantkit.calib.graph import analyse, select_tensors

    calibrated = set(select_tensors(analyse(model), "quantizable"))
    nodes = {n.name: n for n in model.graph.node}
    assert not calibrated & {i for n in rotation for i in nodes[n].input}  # they stay FP32
    assert {nodes[n].input[0] for n in nodes if n.endswith("down_proj/MatMul")} <= calibrated


@pytest.fixture(scope="module")
def outlier_llama_export(tiny_tokenizer, tmp_path_factory):
    """Tiny Llama with the outliers rotation is for: a massive residual channel (embedding
    column scaled up) and one down_proj input channel scaled by 500 (up_proj row * 500,
    down_proj column / 500: the same function, a fragile activation)."""
    import torch

    from quantkit.export import export_model

    model = make_tiny_llama(seed=5)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 3] *= 30.0
        for layer in model.model.layers:
            layer.mlp.up_proj.weight[7, :] *= 500.0
            layer.mlp.down_proj.weight[:, 7] /= 500.0
    return export_model(loaded(model, tiny_tokenizer, "outlier-llama"),
                        tmp_path_factory.mktemp("export") / "outlier-llama")


def _int8_error(onnx_path, calib, feed) -> float:
    model = onnx.load(str(onnx_path))
    plan = resolve_plan(PlanRecipe.uniform("int8"), model)
    table = make_table(onnx_path, calib)
    layout = QdqOptions(weight_layout=MACHINE_WEIGHT_LAYOUT)  # exact kernels on this CPU
    int8 = rewrite_model(model, plan, table.amax, layout).model
    return _relative(run_onnx(onnx_path, feed), run_onnx(int8, feed))


def test_rotation_makes_int8_lose_less_on_outliers(outlier_llama_export, tmp_path):
    rotated = rotate_export(outlier_llama_export.onnx_path, tmp_path / "rot")
    calib = token_feeds(3, batch=2, seq=32, seed=0)
    feed = token_feeds(1, batch=2, seq=48, seed=123)[0]
    plain = _int8_error(outlier_llama_export.onnx_path, calib, feed)
    turned = _int8_error(rotated, calib, feed)
    assert turned < 0.5 * plain, (plain, turned)


def test_rotate_cli(tiny_llama_export, tiny_gpt2_export, tmp_path):
    out = tmp_path / "rot"
    result = CliRunner().invoke(cli, ["rotate", "--onnx", str(tiny_llama_export.onnx_path.parent),
                                      "--out", str(out), "--down-block", "0"])
    assert result.exit_code == 0, result.output
    assert "0 down_proj inputs online" in result.output and (out / "model.onnx").is_file()
    assert (out / "tokenizer").is_dir()
    again = CliRunner().invoke(cli, ["rotate", "--onnx", str(tiny_llama_export.onnx_path),
                                     "--out", str(out)])
    assert again.exit_code == 2 and "already exists" in again.output
    bad = CliRunner().invoke(cli, ["rotate", "--onnx", str(tiny_gpt2_export.onnx_path),
                                   "--out", str(tmp_path / "gpt2")])
    assert bad.exit_code == 2 and "LayerNormalization" in bad.output
    assert len(bad.output.strip().splitlines()) <= 2 and not (tmp_path / "gpt2").exists()
    block = CliRunner().invoke(cli, ["rotate", "--onnx", str(tiny_llama_export.onnx_path),
                                     "--out", str(tmp_path / "b48"), "--down-block", "48"])
    assert block.exit_code == 2 and "power of 2" in block.output
    assert not (tmp_path / "b48").exists()


def test_smoothquant_on_a_rotated_export_stays_equivalent(tiny_llama_export, tiny_tokenizer,
                                                          tmp_path):
    from quantkit.data import TokenBlocks, resolve_text_source
    from quantkit.smoothquant import smooth_export

    rotated = rotate_export(tiny_llama_export.onnx_path, tmp_path / "rot")
    blocks = TokenBlocks(resolve_text_source("sample"), tiny_tokenizer, seq_len=32,
                         num_samples=4, batch_size=2)
    smoothed = smooth_export(rotated, blocks, tmp_path / "sq", alpha="auto")
    feed = token_feeds(1, batch=2, seq=40, seed=7)[0]
    assert _relative(run_onnx(tiny_llama_export.onnx_path, feed), run_onnx(smoothed, feed)) < 1e-5
    manifest = json.loads((tmp_path / "sq" / "manifest.json").read_text())
    kinds = {g["kind"] for g in manifest["smoothquant"]["groups"]}
    assert kinds == {"norm"}  # down_proj now reads the rotation, not act(gate) * up
