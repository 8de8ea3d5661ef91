"""The evaluation text: the documents of a text source, joined the way the perplexity guide does.

* Hugging Face datasets: each non-empty row of the text column is a document (``data.iter_texts``
  skips empty rows, so for ``wikitext`` the joined text has fewer blank lines than the guide's
  ``"\\n\\n".join(test["text"])``, which keeps them).
* Local ``.txt`` / ``.raw`` files: each file is one document, read whole with universal newlines
  (CRLF and CR become LF). ``wiki.test.raw`` is therefore its own text with LF line ends.
* Local ``.jsonl`` / ``.parquet``: each record's text column is a document.
* Folders: their files in sorted order, as above.

Documents are joined with ``"\\n\\n"`` and the result is tokenized once (``tokenize_text``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantkit.data import TextSource, iter_texts, local_files
from quantkit.errors import QuantkitError
from quantkit.eval.perplexity import DOCUMENT_SEPARATOR, join_documents


@dataclass(frozen=True)
class EvaluationText:
    text: str
    num_documents: int
    source: TextSource

    def describe(self) -> dict[str, Any]:
        return {**self.source.describe(), "num_documents": self.num_documents,
                "num_chars": len(self.text), "joined_with": DOCUMENT_SEPARATOR}


def source_documents(source: TextSource) -> list[str]:
    """The documents of ``source`` in a fixed order (see the module docstring)."""
    if source.kind != "local":
        return [text for text in iter_texts(source) if text]
    documents: list[str] = []
    for path in local_files(Path(source.name)):
        single = TextSource("local", str(path), split=source.split, column=source.column)
        pieces = list(iter_texts(single))
        if path.suffix in (".txt", ".raw"):
            documents.append("".join(pieces))
        else:  # records come with one "\n" appended each
            documents.extend(p[:-1] if p.endswith("\n") else p for p in pieces)
    return documents


def load_evaluation_text(source: TextSource) -> EvaluationText:
    documents = [d for d in source_documents(source) if d.strip()]
    if not documents:
        raise QuantkitError(
            f"the evaluation text from {source.name} is empty",
            "check --dataset, --split and --text-column",
        )
    return EvaluationText(join_documents(documents), len(documents), source)
