"""benchmarks/decode_ranges.py: decode-step ranges of the cache graph against full-sequence ranges.

A decode step's activations are the full pass's rows at its position (causal attention), so no
decode amax may exceed the full one, and the last step's K and V hold every key and value of
the block, as the full pass does."""

from __future__ import annotations

import json

import pytest

from benchmarks.decode_ranges import main, range_tables


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_decode_ranges_are_a_subset_of_full_ranges(family, request, tmp_path, capsys):
    plain = request.getfixturevalue(f"tiny_{family}_export").directory
    cache = request.getfixturevalue(f"tiny_{family}_cache_export").directory
    out = tmp_path / "ranges.json"
    assert main(["--plain", str(plain), "--cache", str(cache), "--dataset", "sample",
                 "--split", "calibration", "--num-samples", "3", "--seq-len", "48",
                 "--prefill", "8", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    labels = {r["label"] for r in rows}
    assert {"qkv", "attn_scores.Q", "attn_scores.K", "attn_values.P", "attn_values.V",
            "attn_out", "mlp_in", "mlp_down", "lm_head"} <= labels
    for r in rows:
        assert 0 < r["amax_ratio"] <= 1 + 1e-5, r
        assert 0 <= r["decode_clipped"] <= 1
        if r["label"] in ("attn_scores.K", "attn_values.V"):
            assert r["amax_ratio"] == pytest.approx(1, rel=1e-5), r
    # every MatMul pairs: 2 layers x at least 6 (GPT-2; Llama 9), and the LM head
    assert len({r["node"] for r in rows}) >= 2 * 6 + 1
    text = capsys.readouterr().out
    assert "CPU:" in text and "attn_values.P" in text


def test_prefill_must_leave_decode_steps(tiny_llama_export, tiny_llama_cache_export):
    with pytest.raises(SystemExit) as err:
        main(["--plain", str(tiny_llama_export.directory), "--cache",
              str(tiny_llama_cache_export.directory), "--dataset", "sample",
              "--seq-len", "16", "--prefill", "16"])
    assert err.value.code == 2


def test_agreement_scores_the_three_tables(tiny_llama_export, tiny_llama_cache_export, tmp_path):
    out = tmp_path / "ranges.json"
    assert main(["--plain", str(tiny_llama_export.directory), "--cache",
                 str(tiny_llama_cache_export.directory), "--dataset", "sample",
                 "--split", "calibration", "--num-samples", "2", "--seq-len", "32",
                 "--prefill", "8", "--agreement", "int8", "--engines", str(tmp_path / "e"),
                 "--save-stats", str(tmp_path / "s"), "--json", str(out)]) == 0
    agreed = json.loads(out.read_text())["agreement"]
    assert set(agreed) == {"int8/full", "int8/decode", "int8/max"}
    for result in agreed.values():
        assert result["positions"] > 0
        assert 0 <= result["teacher_forced"]["share"] <= 1
    engines = {p.name for p in (tmp_path / "e").iterdir()}
    assert engines == {"fp32", "int8-full", "int8-decode", "int8-max"}
    # the tables: full carried to the cache graph's names, max the larger range per tensor
    from quantkit.calib.stats import ActivationStats
    from quantkit.export import onnx_model_hash

    plain, cache = tiny_llama_export.onnx_path, tiny_llama_cache_export.onnx_path
    tables = range_tables(ActivationStats.load(tmp_path / "s" / "full.npz"),
                          ActivationStats.load(tmp_path / "s" / "decode.npz"), "percentile",
                          plain, cache)
    assert {t.model_hash for t in tables.values()} == {onnx_model_hash(cache)}
    full, decode, larger = tables["full"].amax, tables["decode"].amax, tables["max"].amax
    assert set(larger) == set(full) and set(full) <= set(decode)
    for name, value in larger.items():
        assert value == max(full[name], decode[name])


def test_agreement_needs_an_engine_folder(tiny_llama_export, tiny_llama_cache_export):
    with pytest.raises(SystemExit) as err:
        main(["--plain", str(tiny_llama_export.directory), "--cache",
              str(tiny_llama_cache_export.directory), "--dataset", "sample",
              "--agreement", "int8"])
    assert err.value.code == 2
