"""One look for every progress bar: rich, on stderr, bar + count + elapsed + remaining."""

from __future__ import annotations

from typing import Any


def progress_bar(label: str, unit: str) -> Any:
    """A ``rich.progress.Progress`` showing ``label``, a bar, done/total ``unit``, and times.

    ``label`` and ``unit`` are rich column templates, e.g. ``"[bold]{task.description}"`` or
    ``"batches  {task.fields[tokens_per_s]:,.0f} tokens/s"``. rich is imported only here.
    """
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn(label), BarColumn(), MofNCompleteColumn(), TextColumn(unit),
        TimeElapsedColumn(), TimeRemainingColumn(),
        console=Console(stderr=True), transient=False,
    )
