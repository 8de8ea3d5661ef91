"""benchmarks/trained_gpt2.py: a GPT-2-architecture model folder that ``quantkit`` loads, and
one clear error (exit 2, nothing written) for bad input."""

from __future__ import annotations

from benchmarks.trained_gpt2 import main
from tests.conftest import SHARED

GPT2_FILES = SHARED / "tokenizers" / "gpt2"


def test_bad_input_is_one_error_and_writes_nothing(tmp_path, capsys) -> None:
    out = tmp_path / "model"
    assert main(["--text", "sample", "--split", "train[:40%]", "--tokenizer", str(tmp_path),
                 "--out", str(out)]) == 2
    assert "vocab.json not found" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_short_run_gives_a_model_quantkit_loads(tmp_path, gpt2_tokenizer) -> None:
    from quantkit.models import load_model

    out = tmp_path / "gpt2"
    assert main(["--text", "sample", "--split", "train[:40%]", "--tokenizer", str(GPT2_FILES),
                 "--out", str(out), "--steps", "2", "--batch", "1", "--seq-len", "16",
                 "--threads", "1"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt2"]  # no .partial left
    loaded = load_model(str(out))
    assert loaded.source["architecture"] == "GPT2LMHeadModel"
    assert loaded.tokenizer("Hello world")["input_ids"] == [15496, 995]
