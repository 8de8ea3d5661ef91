"""A ``--split`` slice is read the same way by every reader, what was read is recorded, and two
roles (calibration, tuning, evaluation) never read the same records unless the user allows it."""

from __future__ import annotations

from pathlib import Path

import pytest

from quantkit.data import TokenBlocks, iter_records, record_range, resolve_text_source
from quantkit.errors import QuantkitError
from quantkit.eval.text import load_evaluation_text
from quantkit.text_roles import check_roles_disjoint, role_of_source, role_text


def _lines(tmp_path: Path, count: int = 10) -> Path:
    path = tmp_path / "lines.txt"
    path.write_text("".join(f"line {i} " + "word " * 20 + "\n" for i in range(count)))
    return path


def test_a_slice_reads_exactly_its_lines_everywhere(tmp_path, tiny_tokenizer) -> None:
    path = _lines(tmp_path)
    lines = path.read_text().splitlines(keepends=True)
    source = resolve_text_source(str(path), split="test[50%:]")
    assert record_range(source).describe() == {"first": 5, "last": 9, "count": 5, "total": 10}
    assert [r for _, r in iter_records(source)] == lines[5:]
    text = load_evaluation_text(source)
    assert text.text == "".join(lines[5:]) and text.num_documents == 1
    assert text.read is not None and text.read["records"]["first"] == 5
    assert text.read["num_records"] == 5
    blocks = TokenBlocks(resolve_text_source(str(path), split="train[:30%]"), tiny_tokenizer,
                         seq_len=8, num_samples=2)
    read = blocks.describe()["read"]
    assert read["records"] == {"first": 0, "last": 2, "count": 3, "total": 10}
    expected = tiny_tokenizer("".join(lines[:3]), add_special_tokens=False)["input_ids"]
    assert blocks.total_tokens == len(expected)


def test_disjoint_slices_hash_differently_and_cover_the_file(tmp_path) -> None:
    path = _lines(tmp_path)
    first = load_evaluation_text(resolve_text_source(str(path), split="train[:40%]"))
    rest = load_evaluation_text(resolve_text_source(str(path), split="test[40%:]"))
    whole = load_evaluation_text(resolve_text_source(str(path), split="test"))
    assert first.read and rest.read and whole.read
    assert len({first.read["text_sha256"], rest.read["text_sha256"],
                whole.read["text_sha256"]}) == 3
    assert first.text + rest.text == whole.text


def test_overlapping_roles_are_refused_with_both_ranges(tmp_path) -> None:
    path = _lines(tmp_path)
    calibration = role_of_source("calibration", resolve_text_source(str(path), split="train[:60%]"))
    evaluation = role_of_source("evaluation", resolve_text_source(str(path), split="test[50%:]"))
    with pytest.raises(QuantkitError) as error:
        check_roles_disjoint([calibration, evaluation])
    message = str(error.value)
    assert "calibration: lines.txt records 0-5 of 10 (train[:60%])" in message
    assert "evaluation: lines.txt records 5-9 of 10 (test[50%:])" in message
    assert "--allow-overlap" in message
    assert check_roles_disjoint([calibration, evaluation], allow_overlap=True) == [
        f"{calibration.label()} overlaps {evaluation.label()}"]
    later = role_of_source("evaluation", resolve_text_source(str(path), split="test[60%:]"))
    assert check_roles_disjoint([calibration, later]) == []
    other_file = tmp_path / "other.txt"
    other_file.write_text(path.read_text())
    elsewhere = role_of_source("evaluation", resolve_text_source(str(other_file), split="test"))
    assert check_roles_disjoint([calibration, elsewhere]) == []


def test_two_engines_calibrated_alike_are_no_clash(tmp_path) -> None:
    """Roles of one kind (two engines' calibration text) never clash with each other; with a
    focus only pairs that include the focused role are checked."""
    path = _lines(tmp_path)
    a = role_of_source("calibration", resolve_text_source(str(path), split="train[:60%]"))
    tuning = role_of_source("tuning", resolve_text_source(str(path), split="train[50%:70%]"))
    evaluation = role_of_source("evaluation", resolve_text_source(str(path), split="test[80%:]"))
    assert check_roles_disjoint([a, a, evaluation]) == []
    assert check_roles_disjoint([a, tuning, evaluation], focus="evaluation") == []
    with pytest.raises(QuantkitError, match="tuning: lines.txt records 5-6"):
        check_roles_disjoint([a, tuning, evaluation])


