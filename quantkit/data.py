"""Text sources -> TokenBlocks: fixed-length token batches, re-iterable and deterministic.

Sources are a Hugging Face dataset read with ``streaming=True`` (default ``wikitext``, config
``wikitext-2-raw-v1``), local ``.txt`` / ``.raw`` / ``.jsonl`` / ``.parquet`` files or folders of
them, or the project's bundled ``sample``. Texts are streamed, tokenized in chunks, concatenated
and cut into blocks; ``num_samples`` blocks are chosen by seeded reservoir sampling, so memory
holds the chosen blocks only, never the whole dataset.
"""

from __future__ import annotations

import json
import os
import random
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

from quantkit.errors import QuantkitError

LOCAL_SUFFIXES = (".txt", ".raw", ".jsonl", ".parquet")
HUB_DEFAULT_CONFIGS = {"wikitext": "wikitext-2-raw-v1"}
SAMPLE_DIR = Path(__file__).resolve().parent.parent / "calib_data" / "sample"
SAMPLE_FILES = {"train": "calibration.txt", "calibration": "calibration.txt",
                "test": "evaluation.txt", "validation": "evaluation.txt",
                "evaluation": "evaluation.txt"}
CHUNK_CHARS = 1 << 16  # local text is tokenized in chunks of about this many characters


@dataclass(frozen=True)
class TextSource:
    """Where text comes from. ``kind`` is ``hub`` or ``local``.

    ``part`` selects a slice of the records (lines of a text file, rows of JSONL/Parquet) by
    percentage, written like a datasets split slice: ``train[:50%]`` -> (0, 50),
    ``test[50%:]`` -> (50, 100). It lets one local file give disjoint calibration and evaluation
    parts. ``blocks`` > 1 (``test[50%:]/10``) takes the slice in each of that many equal blocks
    of the records, so every part samples the whole file: text varies along a file (wikitext's
    articles), and a plan tuned on one contiguous tenth of it mispredicted another (README).
    """

    kind: str
    name: str  # dataset id, or the resolved path of a file/folder
    config: str | None = None
    split: str | None = None
    column: str = "text"
    part: tuple[float, float] = (0.0, 100.0)
    blocks: int = 1  # the part is taken in each of this many equal blocks of records

    def describe(self) -> dict[str, Any]:
        described = {"kind": self.kind, "name": self.name, "config": self.config,
                     "split": self.split, "column": self.column, "part_percent": list(self.part)}
        if self.blocks > 1:  # only then, so plain slices keep their descriptions (and step keys)
            described["blocks"] = self.blocks
        return described


_SLICE = re.compile(r"^(?P<split>[\w.-]+)\[(?P<lo>\d+(?:\.\d+)?%)?:(?P<hi>\d+(?:\.\d+)?%)?\]"
                    r"(?:/(?P<blocks>\d+))?$")


def parse_split(split: str) -> tuple[str, tuple[float, float], int]:
    """``train[:50%]`` -> ("train", (0, 50), 1); ``test[50%:]/10`` -> ("test", (50, 100), 10):
    the slice of each of 10 equal blocks of records. A plain name selects everything."""
    if "[" not in split and "/" not in split:
        return split, (0.0, 100.0), 1
    match = _SLICE.match(split.replace(" ", ""))
    if not match:
        raise QuantkitError(
            f"cannot read split '{split}'",
            "write a percentage slice like train[:50%] or test[50%:], optionally taken in each "
            "of N equal blocks of the records: test[50%:]/10",
        )
    lo = float(match["lo"][:-1]) if match["lo"] else 0.0
    hi = float(match["hi"][:-1]) if match["hi"] else 100.0
    if not 0 <= lo < hi <= 100:
        raise QuantkitError(f"empty or invalid slice in split '{split}'",
                            "the start must be below the end, both within 0%..100%")
    blocks = int(match["blocks"]) if match["blocks"] else 1
    if blocks < 1:
        raise QuantkitError(f"the blocks of split '{split}' must be at least 1")
    return match["split"], (lo, hi), blocks


