"""Carry a calibration table made on a plain export over to the KV-cache graph of the same model.

The two graphs name their MatMul/Gemm nodes alike (module paths), but some tensors between them
differ: the cache graph concatenates the past into K and V, so the attention output reshape and
the value input of P @ V are other nodes there, and the exporter numbers weight initializers
differently. A table is keyed by tensor name, so it is translated node by node: for each MatMul /
Gemm of the plain graph, the cache graph's node of the same name and op type gets the range of
the same input. The constant weights of each such pair must be equal (this is what proves the two
graphs are the same model: the table's own ``model_hash`` names the plain graph), and GPTQ weights
follow their node. A rotated or smoothed plain export pairs with the cache export transformed the
same way (``quantkit.cache_transform``), whose weights are then equal too. Ranges of other
tensors are dropped: only MatMul/Gemm inputs are quantized.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from quantkit.errors import QuantkitError

if TYPE_CHECKING:
    from quantkit.calib.table import CalibrationTable


def carry_table(table: CalibrationTable, plain_onnx: Path,
                cache_onnx: Path) -> CalibrationTable:
    """``table`` (calibrated on ``plain_onnx``) with its ranges renamed to ``cache_onnx``'s
    tensors and that graph's model hash; a QuantkitError when the graphs' weights differ."""
    import onnx
    from onnx import numpy_helper

    from quantkit.calib.gptq import weight_key
    from quantkit.export import onnx_model_hash
    from quantkit.graph_edit import constant_weight, range_source
    from quantkit.plan import QUANTIZABLE_OP_TYPES

    plain = onnx.load(str(plain_onnx))
    cache = onnx.load(str(cache_onnx))
    p_inits = {t.name: t for t in plain.graph.initializer}
    c_inits = {t.name: t for t in cache.graph.initializer}
    p_producers = {o: n for n in plain.graph.node for o in n.output}
    c_producers = {o: n for n in cache.graph.node for o in n.output}
    c_nodes = {n.name: n for n in cache.graph.node}
    amax: dict[str, float] = {}
    skipped: dict[str, str] = {}
    weights: dict[str, Any] = {}
    missing: list[str] = []
    pairs = 0
    for node in plain.graph.node:
        if node.op_type not in QUANTIZABLE_OP_TYPES:
            continue
        twin = c_nodes.get(node.name)
        if twin is None or twin.op_type != node.op_type or len(twin.input) != len(node.input):
            missing.append(node.name)
            continue
        pairs += 1
        for p_name, c_name in zip(node.input, twin.input, strict=True):
            p_weight = constant_weight(p_name, p_inits, p_producers)
            if p_weight is not None:
                c_weight = constant_weight(c_name, c_inits, c_producers)
                if c_weight is None or c_weight[1] != p_weight[1] or not np.array_equal(
                        numpy_helper.to_array(p_inits[p_weight[0]]),
                        numpy_helper.to_array(c_inits[c_weight[0]])):
                    raise QuantkitError(
                        f"the table's graph ({plain_onnx}) and the cache graph ({cache_onnx}) "
                        f"have different weights at {node.name}",
                        "calibrate a plain export of the same model, transformed as the "
                        "cache graph was: a rotated table needs the cache export rotated with "
                        "the same seed, a smoothed one the cache export smoothed from the same "
                        "graph (quantkit.cache_transform)")
                p_key, c_key = weight_key(*p_weight), weight_key(*c_weight)
                if table.weights and p_key in table.weights:
                    weights[c_key] = table.weights[p_key]
                continue
            key = range_source(p_name, table.amax, p_producers)
            if key is not None:
                amax[c_name] = float(table.amax[key])
            elif p_name in table.skipped and c_name not in amax:
                skipped[c_name] = table.skipped[p_name]
    if missing:
        raise QuantkitError(
            f"the cache graph has no node like {len(missing)} of the table graph's MatMul/Gemm "
            f"nodes (e.g. {missing[0]})",
            "the table belongs to another model or export; calibrate a plain export of this one")
    params = {**table.params, "carried_from": {
        "model_hash": table.model_hash, "onnx": str(plain_onnx), "node_pairs": pairs,
        "ranges": len(amax), "dropped": len(table.amax) - len(amax)}}
    return replace(table, params=params, amax=amax, skipped=skipped,
                   weights=weights or None, model_hash=onnx_model_hash(cache_onnx))


def table_for_cache_graph(table: CalibrationTable, onnx_path: Path,
                          table_onnx: Path | None) -> CalibrationTable:
    """The table to build the graph at ``onnx_path`` with: ``table`` itself unless the graph is a
    KV-cache export and the table was calibrated on another graph (``table_onnx``, the plain
    export it names), which is then carried over by ``carry_table``."""
    from quantkit.export import export_manifest, onnx_model_hash

    manifest = export_manifest(onnx_path) or {}
    own_hash = manifest.get("model_hash") or onnx_model_hash(onnx_path)
    if not manifest.get("cache") or table.model_hash in (None, own_hash):
        return table
    if table_onnx is None:
        raise QuantkitError(
            "the calibration table belongs to another graph, and where that graph is is unknown",
            "pass the table.json that 'quantkit calibrate' wrote (its manifest names the plain "
            "export it calibrated), or table_onnx= in Python")
    table_onnx = Path(table_onnx)
    if not table_onnx.is_file():
        raise QuantkitError(f"the table's graph {table_onnx} is gone",
                            "the cache graph borrows the table's names from it; recalibrate")
    if onnx_model_hash(table_onnx) != table.model_hash:
        raise QuantkitError(f"the calibration table was not made for {table_onnx} (hashes "
                            "differ)", "pass the export the table was calibrated on")
    return carry_table(table, table_onnx, onnx_path)
