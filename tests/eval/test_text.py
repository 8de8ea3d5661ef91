"""The evaluation text: documents of each kind of source, joined with a blank line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from quantkit.data import resolve_text_source
from quantkit.errors import QuantkitError
from quantkit.eval.text import load_evaluation_text, source_documents
from tests.eval.engines import WIKITEXT_TEST


def test_plain_file_is_one_document_with_lf_line_ends(tmp_path: Path) -> None:
    path = tmp_path / "doc.raw"
    path.write_bytes(b" = Title = \r\n line one\r\n line two\r\n")
    text = load_evaluation_text(resolve_text_source(str(path), split="test"))
    assert text.text == " = Title = \n line one\n line two\n"
    assert text.num_documents == 1


def test_folder_files_are_documents_in_sorted_order(tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_text("second\n")
    (tmp_path / "a.txt").write_text("first\n")
    (tmp_path / "c.txt").write_text("  \n")  # blank: dropped
    text = load_evaluation_text(resolve_text_source(str(tmp_path), split="test"))
    assert text.text == "first\n\n\nsecond\n" and text.num_documents == 2
    assert text.describe()["joined_with"] == "\n\n"


def test_jsonl_records_are_documents(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"body": t}) for t in ["one", "", "two\nlines"]) + "\n")
    docs = source_documents(resolve_text_source(str(path), split="test", column="body"))
    assert docs == ["one", "", "two\nlines"]
    text = load_evaluation_text(resolve_text_source(str(path), split="test", column="body"))
    assert text.text == "one\n\ntwo\nlines" and text.num_documents == 2
    with pytest.raises(QuantkitError, match="no column 'text'"):
        load_evaluation_text(resolve_text_source(str(path), split="test"))


def test_large_plain_file_is_read_whole() -> None:
    if not WIKITEXT_TEST.is_file():
        pytest.skip(f"{WIKITEXT_TEST} not found (../shared is absent)")
    text = load_evaluation_text(resolve_text_source(str(WIKITEXT_TEST), split="test"))
    raw = WIKITEXT_TEST.read_bytes().decode("utf-8")
    assert text.text == raw.replace("\r\n", "\n")  # every ~64 KB chunk, in order, nothing lost
    assert text.num_documents == 1 and text.text.startswith(" = Robert Boulter = \n")


def test_empty_sources_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "blank.txt"
    path.write_text("\n \n\t\n")
    with pytest.raises(QuantkitError, match="is empty"):
        load_evaluation_text(resolve_text_source(str(path), split="test"))
