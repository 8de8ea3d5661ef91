"""Rotation (QuaRot, Ashkboos et al., 2024) as an ONNX rewrite of a Llama-family FP32 export.

A per-tensor INT8 scale is set by the largest value of a tensor; a few outlier channels make it
coarse for all the others. Multiplying an activation by an orthogonal matrix spreads each
outlier over all channels, and the function is unchanged when the next weights are multiplied
by the transpose. Three rotations, all exact in FP32:

* **Residual stream** (hidden size d), folded into weights at no runtime cost: RMSNorm is
  invariant under rotation (``||xQ|| = ||x||``) once its weight g is folded into the linears
  that read it, so the embedding becomes ``E Q``, every linear writing to the stream (o_proj,
  down_proj) ``W Q``, and every reader ``Q^T diag(g) W`` (q/k/v, gate/up, LM head; a tied LM
  head gets its own weight). The norms keep a weight of ones. Q is a seeded random orthogonal.
* **Values per attention head**, folded too: ``v_proj`` output columns of each head times a
  randomized Hadamard H, ``o_proj`` input rows of each head times H^T (attention is linear in V
  and every head uses the same H, so grouped-query heads need no bookkeeping).
* **down_proj input** (``act(gate) * up``), online: its outliers are per token, so no folding
  removes them. A block-diagonal Hadamard runs in the graph before down_proj, as a chain of
  small MatMuls: a Sylvester block of 8*8*8 = 512 channels is ``H8 (x) H8 (x) H8``, one 8 x 8
  MatMul per axis of the block seen as an 8 x 8 x 8 array (8 + 8 + 8 multiply-adds per channel,
  not 512); its random signs are folded into up_proj and H^T into down_proj. These
  nodes are named ``.../online_hadamard/...`` and stay FP32 in every plan: quantizing the
  tensor they exist to spread would undo them.

GPT-2's LayerNorm subtracts the mean, which does not commute with a rotation: it is refused.
The rotated graph is checked against the source on a random batch before anything is written,
and written as a new export directory (its own model hash), like a SmoothQuant export. A KV-cache
export rotates the same way, to the same weights (``quantkit.cache_transform``), and is checked
over padded prefills and cached decode steps.
"""

from __future__ import annotations

import contextlib
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from quantkit.errors import QuantkitError
from quantkit.export import export_manifest, write_derived_export
from quantkit.graph_edit import PASS_THROUGH, drop_unused, graph_index, selects_tokens
from quantkit.onnx_io import INLINE_BYTES, SpillFile, is_external, read_initializer
from quantkit.plan import ROTATION_SEGMENT

DEFAULT_DOWN_BLOCK = 512
MAX_FACTOR = 8  # the largest Hadamard factor of an online block (one MatMul per factor)
CHECK_TOLERANCE = 1e-4  # max|dlogits| / max|logits| of the rotated graph against the source
_RESIDUAL_STATS = ("Pow",)  # ops that read the residual stream only to compute its RMS


def sylvester_hadamard(n: int) -> np.ndarray:
    """The n x n Sylvester Hadamard matrix (entries +-1, H H^T = n I, symmetric); n a power of 2."""
    if n < 1 or n & (n - 1):
        raise QuantkitError(f"a Sylvester Hadamard matrix needs a power of 2, got {n}")
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def random_orthogonal(n: int, seed: int) -> np.ndarray:
    """A Haar-random n x n orthogonal matrix (QR of a seeded Gaussian, signs fixed), float64."""
    rng = np.random.default_rng(seed)
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.sign(np.diag(r))


def random_signs(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).choice([-1.0, 1.0], size=n)


def check_down_block(down_block: int) -> None:
    """The online block size must be 0 (no online rotation) or a power of 2 (a Hadamard)."""
    if down_block < 0 or down_block & (down_block - 1):
        raise QuantkitError(f"the down_proj rotation block must be 0 (off) or a power of 2, "
                            f"got {down_block}", "e.g. --down-block 512 (the default) or 64")


def online_factors(channels: int, limit: int) -> tuple[int, ...]:
    """The Hadamard factors of the online block: their product is the largest power of 2 that
    divides ``channels`` and is <= ``limit``; each is <= MAX_FACTOR, the smallest first (so
    ``(2, 8, 8)`` for a block of 128). Empty when no block of at least 2 fits."""
    block = 1
    while block * 2 <= limit and channels % (block * 2) == 0:
        block *= 2
    factors: list[int] = []
    while block > 1:
        factor = min(block, MAX_FACTOR)
        factors.insert(0, factor)
        block //= factor
    return tuple(factors)