def resolve_text_source(
    dataset: str, config: str | None = None, split: str = "train", column: str = "text"
) -> TextSource:
    """Interpret ``--dataset``: ``sample``, a local file or folder, or a Hub dataset id."""
    split, part, blocks = parse_split(split)
    if dataset == "sample":
        try:
            path = SAMPLE_DIR / SAMPLE_FILES[split]
        except KeyError:
            raise QuantkitError(
                f"the bundled sample has no split '{split}'",
                f"use one of: {', '.join(sorted(SAMPLE_FILES))}",
            ) from None
        return TextSource("local", str(path), split=split, column=column, part=part,
                          blocks=blocks)
    path = Path(dataset).expanduser()
    if path.exists():
        files = local_files(path)
        if not files:
            raise QuantkitError(
                f"{path} holds no text files", f"supported: {', '.join(LOCAL_SUFFIXES)}"
            )
        return TextSource("local", str(path.resolve()), split=split, column=column, part=part,
                          blocks=blocks)
    if dataset.startswith((".", "/", "~")) or dataset.endswith(LOCAL_SUFFIXES):
        raise QuantkitError(f"dataset file {path} not found")
    if part != (0.0, 100.0) or blocks != 1:
        raise QuantkitError(
            f"split slices such as '{split}[...]' apply to local text only",
            "streamed Hub datasets are read whole; choose another split or a local file",
        )
    return TextSource("hub", dataset, config or HUB_DEFAULT_CONFIGS.get(dataset), split, column)


def local_files(path: Path) -> list[Path]:
    if path.is_file():
        if path.suffix not in LOCAL_SUFFIXES:
            raise QuantkitError(
                f"unsupported text file {path}", f"supported: {', '.join(LOCAL_SUFFIXES)}"
            )
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in LOCAL_SUFFIXES)


@dataclass(frozen=True)
class RecordRange:
    """Records ``first .. stop-1`` of the ``total`` records of a source's files, counted over all
    its files in order (lines of text files, rows of JSONL/Parquet). A part taken in blocks
    (``test[50%:]/10``) selects several ``spans`` (``[first, stop)`` each) between those two."""

    first: int
    stop: int
    total: int
    spans: tuple[tuple[int, int], ...] = ()  # empty: the one span (first, stop)

    @classmethod
    def of_spans(cls, spans: list[tuple[int, int]], total: int) -> RecordRange:
        spans = [s for s in spans if s[0] < s[1]]
        if not spans:
            return cls(0, 0, total)
        if len(spans) == 1:
            return cls(spans[0][0], spans[0][1], total)
        return cls(spans[0][0], spans[-1][1], total, tuple(spans))

    @property
    def parts(self) -> tuple[tuple[int, int], ...]:
        return self.spans or ((self.first, self.stop),)

    @property
    def count(self) -> int:
        return sum(stop - first for first, stop in self.parts)

    def __contains__(self, index: int) -> bool:
        return any(first <= index < stop for first, stop in self.parts)

    def describe(self) -> dict[str, Any]:
        described: dict[str, Any] = {"first": self.first, "last": self.stop - 1,
                                     "count": self.count, "total": self.total}
        if self.spans:
            described["spans"] = [[first, stop - 1] for first, stop in self.spans]
        return described

    def text(self) -> str:
        """``records 0-1155`` or ``records 0-115, 289-404, ..., 2601-2716 (10 spans, 1,160)``."""
        if not self.spans:
            return f"records {self.first}-{self.stop - 1}"
        shown = [f"{a}-{b - 1}" for a, b in self.spans]
        if len(shown) > 4:
            shown = [*shown[:3], "...", shown[-1]]
        return f"records {', '.join(shown)} ({len(self.spans)} spans, {self.count:,})"

    def intersects(self, other: RecordRange) -> bool:
        return any(a < d and c < b for a, b in self.parts for c, d in other.parts)


def record_range(source: TextSource) -> RecordRange:
    """Which records a local source's ``part`` selects: the one place a slice becomes indices."""
    if source.kind != "local":
        raise QuantkitError(f"record ranges exist for local text only, not '{source.name}'")
    total = sum(1 for path in local_files(Path(source.name))
                for _ in _iter_records(path, source.column))
    spans = []
    for block in range(source.blocks):
        begin, end = total * block // source.blocks, total * (block + 1) // source.blocks
        lo, hi = (begin + int((end - begin) * p / 100) for p in source.part)
        spans.append((lo, hi))
    return RecordRange.of_spans(spans, total)


