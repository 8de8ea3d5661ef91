"""benchmarks/decode_ranges.py: decode-step ranges of the cache graph against full-sequence ranges.

A decode step's activations are the full pass's rows at its position (causal attention), so no
decode amax may exceed the full one, and the last step's K and V hold every key and value of
the block, as the full pass does."""

from __future__ import annotations

import json

import pytest

from benchmarks.decode_ranges import main


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