@dataclass
class ResidualStream:
    """What reads and writes the residual stream of a Llama-family graph."""

    embedding: Any  # the Gather node of the token embedding
    norms: list[Any] = field(default_factory=list)  # the norms' weight Mul nodes, graph order
    writers: list[Any] = field(default_factory=list)  # MatMuls whose output is added to it


def trace_residual(graph: Any) -> ResidualStream:
    """Follow the stream from the token embedding through every residual Add; refuse any
    reader other than an RMSNorm or a residual Add, and any writer other than a linear."""
    producers, consumers, inits = graph_index(graph)
    if any(n.op_type == "LayerNormalization" for n in graph.node):
        raise QuantkitError(
            "rotation needs RMSNorm (Llama-family models); this graph uses LayerNormalization, "
            "which subtracts the mean and does not commute with a rotation",
            "use --smoothquant for GPT-2-style models instead",
        )
    inputs = {i.name for i in graph.input}
    embedding = next((n for n in graph.node if n.op_type == "Gather" and n.input[0] in inits
                      and len(inits[n.input[0]].dims) == 2 and n.input[1] in inputs), None)
    if embedding is None:
        raise QuantkitError("rotation found no token embedding (a Gather of a 2-D weight by "
                            "the graph's input ids)")
    stream = ResidualStream(embedding)
    frontier, seen = [embedding.output[0]], set()
    while frontier:
        tensor = frontier.pop()
        if tensor in seen:
            continue
        seen.add(tensor)
        for node in consumers.get(tensor, []):
            if node.op_type in _RESIDUAL_STATS:
                continue
            if node.op_type == "Mul" or (node.op_type == "Div" and node.input[0] == tensor):
                stream.norms.append(_norm_weight_mul(node, tensor, consumers, inits))
            elif node.op_type == "Add":
                other = next(i for i in node.input if i != tensor)
                writer = producers.get(other)
                if writer is None or writer.op_type != "MatMul" or writer.input[1] not in inits:
                    raise QuantkitError(f"rotation: the residual Add {node.name} adds something "
                                        "that is not a linear layer's output")
                stream.writers.append(writer)
                frontier.append(node.output[0])
            else:
                raise QuantkitError(
                    f"rotation: {node.name} ({node.op_type}) reads the residual stream; only "
                    "RMSNorms and residual Adds may",
                    "this model's architecture is not supported by --rotate",
                )
    order = {n.name: i for i, n in enumerate(graph.node)}
    stream.norms.sort(key=lambda n: order[n.name])
    return stream


def _norm_weight_mul(mul: Any, tensor: str, consumers: dict[str, list[Any]],
                     inits: dict[str, Any]) -> Any:
    """``x * rsqrt(mean(x^2) + eps)`` (or ``x / sqrt(...)``, ``quantkit.rms_norm``) is followed
    by a Mul with the norm's 1-D weight."""
    readers = consumers.get(mul.output[0], [])
    weight = [n for n in readers if n.op_type == "Mul"
              and any(i in inits and len(inits[i].dims) == 1 for i in n.input)]
    if len(readers) != 1 or len(weight) != 1:
        raise QuantkitError(f"rotation: {mul.name} reads the residual stream but is not an "
                            "RMSNorm followed by its weight")
    return weight[0]


class _Rewriter:
    """Initializer edits with fresh names (weights the exporter shared stay intact)."""

    def __init__(self, model: Any, base_dir: Path | None = None,
                 spill: SpillFile | None = None) -> None:
        self.graph = model.graph
        self.base_dir = base_dir or Path(".")  # where external weights are read from
        self.spill = spill  # where new weights go (None: into the graph)
        self.producers, self.consumers, self.inits = graph_index(self.graph)
        self.nodes = {n.name: n for n in self.graph.node}
        self.counter = 0

    def array(self, name: str) -> np.ndarray:
        """An initializer in float64, read from the external-data file when it is there."""
        return read_initializer(self.inits[name], self.base_dir).astype(np.float64)

    def add(self, array: np.ndarray, base: str, dtype: Any = np.float32) -> str:
        from onnx import numpy_helper

        self.counter += 1
        name = f"{base.split('.rotated_')[0]}.rotated_{self.counter}"
        values = np.asarray(array).astype(dtype)
        tensor = (self.spill.tensor(values, name)
                  if self.spill is not None and values.nbytes >= INLINE_BYTES
                  else numpy_helper.from_array(values, name))  # shapes stay readable inline
        self.graph.initializer.append(tensor)
        tensor = self.graph.initializer[-1]
        self.inits[name] = tensor
        return name

    def linear_weight(self, node: Any) -> tuple[np.ndarray, str]:
        """A MatMul's weight as ``[in, out]`` (a tied LM head reads Transpose(E))."""
        name = node.input[1]
        if name in self.inits:
            return self.array(name), name
        producer = self.producers.get(name)
        if producer is not None and producer.op_type == "Transpose" \
                and producer.input[0] in self.inits:
            return self.array(producer.input[0]).T, producer.input[0]
        raise QuantkitError(f"rotation: {node.name} has no constant weight")

    def set_weight(self, node: Any, weight: np.ndarray, base: str) -> None:
        node.input[1] = self.add(weight, base)