class TextRead:
    """What one pass over a source actually read: the record range (local text), the number of
    records and characters, and the sha256 of the text, for manifests."""

    def __init__(self, source: TextSource) -> None:
        import hashlib

        self.source = source
        self.range: RecordRange | None = None
        self.num_records = 0
        self.num_chars = 0
        self._hash = hashlib.sha256()

    def add(self, text: str) -> None:
        self.num_records += 1
        self.num_chars += len(text)
        self._hash.update(text.encode("utf-8"))

    def describe(self) -> dict[str, Any]:
        return {"records": self.range.describe() if self.range else None,
                "num_records": self.num_records, "num_chars": self.num_chars,
                "text_sha256": self._hash.hexdigest()}


def iter_records(source: TextSource, read: TextRead | None = None
                 ) -> Iterator[tuple[Path | None, str]]:
    """``(file, record)`` for every record the source selects, in a fixed order. Every reader of
    text (calibration blocks, evaluation text, tuning windows) goes through here, so a ``part``
    slice applies the same way everywhere. ``read`` is filled with what was read."""
    if source.kind == "hub":
        for text in _iter_hub(source):
            if read is not None:
                read.add(text)
            yield None, text
        return
    selected = record_range(source)
    if read is not None:
        read.range = selected
    index = 0
    for path in local_files(Path(source.name)):
        for record in _iter_records(path, source.column):
            if index in selected:
                if read is not None:
                    read.add(record)
                yield path, record
            index += 1
            if index >= selected.stop:
                return


def iter_texts(source: TextSource, read: TextRead | None = None) -> Iterator[str]:
    """The selected text as pieces for tokenizing: lines of a text file joined into chunks of
    about CHUNK_CHARS (cut at line ends, never across files), one piece per JSONL/Parquet row or
    Hub row."""
    buf: list[str] = []
    size = 0
    current: Path | None = None
    for path, record in iter_records(source, read):
        if buf and (path != current or size >= CHUNK_CHARS):
            yield "".join(buf)
            buf, size = [], 0
        if path is None or path.suffix not in (".txt", ".raw"):
            yield record
            continue
        current = path
        buf.append(record)
        size += len(record)
    if buf:
        yield "".join(buf)


def _iter_records(path: Path, column: str) -> Iterator[str]:
    """Records of a file: lines of plain text (universal newlines: CRLF -> LF), rows of JSONL /
    Parquet (with one "\\n" appended each)."""
    if path.suffix in (".txt", ".raw"):
        with open(path, encoding="utf-8", errors="replace", newline=None) as fh:
            yield from fh
    elif path.suffix == ".jsonl":
        yield from _iter_jsonl(path, column)
    else:
        yield from _iter_parquet(path, column)


