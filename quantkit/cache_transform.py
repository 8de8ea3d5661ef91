"""Rotation and SmoothQuant on a KV-cache export (``export --with-cache``): the weights the same
transform gives the plain export of the same model, checked against the source cache graph on
padded prefills and cached decode steps.

* **Rotation** needs no data and is deterministic: ``quantkit.rotation.rotate_export`` on the
  cache graph with the plain run's seed computes the same float64 products from the same weights
  (the two exports' weights are equal, ``quantkit.cache_tables``), so the rotated weights are
  equal bit for bit and a table calibrated on the rotated plain export carries over, GPTQ
  weights included. A rotated graph caches rotated values (V times a Hadamard per head), so only
  a graph rotated with the same seed may read a cache it wrote; ``generate`` always feeds an
  engine its own presents.
* **SmoothQuant** scales come from calibration activations of the plain graph. They are carried,
  not measured again (decode steps would see other activations and give other scales): every
  constant input the smoothing changed in the plain graph goes to the cache graph's node of the
  same name, after checking that node's original constant is the plain source's.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import numpy as np

from quantkit.errors import QuantkitError

CHECK_TOLERANCE = 1e-4  # max|dlogits| / max|logits|, the rule of export and rotation
CHECK_DECODE_STEPS = 3


def cache_check_feeds(layout: Any, vocab: int, seed: int = 0,
                      decode_steps: int = CHECK_DECODE_STEPS) -> dict[str, Any]:
    """The token feeds of ``check_cache_equivalent``: a right-padded prefill (past 0), a
    left-padded prefill and ``decode_steps`` single new tokens after it, drawn once so that two
    graphs read the same tokens."""
    from quantkit.export_cache import hf_positions

    rng = np.random.default_rng(seed)
    batch, seq, pad = 2, 12, 5
    ids = rng.integers(0, vocab, size=(batch, seq), dtype=np.int64)
    right = np.ones_like(ids)
    right[1, seq - pad:] = 0
    left = np.ones_like(ids)
    left[1, :pad] = 0
    return {"right": {"input_ids": ids, "attention_mask": right,
                      "position_ids": hf_positions(right), **layout.empty_past(batch)},
            "left": {"input_ids": ids, "attention_mask": left,
                     "position_ids": hf_positions(left), **layout.empty_past(batch)},
            "steps": [rng.integers(0, vocab, size=(batch, 1), dtype=np.int64)
                      for _ in range(decode_steps)],
            "batch": batch, "seq": seq, "padded_tokens": pad}


def run_cache_sequence(onnx_path: Path, layout: Any, feeds: dict[str, Any]) -> list[np.ndarray]:
    """Last-position logits of the rows whose last token is real: the right-padded prefill's
    first row, the left-padded prefill's rows, then each decode step's rows, the graph reading
    its own presents."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.add_session_config_entry("session.disable_prepacking", "1")  # no second weight copy
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    names = ["logits", *layout.present_names]
    right = session.run(names, feeds["right"])
    rows = feeds["right"]["attention_mask"][:, -1].astype(bool)
    logits = [right[0][:, -1][rows]]
    out = session.run(names, feeds["left"])
    logits.append(out[0][:, -1])
    mask, positions = feeds["left"]["attention_mask"], feeds["left"]["position_ids"]
    for step in feeds["steps"]:
        mask = np.concatenate([mask, np.ones((len(step), 1), dtype=mask.dtype)], axis=1)
        positions = positions[:, -1:] + 1
        past = dict(zip(layout.past_names, out[1:], strict=True))
        out = session.run(names, {"input_ids": step, "attention_mask": mask,
                                  "position_ids": positions, **past})
        logits.append(out[0][:, -1])
    del session
    gc.collect()
    return logits


def check_cache_equivalent(source: Path, derived: Path, seed: int = 0,
                           decode_steps: int = CHECK_DECODE_STEPS) -> dict[str, Any]:
    """max|dlogits| / max|logits| of the cache graph ``derived`` against ``source`` (its
    un-transformed export) over a right- and a left-padded prefill and ``decode_steps`` cached
    decode steps, each graph reading its own presents; one session at a time."""
    from quantkit.export import export_manifest
    from quantkit.export_cache import CacheLayout

    manifest = export_manifest(Path(source)) or {}
    if not manifest.get("cache"):
        raise QuantkitError(f"{source} is not a KV-cache export (its manifest has no cache)")
    layout = CacheLayout.from_dict(manifest["cache"])
    feeds = cache_check_feeds(layout, int(manifest.get("vocab_size") or 256), seed,
                              decode_steps)
    ref = run_cache_sequence(Path(source), layout, feeds)
    new = run_cache_sequence(Path(derived), layout, feeds)
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(ref, new, strict=True))
    scale = max(float(np.max(np.abs(a))) for a in ref)
    return {"batch": feeds["batch"], "seq": feeds["seq"], "padded_tokens": feeds["padded_tokens"],
            "padding": ["right", "left"], "decode_steps": decode_steps, "max_abs_diff": diff,
            "max_abs_logit": scale, "relative_error": diff / scale if scale > 0 else diff,
            "tolerance": CHECK_TOLERANCE, "against": "source_onnx"}