def _readers(rw: _Rewriter, norm: Any) -> list[Any]:
    """The linears reading a norm's output (through reshapes, and the cache graph's slice of
    the last position)."""
    found, stack = [], [norm.output[0]]
    while stack:
        tensor = stack.pop()
        for node in rw.consumers.get(tensor, []):
            if (node.op_type in PASS_THROUGH and node.input[0] == tensor) \
                    or selects_tokens(node, tensor, rw.inits):
                stack.extend(node.output)
            elif node.op_type == "MatMul" and node.input[0] == tensor:
                found.append(node)
            else:
                raise QuantkitError(f"rotation: {node.name} ({node.op_type}) reads the output "
                                    f"of {norm.name}; only linear layers may")
    return found


def _rotate_residual(rw: _Rewriter, stream: ResidualStream, q: np.ndarray) -> dict[str, int]:
    emb = stream.embedding
    table = rw.array(emb.input[0])
    emb.input[0] = rw.add(table @ q, emb.input[0])
    readers = 0
    for norm in stream.norms:
        position = next(i for i, name in enumerate(norm.input)
                        if name in rw.inits and len(rw.inits[name].dims) == 1)
        gain = rw.array(norm.input[position])
        norm.input[position] = rw.add(np.ones_like(gain), norm.input[position])
        for linear in _readers(rw, norm):
            weight, base = rw.linear_weight(linear)
            rw.set_weight(linear, q.T @ (gain[:, None] * weight), base)
            readers += 1
    for writer in stream.writers:
        weight, base = rw.linear_weight(writer)
        rw.set_weight(writer, weight @ q, base)
    return {"norms": len(stream.norms), "readers": readers, "writers": len(stream.writers)}


def _head_dim(rw: _Rewriter, v_proj: Any) -> int | None:
    """The head size from the Reshape after v_proj: its target shape ends in the head size."""

    for node in rw.consumers.get(v_proj.output[0], []):
        if node.op_type != "Reshape":
            continue
        shape = node.input[1]
        if shape in rw.inits:
            return int(read_initializer(rw.inits[shape], rw.base_dir)[-1])
        concat = rw.producers.get(shape)
        if concat is not None and concat.op_type == "Concat" and concat.input[-1] in rw.inits:
            return int(read_initializer(rw.inits[concat.input[-1]], rw.base_dir).reshape(-1)[-1])
    return None


def _rotate_heads(rw: _Rewriter, seed: int) -> dict[str, Any]:
    """v_proj output columns per head times H, o_proj input rows per head times H^T."""
    pairs = []
    for node in rw.graph.node:
        if node.op_type == "MatMul" and node.name.endswith("/v_proj/MatMul"):
            o_proj = rw.nodes.get(node.name.replace("/v_proj/MatMul", "/o_proj/MatMul"))
            if o_proj is not None:
                pairs.append((node, o_proj))
    if not pairs:
        return {"layers": 0, "head_dim": None, "skipped": "no v_proj / o_proj pairs"}
    head_dim = _head_dim(rw, pairs[0][0])
    if head_dim is None or head_dim & (head_dim - 1):
        return {"layers": 0, "head_dim": head_dim,
                "skipped": "head size unknown or not a power of 2"}
    h = sylvester_hadamard(head_dim) * random_signs(head_dim, seed)[None, :] / np.sqrt(head_dim)
    for v_proj, o_proj in pairs:
        wv, v_base = rw.linear_weight(v_proj)
        wo, o_base = rw.linear_weight(o_proj)
        if wv.shape[1] % head_dim or wo.shape[0] % head_dim:
            raise QuantkitError(f"rotation: {v_proj.name} / {o_proj.name} widths are not "
                                f"multiples of the head size {head_dim}")
        wv = (wv.reshape(wv.shape[0], -1, head_dim) @ h).reshape(wv.shape)
        wo = np.einsum("ji,hjo->hio", h, wo.reshape(-1, head_dim, wo.shape[1])).reshape(wo.shape)
        rw.set_weight(v_proj, wv, v_base)
        rw.set_weight(o_proj, wo, o_base)
    return {"layers": len(pairs), "head_dim": head_dim}