def test_hub_roles_clash_only_on_the_same_split() -> None:
    train = role_of_source("calibration", resolve_text_source("wikitext", split="train"))
    test = role_of_source("evaluation", resolve_text_source("wikitext", split="test"))
    assert check_roles_disjoint([train, test]) == []
    again = role_of_source("evaluation", resolve_text_source("wikitext", split="train"))
    with pytest.raises(QuantkitError, match="Hub dataset wikitext/wikitext-2-raw-v1, split train"):
        check_roles_disjoint([train, again])


def test_descriptions_recorded_before_ranges_are_resolved_again(tmp_path) -> None:
    """A table written before record ranges were recorded: the slice is resolved again."""
    path = _lines(tmp_path)
    source = resolve_text_source(str(path), split="train[:50%]")
    old = {"source": source.describe(), "seq_len": 8}
    role = role_text("calibration", old)
    assert role is not None and role.records is not None
    assert (role.records.first, role.records.stop) == (0, 5)
    assert role_text("calibration", {}) is None


def test_recipe_with_overlapping_texts_is_refused_before_any_work(tmp_path) -> None:
    from quantkit.config import Recipe
    from quantkit.pipeline import check_recipe_texts, run_recipe

    path = _lines(tmp_path)
    data = {"model": "does-not-matter", "workdir": str(tmp_path / "work"),
            "calibration": {"dataset": str(path), "split": "train[:60%]"},
            "evaluation": {"dataset": str(path), "split": "test[50%:]"}}
    with pytest.raises(QuantkitError, match="allow_overlap: true"):
        run_recipe(Recipe.from_dict(data), say=lambda _: None)
    assert not (tmp_path / "work" / "export").exists()
    data["evaluation"] = {**data["evaluation"], "allow_overlap": True}
    check_recipe_texts(Recipe.from_dict(data))
    data["evaluation"] = {"dataset": str(path), "split": "test[60%:]"}
    check_recipe_texts(Recipe.from_dict(data))


def test_a_slice_in_blocks_samples_the_whole_file(tmp_path) -> None:
    """``test[50%:]/2`` is the second half of each half of the records: read, recorded, labelled
    and checked for overlap span by span; the three quantize parts in blocks cover the file once."""
    path = _lines(tmp_path, 20)
    lines = path.read_text().splitlines(keepends=True)
    source = resolve_text_source(str(path), split="test[50%:]/2")
    assert source.blocks == 2 and source.describe()["blocks"] == 2
    assert "blocks" not in resolve_text_source(str(path), split="test[50%:]").describe()
    assert [r for _, r in iter_records(source)] == lines[5:10] + lines[15:20]
    text = load_evaluation_text(source)
    assert text.read is not None
    assert text.read["records"] == {"first": 5, "last": 19, "count": 10, "total": 20,
                                    "spans": [[5, 9], [15, 19]]}
    evaluation = role_text("evaluation", text.describe())
    assert evaluation is not None and evaluation.records is not None
    assert evaluation.label() == ("evaluation: lines.txt records 5-9, 15-19 (2 spans, 10) of 20 "
                                  "(test[50%:]/2)")
    calibration = role_of_source("calibration", resolve_text_source(str(path), split="c[:40%]/2"))
    tuning = role_of_source("tuning", resolve_text_source(str(path), split="t[40%:50%]/2"))
    assert check_roles_disjoint([calibration, tuning, evaluation]) == []
    seen = [i for i in range(20) for role in (calibration, tuning, evaluation)
            if role.records is not None and i in role.records]
    assert seen == list(range(20))
    # a plain slice that reaches into one span of the blocked part clashes with it
    late = role_of_source("calibration", resolve_text_source(str(path), split="train[70%:80%]"))
    with pytest.raises(QuantkitError, match=r"records 14-15 of 20 \(train\[70%:80%\]\)"):
        check_roles_disjoint([late, evaluation])
    between = role_of_source("calibration", resolve_text_source(str(path), split="c[50%:70%]"))
    assert check_roles_disjoint([between, evaluation]) == []


@pytest.mark.parametrize("split", ["test[50%:]/0", "test[50%:]/x", "test/2"])
def test_bad_blocks_are_one_clear_error(tmp_path, split) -> None:
    path = _lines(tmp_path)
    with pytest.raises(QuantkitError, match="split"):
        resolve_text_source(str(path), split=split)


def test_hub_splits_cannot_be_taken_in_blocks() -> None:
    with pytest.raises(QuantkitError, match="local text only"):
        resolve_text_source("wikitext", split="test[:50%]/4")
