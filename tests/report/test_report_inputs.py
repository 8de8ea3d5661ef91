"""Reading and merging results files: schema checks and refusing incomparable perplexities."""

from __future__ import annotations

import shutil

import pytest

from quantkit.errors import QuantkitError
from quantkit.report.inputs import check_comparable, engine_labels, read_results
from tests.report.helpers import ORT, TRT, altered


def test_missing_file(tmp_path):
    with pytest.raises(QuantkitError, match="results file .*nope.json does not exist"):
        read_results(tmp_path / "nope.json")


def test_not_json(tmp_path):
    path = tmp_path / "results.json"
    path.write_text("{not json")
    with pytest.raises(QuantkitError, match="is not valid JSON"):
        read_results(path)


@pytest.mark.parametrize("schema, message", [
    ("quantkit.results/2", "results schema 'quantkit.results/2' is not supported"),
    ("something-else", "not a quantkit results file"),
])
def test_wrong_schema_version(tmp_path, schema, message):
    path = altered(TRT, tmp_path / "results.json", lambda d: d.update(schema=schema))
    with pytest.raises(QuantkitError, match=message) as info:
        read_results(path)
    assert str(path) in str(info.value)


def test_missing_field_is_named(tmp_path):
    path = altered(TRT, tmp_path / "results.json", lambda d: d["engines"][2].pop("perplexity"))
    with pytest.raises(QuantkitError, match=r"engines\[2\]\.perplexity is missing"):
        read_results(path)


@pytest.mark.parametrize("field, value", [
    ("text_sha256", "0" * 64), ("max_length", 512), ("stride", 1024)])
def test_incomparable_dataset_settings(tmp_path, field, value):
    other = altered(ORT, tmp_path / "other.json", lambda d: d["dataset"].update({field: value}))
    with pytest.raises(QuantkitError, match="not comparable") as info:
        check_comparable([read_results(TRT), read_results(other)])
    text = str(info.value)
    assert field in text and str(TRT) in text and str(other) in text and repr(value) in text


def test_same_tokenizer_different_tokens_is_incomparable(tmp_path):
    # Same text and windows, but e.g. another --limit-tokens: different evaluated tokens.
    other = altered(ORT, tmp_path / "other.json",
                    lambda d: d["dataset"].update(tokens_sha256="1" * 64))
    with pytest.raises(QuantkitError, match="tokens_sha256"):
        check_comparable([read_results(TRT), read_results(other)])


def test_other_tokenizer_may_differ_in_tokens(tmp_path):
    def change(data):
        data["dataset"].update(tokens_sha256="1" * 64, tokenizer_sha256="2" * 64)
    other = altered(ORT, tmp_path / "other.json", change)
    check_comparable([read_results(TRT), read_results(other)])  # no error


def test_comparable_files_merge():
    check_comparable([read_results(TRT), read_results(ORT)])


def test_labels_qualify_only_colliding_names(tmp_path):
    a = tmp_path / "a" / "results.json"
    b = tmp_path / "b" / "results.json"
    a.parent.mkdir()
    b.parent.mkdir()
    shutil.copy(TRT, a)
    shutil.copy(ORT, b)
    labels = engine_labels([read_results(a), read_results(b)])
    assert labels == [["fp32@a/results", "fp16", "int8@a/results", "int8-minmax", "mixed"],
                      ["fp32@b/results", "int8@b/results"]]
    assert engine_labels([read_results(TRT)]) == [["fp32", "fp16", "int8", "int8-minmax",
                                                    "mixed"]]


def test_the_same_file_twice_is_refused(tmp_path):
    copy = tmp_path / "copy.json"
    shutil.copy(TRT, copy)
    with pytest.raises(QuantkitError, match="are the same results"):
        check_comparable([read_results(TRT), read_results(copy)])
