"""A tiny document model and its two renderings, Markdown and self-contained HTML.

The report's content is built once as a list of blocks; ``to_markdown`` and ``to_html`` only decide
how each block looks, so the two files always say the same thing. In HTML, images are inline
base64 PNGs and the style sheet is inline: the file needs no network and opens from disk. In
Markdown, images are referenced by file name (they are written next to ``report.md``).
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Heading:
    level: int
    text: str
    anchor: str = ""


@dataclass(frozen=True)
class Para:
    text: str
    muted: bool = False


@dataclass(frozen=True)
class Bullets:
    items: Sequence[str]


@dataclass(frozen=True)
class Table:
    headers: Sequence[str]
    rows: Sequence[Sequence[str]]
    align: str = ""  # one character per column: l or r; missing columns default to l
    highlight: Sequence[bool] = field(default_factory=tuple)  # rows to emphasise


@dataclass(frozen=True)
class Image:
    name: str  # file name next to report.md
    alt: str
    png: bytes
    caption: str = ""


@dataclass(frozen=True)
class Code:
    text: str


Block = Heading | Para | Bullets | Table | Image | Code

_MD_SPECIAL = re.compile(r"([\\`*\[\]<>|])")
_MD_UNDERSCORE = re.compile(r"(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])")


def md_escape(text: str) -> str:
    """Escape what Markdown would read as markup. An underscore inside a word (``q_proj``) cannot
    start emphasis, so it stays as it is and names remain readable in the raw file."""
    return _MD_UNDERSCORE.sub(r"\\_", _MD_SPECIAL.sub(r"\\\1", text))


def to_markdown(blocks: Sequence[Block]) -> str:
    out: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            out.append(f"{'#' * block.level} {md_escape(block.text)}")
        elif isinstance(block, Para):
            out.append(f"*{md_escape(block.text)}*" if block.muted else md_escape(block.text))
        elif isinstance(block, Bullets):
            out.append("\n".join(f"- {md_escape(item)}" for item in block.items))
        elif isinstance(block, Table):
            out.append(_md_table(block))
        elif isinstance(block, Image):
            text = f"![{md_escape(block.alt)}]({block.name})"
            if block.caption:
                text += f"\n\n*{md_escape(block.caption)}*"
            out.append(text)
        elif isinstance(block, Code):
            fence = "````" if "```" in block.text else "```"
            out.append(f"{fence}\n{block.text.rstrip()}\n{fence}")
        else:  # pragma: no cover - the Block union is closed
            raise TypeError(type(block).__name__)
    return "\n\n".join(out) + "\n"


def _md_table(table: Table) -> str:
    def row(cells: Sequence[str], strong: bool = False) -> str:
        escaped = [md_escape(c) for c in cells]
        if strong and escaped and escaped[0]:
            escaped[0] = f"**{escaped[0]}**"
        return "| " + " | ".join(escaped) + " |"

    rule = "| " + " | ".join(
        "---:" if _align(table, i) == "r" else "---" for i in range(len(table.headers))
    ) + " |"
    lines = [row(table.headers), rule]
    for i, cells in enumerate(table.rows):
        lines.append(row(cells, strong=bool(table.highlight and table.highlight[i])))
    return "\n".join(lines)


def _align(table: Table, i: int) -> str:
    return table.align[i] if i < len(table.align) else "l"


_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", "DejaVu Sans", sans-serif;
       color: #1b1b1b; background: #ffffff; margin: 0; }
main { max-width: 1320px; margin: 0 auto; padding: 24px 28px 60px; }
h1 { font-size: 26px; margin: 0 0 6px; }
h2 { font-size: 20px; margin: 34px 0 10px; padding-bottom: 4px; border-bottom: 1px solid #ddd; }
h3 { font-size: 16px; margin: 22px 0 8px; }
p.muted { color: #5f6368; }
table { border-collapse: collapse; margin: 8px 0 14px; font-size: 13px; }
th, td { border: 1px solid #d6d6d6; padding: 4px 8px; vertical-align: top; }
th { background: #f3f4f6; text-align: left; }
td.r, th.r { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
th.r { white-space: normal; }  /* long headers ("speedup vs FP32") wrap; numbers never do */
tr.hl td { background: #eef6ee; font-weight: 600; }
.scroll { overflow-x: auto; max-width: 100%; }  /* a table wider than the page scrolls in place */
figure { margin: 10px 0 18px; }
figure img { max-width: 100%; height: auto; border: 1px solid #e3e3e3; }
figcaption { color: #5f6368; font-size: 12.5px; margin-top: 4px; }
pre { background: #f6f8fa; border: 1px solid #e1e4e8; padding: 10px 12px;
      white-space: pre-wrap; overflow-wrap: anywhere;
      font: 12.5px/1.4 ui-monospace, "DejaVu Sans Mono", monospace; }
"""


def to_html(blocks: Sequence[Block], title: str) -> str:
    body: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            anchor = f' id="{html.escape(block.anchor)}"' if block.anchor else ""
            body.append(f"<h{block.level}{anchor}>{html.escape(block.text)}</h{block.level}>")
        elif isinstance(block, Para):
            cls = ' class="muted"' if block.muted else ""
            body.append(f"<p{cls}>{html.escape(block.text)}</p>")
        elif isinstance(block, Bullets):
            items = "".join(f"<li>{html.escape(i)}</li>" for i in block.items)
            body.append(f"<ul>{items}</ul>")
        elif isinstance(block, Table):
            body.append(_html_table(block))
        elif isinstance(block, Image):
            data = base64.b64encode(block.png).decode("ascii")
            caption = (f"<figcaption>{html.escape(block.caption)}</figcaption>"
                       if block.caption else "")
            body.append(
                f'<figure><img src="data:image/png;base64,{data}" '
                f'alt="{html.escape(block.alt)}">{caption}</figure>'
            )
        elif isinstance(block, Code):
            body.append(f"<pre>{html.escape(block.text.rstrip())}</pre>")
        else:  # pragma: no cover - the Block union is closed
            raise TypeError(type(block).__name__)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n<main>\n"
        + "\n".join(body)
        + "\n</main>\n</body>\n</html>\n"
    )


def _html_table(table: Table) -> str:
    def cls(i: int) -> str:
        return ' class="r"' if _align(table, i) == "r" else ""

    head = "".join(f"<th{cls(i)}>{html.escape(h)}</th>" for i, h in enumerate(table.headers))
    rows = []
    for r, cells in enumerate(table.rows):
        hl = ' class="hl"' if table.highlight and table.highlight[r] else ""
        tds = "".join(f"<td{cls(i)}>{html.escape(c)}</td>" for i, c in enumerate(cells))
        rows.append(f"<tr{hl}>{tds}</tr>")
    return (f'<div class="scroll"><table><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table></div>")