def _iter_jsonl(path: Path, column: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise QuantkitError(f"{path}:{lineno} is not valid JSON: {exc}") from None
            if column not in record:
                raise QuantkitError(
                    f"{path}:{lineno} has no column '{column}'",
                    f"columns there: {', '.join(record)}; pass --text-column",
                )
            yield str(record[column]) + "\n"


def _iter_parquet(path: Path, column: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    if column not in names:
        raise QuantkitError(
            f"{path} has no column '{column}'", f"columns: {', '.join(names)}; pass --text-column"
        )
    for batch in pf.iter_batches(columns=[column], batch_size=1024):
        for value in batch.column(0).to_pylist():
            if value is not None:
                yield str(value) + "\n"


def hub_reachable(timeout: float = 3.0) -> bool:
    """A quick connection test, so an offline machine fails in seconds instead of retrying."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host or "huggingface.co", 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def _hub_error(source: TextSource) -> QuantkitError:
    return QuantkitError(
        f"cannot reach the Hugging Face Hub to read dataset '{source.name}'",
        "connect to the Hub (the dataset is downloaded once and cached), or pass a local "
        ".txt/.raw/.jsonl/.parquet file or folder, or --dataset sample (bundled, offline)",
    )


def _iter_hub(source: TextSource) -> Iterator[str]:
    if not hub_reachable():
        raise _hub_error(source)
    import datasets

    try:
        configs = datasets.get_dataset_config_names(source.name)
    except Exception as exc:  # the Hub client raises many types for "no such dataset"
        raise QuantkitError(f"unknown dataset '{source.name}': {exc}") from None
    if source.config not in configs and not (source.config is None and len(configs) <= 1):
        raise QuantkitError(
            f"dataset '{source.name}' has no config '{source.config}'",
            f"configs: {', '.join(configs)}",
        )
    splits = datasets.get_dataset_split_names(source.name, source.config)
    if source.split not in splits:
        raise QuantkitError(
            f"dataset '{source.name}' ({source.config}) has no split '{source.split}'",
            f"splits: {', '.join(splits)}",
        )
    ds = datasets.load_dataset(source.name, source.config, split=source.split, streaming=True)
    columns = list(ds.features or {})
    if columns and source.column not in columns:
        raise QuantkitError(
            f"dataset '{source.name}' has no column '{source.column}'",
            f"columns: {', '.join(columns)}; pass --text-column",
        )
    for record in ds:
        text = record[source.column]
        if text:
            yield str(text)


def iter_token_chunks(source: TextSource, tokenizer: Any, read: TextRead | None = None
                      ) -> Iterator[list[int]]:
    """Token ids of the source, piece by piece, without special tokens."""
    for text in iter_texts(source, read):
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        if ids:
            yield list(ids)


@dataclass
class TokenBlocks:
    """``num_samples`` blocks of ``seq_len`` tokens, batched to ``batch_size``.

    The blocks are chosen once (seeded reservoir sampling over the stream of all blocks) and kept,
    so iterating twice yields identical batches. Each batch is ``{"input_ids", "attention_mask"}``
    of int64 arrays shaped [batch, seq_len]; the last batch may be smaller.
    """

    source: TextSource
    tokenizer: Any = field(repr=False)
    seq_len: int = 512
    num_samples: int = 512
    batch_size: int = 8
    seed: int = 0
    _blocks: np.ndarray | None = field(default=None, init=False, repr=False)
    total_tokens: int = field(default=0, init=False)
    total_blocks: int = field(default=0, init=False)
    _read: TextRead | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("seq_len", "num_samples", "batch_size"):
            if getattr(self, name) < 1:
                raise QuantkitError(f"{name.replace('_', '-')} must be at least 1")
        from quantkit.models import check_tokenizer

        check_tokenizer(self.tokenizer)  # an empty tokenizer would yield no blocks at all

    @property
    def blocks(self) -> np.ndarray:
        if self._blocks is None:
            self._blocks = self._select_blocks()
        return self._blocks

    def _select_blocks(self) -> np.ndarray:
        rng = random.Random(self.seed)
        reservoir: list[np.ndarray] = []
        pending: list[int] = []
        seen = 0
        self._read = TextRead(self.source)
        for ids in iter_token_chunks(self.source, self.tokenizer, self._read):
            self.total_tokens += len(ids)
            pending.extend(ids)
            while len(pending) >= self.seq_len:
                block = np.asarray(pending[: self.seq_len], dtype=np.int64)
                del pending[: self.seq_len]
                if seen < self.num_samples:
                    reservoir.append(block)
                else:
                    j = rng.randint(0, seen)
                    if j < self.num_samples:
                        reservoir[j] = block
                seen += 1
        self.total_blocks = seen
        if seen == 0:
            raise QuantkitError(
                f"the text is shorter than one block: {self.total_tokens} tokens, "
                f"seq-len is {self.seq_len}",
                "use more text or a smaller --seq-len",
            )
        if seen < self.num_samples:
            raise QuantkitError(
                f"the text has {self.total_tokens} tokens, {seen} blocks of {self.seq_len}; "
                f"{self.num_samples} were asked for",
                f"lower --num-samples to {seen} or less, lower --seq-len, or use more text",
            )
        return np.stack(reservoir)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        blocks = self.blocks
        for start in range(0, len(blocks), self.batch_size):
            ids = blocks[start : start + self.batch_size]
            yield {"input_ids": ids, "attention_mask": np.ones_like(ids)}

    def __len__(self) -> int:
        return -(-self.num_samples // self.batch_size)

    @property
    def num_tokens(self) -> int:
        return self.num_samples * self.seq_len

    def describe(self) -> dict[str, Any]:
        """What the blocks are, for sidecars and summaries (forces the selection)."""
        blocks = self.blocks
        return {
            "source": self.source.describe(),
            "seq_len": self.seq_len,
            "num_samples": self.num_samples,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "num_batches": len(self),
            "num_tokens": self.num_tokens,
            "source_tokens": self.total_tokens,
            "source_blocks": self.total_blocks,
            "read": self._read.describe() if self._read else None,
            "blocks_sha256": _array_hash(blocks),
        }


def _array_hash(array: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()
