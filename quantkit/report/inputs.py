"""Read results files (``quantkit.results/1``, written by ``quantkit eval``) and merge them.

Several results files can go into one report (e.g. a CPU run and a GPU run). Their perplexities are
only comparable when they scored the same text the same way, so merging refuses files whose dataset
settings differ (text hash, window length, stride).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantkit.artifacts import sha256_file
from quantkit.errors import QuantkitError

# Dataset fields that must agree for perplexities to be comparable.
COMPARABLE_DATASET_FIELDS = ("text_sha256", "max_length", "stride")

@dataclass(frozen=True)
class ResultsFile:
    """One results file as read from disk, checked against the schema."""

    path: Path
    sha256: str
    data: Mapping[str, Any]

    @property
    def engines(self) -> list[Mapping[str, Any]]:
        return list(self.data["engines"])

    @property
    def dataset(self) -> Mapping[str, Any]:
        return self.data["dataset"]

    @property
    def environment(self) -> Mapping[str, Any]:
        return self.data["environment"]

    @property
    def commands(self) -> list[str]:
        return [str(c) for c in self.data["commands"]]


def read_results(path: Path) -> ResultsFile:
    """Read one results file, checked by ``quantkit.eval.results.load_results`` (the schema's own
    reader); every problem is a QuantkitError naming the file and the offending key."""
    from quantkit.eval.results import load_results

    path = Path(path)
    if not path.is_file():
        raise QuantkitError(
            f"results file {path} does not exist", "pass a results.json written by 'quantkit eval'"
        )
    data = load_results(path).to_dict()
    return ResultsFile(path=path, sha256=sha256_file(path), data=data)


def check_comparable(files: Sequence[ResultsFile]) -> None:
    """Refuse to merge results whose perplexities were measured on different text or windows.

    The text (its hash), ``max_length`` and ``stride`` must agree; where two files used the same
    tokenizer, the evaluated tokens must agree too (this catches different ``--limit-tokens``).
    Different tokenizers (different models) are allowed: Δppl is computed within each model.
    """
    if len(files) < 2:
        return
    seen: dict[str, Path] = {}
    for f in files:
        if f.sha256 in seen:
            raise QuantkitError(f"{f.path} and {seen[f.sha256]} are the same results",
                                "pass each results file once")
        seen[f.sha256] = f.path
    first = files[0]
    for other in files[1:]:
        fields = list(COMPARABLE_DATASET_FIELDS)
        tokenizer = first.dataset.get("tokenizer_sha256")
        if tokenizer is not None and tokenizer == other.dataset.get("tokenizer_sha256"):
            fields.append("tokens_sha256")
        diffs = [
            f"{field}: {first.dataset.get(field)!r} in {first.path} but "
            f"{other.dataset.get(field)!r} in {other.path}"
            for field in fields
            if first.dataset.get(field) != other.dataset.get(field)
        ]
        if diffs:
            raise QuantkitError(
                "these results are not comparable: their perplexities were measured on different "
                "text or windows (" + "; ".join(diffs) + ")",
                "evaluate every engine with the same dataset, --max-length and --stride",
            )


def engine_labels(files: Sequence[ResultsFile]) -> list[list[str]]:
    """A unique display label per engine, file by file.

    Engines keep their own name unless another file has an engine of the same name; then each of
    those is qualified by its file (``fp32@gpu-run``), using the file's stem, or its parent folder
    when the stems are the same too, or its position on the command line as the last resort.
    """
    tags = _file_tags(files)
    counts: dict[str, int] = {}
    for f in files:
        for name in {str(e["name"]) for e in f.engines}:
            counts[name] = counts.get(name, 0) + 1
    labels: list[list[str]] = []
    for f, tag in zip(files, tags, strict=True):
        names = [str(e["name"]) for e in f.engines]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise QuantkitError(
                f"{f.path} lists the engine name(s) {', '.join(sorted(dupes))} more than once"
            )
        labels.append([f"{n}@{tag}" if counts[n] > 1 else n for n in names])
    return labels


def _file_tags(files: Sequence[ResultsFile]) -> list[str]:
    candidates = [
        [f.path.stem for f in files],
        [f"{f.path.parent.name}/{f.path.stem}" for f in files],
        [str(i + 1) for i in range(len(files))],
    ]
    for tags in candidates:
        if len(set(tags)) == len(tags):
            return tags
    return candidates[-1]


def resolve_engine_dir(path: str | None, results_path: Path) -> Path | None:
    """The engine directory a results entry points to, if it exists here.

    Relative paths are tried against the results file's folder first, then the working directory.
    """
    if not path:
        return None
    candidate = Path(path)
    options = [candidate] if candidate.is_absolute() else [results_path.parent / candidate,
                                                           candidate]
    for option in options:
        if option.is_dir():
            return option
    return None