def _hadamard_chain(rw: _Rewriter, source: str, channels: int, factors: tuple[int, ...],
                    prefix: str) -> tuple[list[Any], str]:
    """Nodes computing ``x @ kron(H_1, ..., H_m)`` per block of ``prod(factors)`` channels of
    the last axis of ``source`` (rank 3). The block is viewed as an array with one axis per
    factor; the last axis is ``X @ H_m``, an inner axis k is ``H_k^T @ X`` on the view
    ``(..., factor_k, channels after it)``. Returns the nodes and the output name."""
    from onnx import helper

    nodes: list[Any] = []
    current = source
    after = 1  # channels of the block after the current axis

    def node(op: str, inputs: list[str]) -> str:
        count = sum(n.op_type == op for n in nodes)  # exporter style: MatMul, MatMul_1, ...
        name = f"{prefix}/{op}_{count}" if count else f"{prefix}/{op}"
        output = f"{name}_output_0"
        nodes.append(helper.make_node(op, inputs, [output], name=name))
        return output

    for position, factor in enumerate(reversed(factors)):
        h = sylvester_hadamard(factor) / np.sqrt(factor)  # symmetric: H^T == H
        shape = rw.add(np.array([0, -1, factor, after] if position else [0, -1, factor]),
                       f"{prefix}/shape", np.int64)
        view = node("Reshape", [current, shape])
        matrix = rw.add(h, f"{prefix}/H{factor}")
        current = node("MatMul", [view, matrix] if position == 0 else [matrix, view])
        after *= factor
    merge = rw.add(np.array([0, -1, channels]), f"{prefix}/shape", np.int64)
    return nodes, node("Reshape", [current, merge])


def _rotate_down_inputs(rw: _Rewriter, limit: int, seed: int) -> dict[str, Any]:
    """Insert a block Hadamard (``_hadamard_chain``) before every down_proj fed by
    ``act(gate) * up``."""
    from functools import reduce

    done: list[str] = []
    used: tuple[int, ...] = ()
    for down in [n for n in rw.graph.node if n.op_type == "MatMul"
                 and n.name.endswith("/down_proj/MatMul")]:
        mul = rw.producers.get(down.input[0])
        up = None
        if mul is not None and mul.op_type == "Mul":
            up = next((rw.producers[i] for i in mul.input if i in rw.producers
                       and rw.producers[i].name.endswith("/up_proj/MatMul")), None)
        if up is None:
            continue
        w_down, down_base = rw.linear_weight(down)
        channels = w_down.shape[0]
        factors = online_factors(channels, limit)
        if not factors:
            continue
        used = factors
        signs = random_signs(channels, seed + len(done))
        kron = reduce(np.kron, [sylvester_hadamard(f) / np.sqrt(f) for f in factors])
        w_up, up_base = rw.linear_weight(up)
        rw.set_weight(up, w_up * signs[None, :], up_base)
        size = kron.shape[0]
        rows = (signs[:, None] * w_down).reshape(-1, size, w_down.shape[1])
        rw.set_weight(down, np.einsum("ji,bjo->bio", kron, rows).reshape(w_down.shape),
                      down_base)
        prefix = down.name[: -len("/down_proj/MatMul")] + f"/{ROTATION_SEGMENT}"
        new, output = _hadamard_chain(rw, down.input[0], channels, factors, prefix)
        position = list(rw.graph.node).index(down)
        for offset, node in enumerate(new):
            rw.graph.node.insert(position + offset, node)
        down.input[0] = output
        done.append(down.name)
    return {"layers": len(done), "block": int(np.prod(used)) if used else 0,
            "factors": list(used)}


