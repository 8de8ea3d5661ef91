"""The evaluation text: the documents of a text source, joined the way the perplexity guide does.

* Hugging Face datasets: each non-empty row of the text column is a document (``data.iter_records``
  skips empty rows, so for ``wikitext`` the joined text has fewer blank lines than the guide's
  ``"\\n\\n".join(test["text"])``, which keeps them).
* Local ``.txt`` / ``.raw`` files: the lines of each file that the source selects (all of them,
  or a ``--split`` slice such as ``test[50%:]``) are one document, read with universal newlines
  (CRLF and CR become LF). ``wiki.test.raw`` is therefore its own text with LF line ends.
* Local ``.jsonl`` / ``.parquet``: each record's text column is a document.
* Folders: their files in sorted order, as above.

Documents are joined with ``"\\n\\n"`` and the result is tokenized once (``tokenize_text``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantkit.data import TextRead, TextSource, iter_records
from quantkit.errors import QuantkitError
from quantkit.eval.perplexity import DOCUMENT_SEPARATOR, join_documents


@dataclass(frozen=True)
class EvaluationText:
    text: str
    num_documents: int
    source: TextSource
    read: dict[str, Any] | None = None  # TextRead.describe(): the records actually read

    def describe(self) -> dict[str, Any]:
        return {**self.source.describe(), "num_documents": self.num_documents,
                "num_chars": len(self.text), "joined_with": DOCUMENT_SEPARATOR,
                "read": self.read}


def source_documents(source: TextSource, read: TextRead | None = None) -> list[str]:
    """The documents of the records ``source`` selects, in a fixed order (module docstring)."""
    documents: list[str] = []
    current: Path | None = None
    for path, record in iter_records(source, read):
        if path is not None and path.suffix in (".txt", ".raw"):
            if path != current:  # the selected lines of one text file are one document
                documents.append("")
                current = path
            documents[-1] += record
        else:  # Hub rows as they are; JSONL/Parquet records come with one "\n" appended
            documents.append(record[:-1] if path is not None and record.endswith("\n")
                             else record)
            current = None
    return documents


def load_evaluation_text(source: TextSource) -> EvaluationText:
    read = TextRead(source)
    documents = [d for d in source_documents(source, read) if d.strip()]
    if not documents:
        raise QuantkitError(
            f"the evaluation text from {source.name} is empty",
            "check --dataset, --split and --text-column",
        )
    return EvaluationText(join_documents(documents), len(documents), source, read.describe())
