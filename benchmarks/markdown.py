"""Markdown tables for what the benchmark scripts print (the README's tables are pasted from
them)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    print("| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


def or_dash(value: Any, spec: str) -> str:
    """``value`` formatted with ``spec``, or an em dash where it was not measured (None)."""
    return "—" if value is None else format(value, spec)