def rotate_model(model: Any, *, seed: int = 0, down_block: int = DEFAULT_DOWN_BLOCK,
                 base_dir: Path | None = None, spill: SpillFile | None = None
                 ) -> dict[str, Any]:
    """Rotate ``model`` (an ONNX ModelProto) in place; return what was done. Weights left in
    an external-data file (relative to ``base_dir``) are read one at a time; with ``spill``
    the rotated ones are written there as they are made instead of into the graph."""
    check_down_block(down_block)
    stream = trace_residual(model.graph)
    rw = _Rewriter(model, base_dir, spill)
    hidden = rw.array(stream.embedding.input[0]).shape[1]
    q = random_orthogonal(hidden, seed)
    summary: dict[str, Any] = {"seed": seed, "hidden_size": hidden,
                               "residual": _rotate_residual(rw, stream, q)}
    summary["heads"] = _rotate_heads(rw, seed + 1)
    summary["down"] = (_rotate_down_inputs(rw, down_block, seed + 2) if down_block
                       else {"layers": 0, "skipped": "--down-block 0"})
    drop_unused(model.graph)
    return summary


def check_equivalent(source: Path, rotated: Path, seed: int = 0) -> dict[str, Any]:
    """max|dlogits| / max|logits| of the rotated model against the source on random ids; one
    ONNX Runtime session at a time, so a large model is never in memory twice."""
    import gc

    import onnxruntime as ort

    rng = np.random.default_rng(seed)
    logits = []
    options = ort.SessionOptions()
    options.add_session_config_entry("session.disable_prepacking", "1")  # no second weight copy
    for path in (source, rotated):
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        if not logits:
            vocab = next((int(o.shape[-1]) for o in session.get_outputs()
                          if o.name == "logits" and isinstance(o.shape[-1], int)), 256)
            ids = rng.integers(0, vocab, size=(2, 24), dtype=np.int64)
            feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        logits.append(session.run(["logits"], feeds)[0])
        del session
        gc.collect()
    ref, new = logits
    diff = float(np.max(np.abs(ref - new)))
    scale = float(np.max(np.abs(ref)))
    return {"max_abs_diff": diff, "max_abs_logit": scale,
            "relative_error": diff / scale if scale > 0 else diff, "tolerance": CHECK_TOLERANCE}


def rotate_export(onnx_path: Path, out: Path, *, seed: int = 0,
                  down_block: int = DEFAULT_DOWN_BLOCK, force: bool = False) -> Path:
    """Write a rotated copy of an export directory; return the new ONNX path. The source's
    weights are read one at a time and the rotated graph is checked from the written file,
    so models past the 2 GB protobuf limit work and memory holds the rotated weights once."""
    import onnx

    onnx_path = Path(onnx_path)
    model = onnx.load(str(onnx_path), load_external_data=False)
    with contextlib.ExitStack() as stack:
        spill = None
        if any(is_external(t) for t in model.graph.initializer):  # a large model
            parent = Path(out).resolve().parent
            parent.mkdir(parents=True, exist_ok=True)
            scratch = stack.enter_context(tempfile.TemporaryDirectory(
                prefix=f".{Path(out).name}.rotating-", dir=parent))
            spill = stack.enter_context(SpillFile(Path(scratch) / "rotated.bin"))
        summary = rotate_model(model, seed=seed, down_block=down_block,
                               base_dir=onnx_path.parent, spill=spill)
        return _write_rotated(model, onnx_path, Path(out), seed, down_block, force, summary)


def _write_rotated(model: Any, onnx_path: Path, out: Path, seed: int, down_block: int,
                   force: bool, summary: dict[str, Any]) -> Path:
    """The export directory of a rotated model, written only if it computes the source's
    function (checked from the written file; a KV-cache graph over prefill and decode steps)."""

    def verify_plain(target: Path) -> dict[str, Any]:
        check = check_equivalent(onnx_path, target)
        if not check["relative_error"] <= CHECK_TOLERANCE:
            raise QuantkitError(
                f"the rotated graph does not compute the source's function: max|dlogits|/"
                f"max|logits| = {check['relative_error']:.2e} (tolerance {CHECK_TOLERANCE:.0e})",
                "this model's architecture is not supported by rotation; nothing was written",
            )
        return {**check, "against": "source_onnx"}

    verify = verify_plain
    if (export_manifest(onnx_path) or {}).get("cache"):
        from quantkit.cache_transform import verified_against

        verify = verified_against(onnx_path, "rotated")
    return write_derived_export(
        model, onnx_path, out, exporter="quantkit.rotation", force=force,
        inputs={"rotation": {"seed": seed, "down_block": down_block}},
        verify=verify, rotation=summary)
