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
_SHORT_LINEAR = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "out_proj": "out",
                 "gate_proj": "gate", "up_proj": "up", "down_proj": "down"}


def split_node(node: str) -> tuple[int | None, str]:
    """``/model/layers.3/mlp/down_proj/MatMul`` -> ``(3, "mlp/down_proj/MatMul")``;
    ``/lm_head/MatMul`` -> ``(None, "lm_head/MatMul")``."""
    parts = [p for p in node.split("/") if p]
    for i, part in enumerate(parts):
        match = _BLOCK.match(part)
        if match and i + 1 < len(parts):
            return int(match.group(1)), "/".join(parts[i + 1:])
    return None, "/".join(parts)


def _column_name(path: str, op_type: str, in_block: bool) -> str:
    """A short column name: the linear module (``q_proj`` -> ``q``, ``lm_head``), or
    ``<module> <op>`` for an op that sits directly in a block's sub-module (the attention score and
    context matmuls: ``attn MatMul``, ``attn MatMul_1``)."""
    parts = path.split("/")
    last, modules = parts[-1], parts[:-1]
    if not modules:
        return last
    if in_block and len(modules) == 1:
        return f"{_MODULE_ALIASES.get(modules[0], modules[0])} {last}"
    leaf = _SHORT_LINEAR.get(modules[-1], modules[-1])
    return leaf if last == op_type else f"{leaf} {last}"


def _qualified_name(path: str, op_type: str, in_block: bool) -> str:
    parts = path.split("/")
    if len(parts) >= 3:
        parent = parts[-3]
        return f"{_MODULE_ALIASES.get(parent, parent)}.{_column_name(path, op_type, in_block)}"
    return path


def precision_map(plan: Mapping[str, Any]) -> dict[str, Any]:
    """Grid of block (rows) × linear op (columns) -> precision, plus counts of every op type.

    Columns keep the order of first appearance in the graph (q, k, v, ..., down for a Llama block).
    Two ops that would share a short name (GPT-2's ``c_proj`` in attention and in the MLP) are
    qualified by their parent module.
    """
    decisions = list(plan.get("decisions", []))
    cells: dict[tuple[str, bool, str], str] = {}  # (row, in a block, path) -> precision
    column_ops: dict[tuple[bool, str], str] = {}  # (in a block, path within it) -> op type
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
        in_block = block is not None
        column_ops.setdefault((in_block, path), op)
        if block is None:
            has_outside = True
            row = OUTSIDE_BLOCKS
        else:
            block_rows.add(block)
            row = str(block)
        cells[(row, in_block, path)] = precision
    rows = [str(b) for b in sorted(block_rows)] + ([OUTSIDE_BLOCKS] if has_outside else [])
    # Block ops first (in graph order), then ops outside blocks, so lm_head is the last column.
    keys = [k for k in column_ops if k[0]] + [k for k in column_ops if not k[0]]
    short = {k: _column_name(k[1], column_ops[k], k[0]) for k in keys}
    qualified = {k: _qualified_name(k[1], column_ops[k], k[0]) for k in keys}
    short_names, qualified_names = list(short.values()), list(qualified.values())
    columns = []
    for key in keys:
        name = short[key]
        if short_names.count(name) > 1:
            name = qualified[key] if qualified_names.count(qualified[key]) == 1 else key[1]
        columns.append({"name": name, "path": key[1], "op_type": column_ops[key],
                        "in_block": key[0]})
    grid = [[cells.get((row, in_block, path)) for in_block, path in keys] for row in rows]
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
