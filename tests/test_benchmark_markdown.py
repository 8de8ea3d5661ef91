"""benchmarks/markdown.py: the tables the Ray benchmarks print."""

from __future__ import annotations

from benchmarks.markdown import or_dash, print_table


def test_table_and_unmeasured_cells(capsys) -> None:
    print_table(["mode", "Ray start s"], [["serial", or_dash(None, ".1f")],
                                          ["ray-2", or_dash(3.14159, ".1f")]])
    assert capsys.readouterr().out.splitlines() == [
        "| mode | Ray start s |", "| --- | --- |", "| serial | — |", "| ray-2 | 3.1 |"]
