"""Text sources and token blocks: determinism, re-iteration, local formats, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from quantkit.data import TokenBlocks, resolve_text_source
from quantkit.errors import QuantkitError


def _blocks(tokenizer, dataset, **kw):
    defaults = {"seq_len": 64, "num_samples": 10, "batch_size": 4, "seed": 0}
    defaults.update(kw)
    return TokenBlocks(resolve_text_source(dataset, split=kw.pop("split", "train")), tokenizer,
                       **defaults)


def test_blocks_shapes_and_batches(tiny_tokenizer):
    blocks = _blocks(tiny_tokenizer, "sample")
    batches = list(blocks)
    assert len(batches) == len(blocks) == 3
    assert [b["input_ids"].shape for b in batches] == [(4, 64), (4, 64), (2, 64)]
    for batch in batches:
        assert batch["input_ids"].dtype == np.int64
        assert batch["attention_mask"].dtype == np.int64
        assert batch["attention_mask"].all()
        assert batch["input_ids"].max() < len(tiny_tokenizer)


def test_iterating_twice_gives_identical_batches(tiny_tokenizer):
    blocks = _blocks(tiny_tokenizer, "sample")
    first = [b["input_ids"].copy() for b in blocks]
    second = [b["input_ids"] for b in blocks]
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))


def test_same_seed_same_blocks_other_seed_other_blocks(tiny_tokenizer):
    a = _blocks(tiny_tokenizer, "sample", seed=1).blocks
    b = _blocks(tiny_tokenizer, "sample", seed=1).blocks
    c = _blocks(tiny_tokenizer, "sample", seed=2).blocks
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_blocks_are_contiguous_text(tiny_tokenizer):
    """Every block is a run of the concatenated token stream (no padding, no shuffling inside)."""
    text = (resolve_text_source("sample").name)
    with open(text, encoding="utf-8") as fh:
        stream = tiny_tokenizer(fh.read(), add_special_tokens=False)["input_ids"]
    blocks = _blocks(tiny_tokenizer, "sample", num_samples=3).blocks
    joined = " ".join(map(str, stream))
    for block in blocks:
        # chunked tokenization may differ from whole-file tokenization at chunk borders only
        assert " ".join(map(str, block[1:-1])) in joined


def test_sample_splits_are_disjoint(tiny_tokenizer):
    train = resolve_text_source("sample", split="train")
    test = resolve_text_source("sample", split="test")
    assert train.name != test.name
    with open(train.name) as a, open(test.name) as b:
        paragraphs = [{p for p in f.read().split("\n\n") if len(p) > 200} for f in (a, b)]
    assert paragraphs[0] and paragraphs[1]
    assert not paragraphs[0] & paragraphs[1]


@pytest.mark.parametrize("fmt", ["txt", "raw", "jsonl", "parquet", "folder"])
def test_local_formats(tiny_tokenizer, tmp_path, fmt):
    sample = resolve_text_source("sample").name
    with open(sample, encoding="utf-8") as fh:
        paragraphs = [p for p in fh.read().split("\n\n") if p.strip()]
    if fmt in ("txt", "raw"):
        path = tmp_path / f"data.{fmt}"
        path.write_text("\r\n\r\n".join(paragraphs), encoding="utf-8")  # CRLF like wiki.test.raw
    elif fmt == "jsonl":
        path = tmp_path / "data.jsonl"
        path.write_text("\n".join(json.dumps({"text": p}) for p in paragraphs))
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = tmp_path / "data.parquet"
        pq.write_table(pa.table({"text": paragraphs}), path)
    else:
        path = tmp_path / "folder"
        path.mkdir()
        (path / "a.txt").write_text("\n".join(paragraphs[:40]))
        (path / "b.txt").write_text("\n".join(paragraphs[40:]))
        (path / "ignored.bin").write_bytes(b"\x00\x01")
    blocks = _blocks(tiny_tokenizer, str(path), num_samples=8)
    assert blocks.blocks.shape == (8, 64)
    if fmt in ("txt", "raw"):
        assert "\r" not in tiny_tokenizer.decode(blocks.blocks[0])


def test_text_shorter_than_one_block(tiny_tokenizer, tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("Only a few words here.")
    with pytest.raises(QuantkitError, match=r"shorter than one block: \d+ tokens, seq-len is 64"):
        _blocks(tiny_tokenizer, str(path)).blocks


def test_too_few_blocks_names_the_counts(tiny_tokenizer):
    with pytest.raises(QuantkitError, match="blocks of 64; 100000 were asked for"):
        _blocks(tiny_tokenizer, "sample", num_samples=100_000).blocks


def test_missing_local_file():
    with pytest.raises(QuantkitError, match="not found"):
        resolve_text_source("./no/such/file.txt")


def test_unsupported_file(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("a,b")
    with pytest.raises(QuantkitError, match="unsupported text file"):
        resolve_text_source(str(path))


def test_jsonl_without_the_column(tiny_tokenizer, tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"body": "x " * 500}) + "\n")
    with pytest.raises(QuantkitError, match="no column 'text'.*columns there: body"):
        _blocks(tiny_tokenizer, str(path)).blocks


def test_hub_unreachable_names_local_alternative(tiny_tokenizer):
    source = resolve_text_source("wikitext")
    assert (source.kind, source.config) == ("hub", "wikitext-2-raw-v1")
    with pytest.raises(QuantkitError, match="cannot reach the Hugging Face Hub.*--dataset sample"
                       ) as caught:
        TokenBlocks(source, tiny_tokenizer, seq_len=64, num_samples=2).blocks
    assert "shared" not in str(caught.value)  # no path only the developers' machines have


def test_unknown_sample_split():
    with pytest.raises(QuantkitError, match="no split 'dev'"):
        resolve_text_source("sample", split="dev")


@pytest.mark.parametrize("field", ["seq_len", "num_samples", "batch_size"])
def test_sizes_must_be_positive(tiny_tokenizer, field):
    with pytest.raises(QuantkitError, match="must be at least 1"):
        TokenBlocks(resolve_text_source("sample"), tiny_tokenizer, **{field: 0})


def test_percentage_slices_are_disjoint_and_cover(tiny_tokenizer, tmp_path):
    from quantkit.data import iter_texts, parse_split

    assert parse_split("train[:50%]") == ("train", (0.0, 50.0), 1)
    assert parse_split("test[50%:]") == ("test", (50.0, 100.0), 1)
    assert parse_split("test") == ("test", (0.0, 100.0), 1)
    path = tmp_path / "lines.txt"
    path.write_text("".join(f"line {i}\n" for i in range(10)))
    first = "".join(iter_texts(resolve_text_source(str(path), split="train[:30%]")))
    rest = "".join(iter_texts(resolve_text_source(str(path), split="test[30%:]")))
    assert first == "line 0\nline 1\nline 2\n"
    assert first + rest == path.read_text()


@pytest.mark.parametrize("split", ["train[50%:10%]", "train[:150%]", "train[a:b]"])
def test_bad_slices(split, tmp_path):
    path = tmp_path / "lines.txt"
    path.write_text("x\n")
    with pytest.raises(QuantkitError, match="slice|split"):
        resolve_text_source(str(path), split=split)


def test_hub_slices_are_refused():
    with pytest.raises(QuantkitError, match="apply to local text only"):
        resolve_text_source("wikitext", split="train[:10%]")
