"""``quantkit plan show``: every node's precision and the rule that decided it."""

from __future__ import annotations

import fnmatch
import re
from collections import Counter
from pathlib import Path

import click


@click.group("plan")
def command() -> None:
    """Inspect precision plans (configs/*.yaml) against an ONNX graph."""


@command.command("show")
@click.option("--onnx", "onnx_path", required=True, type=click.Path(path_type=Path),
              help="FP32 export (directory or .onnx file).")
@click.option("--plan", "plan_path", type=click.Path(path_type=Path),
              help="Precision recipe (YAML); without it, --precision's uniform plan.")
@click.option("--precision", default=None,
              type=click.Choice(["fp32", "fp16", "int8", "mixed"], case_sensitive=False),
              help="Precision label (default: the plan's default, or int8 without a plan).")
@click.option("--node", "node_filter", default=None,
              help="Only nodes matching this glob, or re:REGEX.")
@click.option("--op-type", "op_types", multiple=True, help="Only these op types (repeatable).")
@click.option("--only", "only", multiple=True,
              type=click.Choice(["int8", "fp16", "fp32"], case_sensitive=False),
              help="Only nodes at these precisions (repeatable).")
@click.option("--rule", "rule_filter", default=None,
              help="Only nodes whose deciding rule contains this text (e.g. 'op_type:').")
@click.option("--linear", is_flag=True, help="Only MatMul/Gemm nodes.")
@click.option("--limit", type=int, default=None, help="Show at most this many rows.")
def show(onnx_path: Path, plan_path: Path | None, precision: str | None, node_filter: str | None,
         op_types: tuple[str, ...], only: tuple[str, ...], rule_filter: str | None,
         linear: bool, limit: int | None) -> None:
    """Print the plan as a table: node, op type, precision, rule."""
    from rich.console import Console
    from rich.table import Table

    from quantkit.build import plan_for
    from quantkit.export import find_onnx
    from quantkit.plan import QUANTIZABLE_OP_TYPES

    onnx_file = find_onnx(onnx_path)
    if precision is None:  # a plan file is shown as it is; without one, the int8 recipe
        precision = "mixed" if plan_path else "int8"
    plan = plan_for(onnx_file, precision.lower(), plan_path)
    rows = list(plan.decisions.values())
    if node_filter:
        if node_filter.startswith("re:"):
            pattern = re.compile(node_filter[3:])
            rows = [d for d in rows if pattern.search(d.node)]
        else:
            rows = [d for d in rows if fnmatch.fnmatchcase(d.node, node_filter)]
    if op_types:
        rows = [d for d in rows if d.op_type in set(op_types)]
    if linear:
        rows = [d for d in rows if d.op_type in QUANTIZABLE_OP_TYPES]
    if only:
        wanted = {p.lower() for p in only}
        rows = [d for d in rows if d.precision.value in wanted]
    if rule_filter:
        rows = [d for d in rows if rule_filter in d.rule]
    shown = rows[:limit] if limit is not None else rows
    table = Table(title=f"Precision plan for {onnx_file}"
                        + (f" from {plan_path}" if plan_path else f" ({precision})"))
    table.add_column("node", overflow="fold")
    table.add_column("op type")
    table.add_column("precision")
    table.add_column("rule", overflow="fold")
    styles = {"int8": "green", "fp16": "yellow", "fp32": "cyan"}
    for d in shown:
        p = d.precision.value
        table.add_row(d.node, d.op_type, f"[{styles[p]}]{p}[/]", d.rule)
    console = Console(width=max(Console().width, 140))
    console.print(table)
    counts = Counter(d.precision.value for d in rows)
    linear_counts = Counter(d.precision.value for d in rows if d.op_type in QUANTIZABLE_OP_TYPES)
    click.echo(f"{len(shown)} of {len(rows)} matching nodes shown ({len(plan.decisions)} in the "
               f"graph); " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
               + "; MatMul/Gemm: "
               + (", ".join(f"{k} {v}" for k, v in sorted(linear_counts.items())) or "none"))