def verified_against(source: Path, what: str) -> Any:
    """A ``write_derived_export`` verifier: the written cache graph must compute ``source``'s
    function within CHECK_TOLERANCE, else nothing is written."""

    def verify(target: Path) -> dict[str, Any]:
        check = check_cache_equivalent(source, target)
        if not check["relative_error"] <= CHECK_TOLERANCE:
            raise QuantkitError(
                f"the {what} cache graph does not compute the source's function over prefill and "
                f"decode steps: max|dlogits|/max|logits| = {check['relative_error']:.2e} "
                f"(tolerance {CHECK_TOLERANCE:.0e})",
                "this model's cache graph is not supported by this transform; nothing was "
                "written")
        return check

    return verify


def _constant(name: str, inits: dict[str, Any], producers: dict[str, Any],
              base_dir: Path) -> np.ndarray | None:
    """A node input's value as the node reads it, if it is a constant (an initializer or a
    Transpose of one, like a tied LM head)."""
    from quantkit.graph_edit import constant_weight
    from quantkit.onnx_io import read_initializer

    found = constant_weight(name, inits, producers)
    if found is None:
        return None
    array = read_initializer(inits[found[0]], base_dir)
    return array if found[1] is None else np.transpose(array, found[1])


def carry_smoothing(cache: Any, plain: Any, smoothed: Any, dirs: tuple[Path, Path, Path]
                    ) -> dict[str, Any]:
    """Give ``cache`` (a ModelProto, changed in place) the constants ``smoothed`` has where
    ``plain`` (the graph it was smoothed from) had others, node by node by name; return counts.
    ``dirs``: where each model's external weights are (cache, plain, smoothed)."""
    from onnx import numpy_helper

    from quantkit.graph_edit import drop_unused, graph_index

    c_prod, _, c_inits = graph_index(cache.graph)
    p_prod, _, p_inits = graph_index(plain.graph)
    s_prod, _, s_inits = graph_index(smoothed.graph)
    c_nodes = {n.name: n for n in cache.graph.node}
    p_nodes = {n.name: n for n in plain.graph.node}
    carried: list[str] = []
    for node in smoothed.graph.node:
        source = p_nodes.get(node.name)
        if source is None or source.op_type != node.op_type \
                or len(source.input) != len(node.input):
            raise QuantkitError(f"the smoothed graph's node {node.name} is not in the graph it "
                                "was smoothed from", "smooth the plain export of this model")
        for i, name in enumerate(node.input):
            if name == source.input[i]:
                continue  # the smoothing left this input alone
            new = _constant(name, s_inits, s_prod, dirs[2])
            old = _constant(source.input[i], p_inits, p_prod, dirs[1])
            if new is None or old is None:
                raise QuantkitError(f"the smoothing changed a computed input of {node.name}",
                                    "only constant inputs can be carried to the cache graph")
            twin = c_nodes.get(node.name)
            if twin is None or twin.op_type != node.op_type or len(twin.input) <= i:
                raise QuantkitError(f"the cache graph has no node {node.name} to smooth",
                                    "export the cache graph of the same model")
            mine = _constant(twin.input[i], c_inits, c_prod, dirs[0])
            if mine is None or mine.shape != old.shape or not np.array_equal(mine, old):
                raise QuantkitError(
                    f"the cache graph's {node.name} reads other weights than the smoothed "
                    "graph's source", "export the cache graph of the same model")
            target = name if name not in c_inits else f"{name}.carried"
            tensor = numpy_helper.from_array(np.ascontiguousarray(new), target)
            cache.graph.initializer.append(tensor)
            c_inits[target] = cache.graph.initializer[-1]
            twin.input[i] = target
            carried.append(f"{node.name}:{i}")
    drop_unused(cache.graph)
    return {"constants": len(carried), "nodes": len({c.rsplit(":", 1)[0] for c in carried})}


def smooth_cache_export(cache_onnx: Path, plain_onnx: Path, smoothed_onnx: Path, out: Path, *,
                        force: bool = False) -> Path:
    """Write the cache export at ``cache_onnx`` smoothed as ``smoothed_onnx`` smoothed
    ``plain_onnx`` (the plain export of the same model); return the new ONNX path. Checked
    against the source cache graph before anything is written."""
    from quantkit.export import export_manifest, onnx_model_hash, write_derived_export
    from quantkit.onnx_io import load_model

    cache_onnx, plain_onnx, smoothed_onnx = Path(cache_onnx), Path(plain_onnx), Path(smoothed_onnx)
    cache = load_model(cache_onnx)
    plain = load_model(plain_onnx, with_weights=False)
    smoothed = load_model(smoothed_onnx, with_weights=False)
    summary = carry_smoothing(cache, plain, smoothed,
                              (cache_onnx.parent, plain_onnx.parent, smoothed_onnx.parent))
    recorded = (export_manifest(smoothed_onnx) or {}).get("smoothquant")
    return write_derived_export(
        cache, cache_onnx, out, exporter="quantkit.smoothquant", force=force,
        inputs={"smoothquant": {"carried_from": str(smoothed_onnx),
                                "carried_from_model_hash": onnx_model_hash(smoothed_onnx)}},
        verify=verified_against(cache_onnx, "smoothed"),
        smoothquant={**(recorded or {}), "carried": summary})


__all__ = ["CHECK_TOLERANCE", "carry_smoothing", "check_cache_equivalent",
           "smooth_cache_export", "verified_against"]
