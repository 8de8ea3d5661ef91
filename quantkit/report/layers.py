"""Per-layer precision map: which transformer block and which linear op runs in which precision.

Input is an engine's PrecisionPlan as stored in its manifest (``inputs.plan``). Node names follow
the export's module-path naming, e.g. ``/model/layers.3/self_attn/q_proj/MatMul``: the first path
part of the form ``<name>.<index>`` is the block, and what follows it names the op within the block.
Linear ops outside every block (``/lm_head/MatMul``) form a last row.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

LINEAR_OPS = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose", "Einsum"})
OUTSIDE_BLOCKS = "other"
_BLOCK = re.compile(r"^[A-Za-z_][\w]*\.(\d+)$")
_MODULE_ALIASES = {"self_attn": "attn", "attention": "attn", "self_attention": "attn"}


def split_node(node: str) -> tuple[int | None, str]:
    """``/model/layers.3/mlp/down_proj/MatMul`` -> ``(3, "mlp/down_proj/MatMul")``;
    ``/lm_head/MatMul`` -> ``(None, "lm_head/MatMul")``."""
    parts = [p for p in node.split("/") if p]
    for i, part in enumerate(parts):
        match = _BLOCK.match(part)
        if match and i + 1 < len(parts):
            return int(match.group(1)), "/".join(parts[i + 1:])
    return None, "/".join(parts)


def _column_name(path: str, op_type: str) -> str:
    """A short column name: the linear module (``q_proj`` -> ``q``), or ``<module> <op>`` for an op
    that sits directly in a module (the attention score and context matmuls)."""
    parts = path.split("/")
    last, modules = parts[-1], parts[:-1]
    if last == op_type and modules:
        leaf = modules[-1]
        return leaf[:-5] if leaf.endswith("_proj") and len(leaf) > 5 else leaf
    if modules:
        return f"{_MODULE_ALIASES.get(modules[-1], modules[-1])} {last}"
    return last


def _qualified_name(path: str, op_type: str) -> str:
    parts = path.split("/")
    if len(parts) >= 3 and parts[-1] == op_type:
        return f"{_MODULE_ALIASES.get(parts[-3], parts[-3])}.{_column_name(path, op_type)}"
    return path


def precision_map(plan: Mapping[str, Any]) -> dict[str, Any]:
    """Grid of block (rows) × linear op (columns) -> precision, plus counts of every op type.

    Columns keep the order of first appearance in the graph (q, k, v, ..., down for a Llama block).
    Two ops that would share a short name (GPT-2's ``c_proj`` in attention and in the MLP) are
    qualified by their parent module.
    """
    decisions = list(plan.get("decisions", []))
    cells: dict[tuple[str, str], str] = {}
    column_paths: dict[str, tuple[str, str]] = {}  # path within the block -> (op_type, row kind)
    rows: list[str] = []
    block_rows: set[int] = set()
    has_outside = False
    linear_counts: dict[str, int] = {}
    other_ops: dict[str, dict[str, int]] = {}
    for d in decisions:
        op, precision, node = str(d["op_type"]), str(d["precision"]), str(d["node"])
        if op not in LINEAR_OPS:
            per_op = other_ops.setdefault(op, {})
            per_op[precision] = per_op.get(precision, 0) + 1
            continue
        linear_counts[precision] = linear_counts.get(precision, 0) + 1
        block, path = split_node(node)
        column_paths.setdefault(path, (op, "block" if block is not None else "outside"))
        if block is None:
            has_outside = True
            row = OUTSIDE_BLOCKS
        else:
            block_rows.add(block)
            row = str(block)
        cells[(row, path)] = precision
    rows = [str(b) for b in sorted(block_rows)] + ([OUTSIDE_BLOCKS] if has_outside else [])
    # Block ops first (in graph order), then ops outside blocks, so lm_head is the last column.
    paths = [p for p, (_, kind) in column_paths.items() if kind == "block"]
    paths += [p for p, (_, kind) in column_paths.items() if kind == "outside"]
    short = {p: _column_name(p, column_paths[p][0]) for p in paths}
    names = list(short.values())
    columns = []
    for p in paths:
        name = short[p]
        if names.count(name) > 1:
            name = _qualified_name(p, column_paths[p][0])
            if [_qualified_name(q, column_paths[q][0]) for q in paths].count(name) > 1:
                name = p
        columns.append({"name": name, "path": p, "op_type": column_paths[p][0]})
    grid = [[cells.get((row, c["path"])) for c in columns] for row in rows]
    precisions = sorted(linear_counts)
    return {
        "rows": rows,
        "columns": columns,
        "grid": grid,
        "linear_counts": linear_counts,
        "uniform": precisions[0] if len(precisions) == 1 else None,
        "other_ops": {op: other_ops[op] for op in sorted(other_ops)},
        "default": plan.get("default"),
    }
