"""benchmarks/decode_step.py on a tiny Llama cache engine: the schedules table, the RMSNorm
comparison skipped for an engine already exported with divisions, bad input exit 2."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))


def test_decode_step_prints_the_schedules(tiny_llama_cache_export, tmp_path, capsys) -> None:
    import decode_step

    from quantkit.build import build_engine

    engine = build_engine(tmp_path / "fp32", precision="fp32",
                          onnx=tiny_llama_cache_export.directory)
    code = decode_step.main(["--engine", f"a={engine.path}", "--engine", f"b={engine.path}",
                             "--past", "8", "--runs", "2", "--threads", "1", "--divide-rms",
                             "--work", str(tmp_path / "work")])
    out = capsys.readouterr().out
    assert code == 0
    assert "| a |" in out and "| b |" in out and "settled p50 ms" in out
    assert "a: no Mul(x, Reciprocal(Sqrt)) to rewrite" in out  # exports are divisions now
    assert decode_step.main(["--engine", f"c={tmp_path / 'nothing'}"]) == 2
