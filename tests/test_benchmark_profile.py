"""benchmarks/profile_ops.py: the per-op-type profile adds up and names the graph's op types."""

from __future__ import annotations

import json

import onnx

from benchmarks.profile_ops import GROUP_OF, GROUPS, main


def test_profile_of_an_engine_adds_up(tiny_llama_export, tmp_path, capsys):
    onnx_path = tiny_llama_export.onnx_path
    out = tmp_path / "profile.json"
    assert main(["--engine", f"a={onnx_path}", "--engine", f"b={tiny_llama_export.directory}",
                 "--shapes", "1x16,2x8", "--iterations", "2", "--json", str(out)]) == 0
    result = json.loads(out.read_text())["results"]
    graph_ops = {n.op_type for n in onnx.load(str(onnx_path)).graph.node}
    for shape in ("1x16", "2x8"):
        for name in ("a", "b"):
            r = result[shape][name]
            assert r["ops_us"], "the profiler recorded no node"
            assert "MatMul" in r["ops_us"] or "FusedMatMul" in r["ops_us"]
            assert abs(sum(r["ops_us"].values()) - r["nodes_us"]) < 1e-6 * r["nodes_us"] + 1e-9
            assert 0 < r["nodes_us"] <= r["run_us"]
            assert r["outside_us"] == r["run_us"] - r["nodes_us"]
            # ONNX Runtime may fuse op types, but what it runs comes from the graph or a fusion
            assert set(r["ops_us"]) & graph_ops
    text = capsys.readouterr().out
    assert "## 1x16" in text and "| float MatMul |" in text and "outside nodes" in text


def test_engine_spec_without_a_path_is_refused(capsys):
    assert main(["--engine", "fp32"]) == 2
    assert "NAME=PATH" in capsys.readouterr().err


def test_every_group_is_named_once():
    ops = [op for group in GROUPS.values() for op in group]
    assert len(ops) == len(set(ops)), "an op type in two groups would be counted twice"
    assert GROUP_OF["MatMulIntegerToFloat"] == "integer MatMul"
    assert GROUP_OF["QuantizeLinear"] == "quantize / dequantize"


def test_decode_step_profile_of_cache_engines(tiny_llama_cache_export, tmp_path, capsys):
    """``BxS+P``: a decode step against a past of P positions; the fused engine's profile has
    its Attention nodes, the exported one its Softmax."""
    from quantkit.build import build_engine

    fused = build_engine(tmp_path / "fused", precision="fp32",
                         onnx=tiny_llama_cache_export.directory)
    out = tmp_path / "profile.json"
    assert main(["--engine", f"exported={tiny_llama_cache_export.onnx_path}",
                 "--engine", f"fused={fused.path}", "--shapes", "1x1+20,2x1+7",
                 "--iterations", "2", "--json", str(out)]) == 0
    result = json.loads(out.read_text())["results"]
    for shape in ("1x1+20", "2x1+7"):
        assert "Softmax" in result[shape]["exported"]["ops_us"]
        assert "Attention" in result[shape]["fused"]["ops_us"]
        assert "Softmax" not in result[shape]["fused"]["ops_us"]
    assert "## 1x1+20" in capsys.readouterr().out


def test_a_past_length_needs_cache_engines(tiny_llama_export, capsys):
    assert main(["--engine", f"a={tiny_llama_export.onnx_path}", "--shapes", "1x1+4"]) == 2
    assert "a past length goes with KV-cache engines only" in capsys.readouterr().err
