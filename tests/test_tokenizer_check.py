"""An empty tokenizer (loads fine, encodes every text to no ids) is an error wherever quantkit
takes a tokenizer, never an empty calibration or evaluation.

The empty tokenizer is built the way that breaks on transformers 5:
``GPT2TokenizerFast(vocab_file=..., merges_file=...)``, from the vocabulary of the tiny BPE
tokenizer the other tests train (so no ../shared files are needed)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from quantkit.errors import QuantkitError
from quantkit.models import check_tokenizer
from tests.cli.cli_helpers import invoke, one_line_error


def _vocab_and_merges(tokenizer: Any) -> tuple[dict[str, int], list[tuple[str, str]]]:
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return model["vocab"], merges


@pytest.fixture(scope="module")
def vocab_files(tiny_tokenizer, tmp_path_factory) -> tuple[Path, Path]:
    vocab, merges = _vocab_and_merges(tiny_tokenizer)
    root = tmp_path_factory.mktemp("bpe-files")
    (root / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (root / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    return root / "vocab.json", root / "merges.txt"


@pytest.fixture(scope="module")
def empty_tokenizer(vocab_files) -> Any:
    from transformers import GPT2TokenizerFast

    vocab, merges = vocab_files
    tokenizer = GPT2TokenizerFast(vocab_file=str(vocab), merges_file=str(merges))
    if tokenizer("Hello world", add_special_tokens=False)["input_ids"]:
        pytest.skip("this transformers version builds a working tokenizer from vocab_file=/"
                    "merges_file= (the empty-tokenizer case does not arise)")
    return tokenizer


@pytest.fixture()
def export_with_empty_tokenizer(tiny_llama_export, empty_tokenizer, tmp_path) -> Path:
    """A copy of the tiny Llama export whose saved tokenizer/ is the empty one."""
    export = tmp_path / "export"
    shutil.copytree(tiny_llama_export.directory, export)
    shutil.rmtree(export / "tokenizer")
    empty_tokenizer.save_pretrained(str(export / "tokenizer"))
    return export


def test_working_and_empty_tokenizers(tiny_tokenizer, vocab_files, empty_tokenizer):
    from transformers import GPT2TokenizerFast

    vocab, merges = _vocab_and_merges(tiny_tokenizer)
    working = GPT2TokenizerFast(vocab=vocab, merges=merges)
    assert check_tokenizer(working) is working
    text = "The river flows"
    assert working(text)["input_ids"] == tiny_tokenizer(text)["input_ids"]
    with pytest.raises(QuantkitError, match=r"GPT2Tokenizer\w* from .*bpe-files.* is empty: "
                                            r"it encodes 'Hello world' to no token ids"):
        check_tokenizer(empty_tokenizer, vocab_files[0].parent)


def test_token_blocks_refuse_an_empty_tokenizer(empty_tokenizer):
    from quantkit.data import TokenBlocks, resolve_text_source

    with pytest.raises(QuantkitError, match="is empty"):
        TokenBlocks(resolve_text_source("sample"), empty_tokenizer, seq_len=16, num_samples=2)


def test_export_refuses_an_empty_tokenizer(tiny_llama, empty_tokenizer, tmp_path):
    from quantkit.export import export_model
    from tests.conftest import loaded

    with pytest.raises(QuantkitError, match="is empty"):
        export_model(loaded(tiny_llama.model, empty_tokenizer, "empty-tok"), tmp_path / "x")
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a temporary directory


def test_calibrate_names_the_empty_tokenizer(export_with_empty_tokenizer, tmp_path):
    out = tmp_path / "calib"
    result = invoke("calibrate", "--onnx", export_with_empty_tokenizer, "--dataset", "sample",
                    "--num-samples", 2, "--seq-len", 16, "--out", out)
    line = one_line_error(result)
    assert f"from {export_with_empty_tokenizer / 'tokenizer'}) is empty" in line
    assert not out.exists()


def test_build_with_calibration_text_names_the_empty_tokenizer(export_with_empty_tokenizer):
    from quantkit.build import CalibrationData

    with pytest.raises(QuantkitError, match="tokenizer.* is empty"):
        CalibrationData("sample", seq_len=16, num_samples=2).blocks(
            export_with_empty_tokenizer / "model.onnx")
