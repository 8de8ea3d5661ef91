"""The Q/DQ rewrite of an export on disk into an engine's ONNX on disk, with memory bounded by a
weight when the export keeps its weights in external data.

An export past the 2 GB protobuf limit (or one made with ``--external-data``) is opened without
its weights; the rewrite reads each weight from the data file when it quantizes, fuses or
converts it, and writes every new initializer to a scratch file as it is made
(``quantkit.onnx_io.SpillFile``); the save copies untouched and new weights into the engine's
own ``<name>.data`` in chunks. Memory holds the graph and one weight (or one fused group), never
the FP32 model beside its rewrite: at TinyLlama-1.1B's shape the in-memory rewrite peaked at
3.88x the FP32 weights. An export with its weights inline is rewritten in memory as before, and
gives a single-file engine, byte for byte what it always was.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantkit.errors import QuantkitError
from quantkit.onnx_io import SpillFile, is_external, load_model, save_with_external_data
from quantkit.plan import PrecisionPlan
from quantkit.qdq import QdqOptions, RewriteResult, rewrite_model

SPILL_NAME = ".rewrite-spill"


@dataclass
class RewriteSource:
    """An export opened for rewriting: its graph (weightless when ``spill`` is set), the folder
    its external weights are read from, and the scratch file new weights go to."""

    model: Any
    weights_dir: Path
    spill: SpillFile | None

    @property
    def streamed(self) -> bool:
        return self.spill is not None

    def rewrite(self, plan: PrecisionPlan, amax: Mapping[str, float] | None,
                options: QdqOptions, skipped: Mapping[str, str] | None = None,
                weights: Mapping[str, Any] | None = None) -> RewriteResult:
        """``quantkit.qdq.rewrite_model`` of this export (may be called more than once)."""
        return rewrite_model(self.model, plan, amax, options, skipped, weights,
                             weights_dir=self.weights_dir, spill=self.spill)

    def save(self, model: Any, target: Path) -> None:
        """Write a rewritten ``model`` to ``target`` (with ``<target>.data`` when streamed)."""
        save_with_external_data(model, Path(target), base_dir=self.weights_dir)


def weights_are_external(model: Any) -> bool:
    """Whether any initializer of ``model`` (loaded without its weights) is in a data file."""
    return any(is_external(t) for t in model.graph.initializer)


@contextmanager
def open_for_rewrite(source: Path, scratch_dir: Path) -> Iterator[RewriteSource]:
    """Open the export ``source`` for a rewrite whose output is written into ``scratch_dir``
    (where the spill file lives until the block ends; it is removed then, on error too)."""
    source = Path(source)
    try:
        graph = load_model(source, with_weights=False)
    except Exception as exc:  # protobuf DecodeError and friends
        raise QuantkitError(f"cannot read ONNX model {source}: {exc}") from None
    if not weights_are_external(graph):
        yield RewriteSource(load_model(source), source.parent, None)
        return
    path = Path(scratch_dir) / SPILL_NAME
    try:
        with SpillFile(path) as spill:
            yield RewriteSource(graph, source.parent, spill)
    finally:
        path.unlink(missing_ok=True)
