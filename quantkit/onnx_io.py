"""Reading and writing ONNX graphs whose weights do not fit a protobuf or the memory budget.

A protobuf message cannot exceed 2 GB, so a model above about 500 M FP32 parameters keeps its
weights in an external-data file beside ``model.onnx``. Rewrites (rotation, SmoothQuant) load
such a graph without its weights (``onnx.load(..., load_external_data=False)``), read each
weight when they need it (``read_initializer``), and write the result with
``save_with_external_data``, which copies untouched weights from the source file in chunks
instead of loading them: memory holds the rewritten weights, never the whole source model twice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

TWO_GB = 2**31
INLINE_BYTES = 1024  # smaller initializers stay in the graph file (onnx's default threshold)
_CHUNK = 64 * 2**20


def _external_fields(tensor: Any) -> dict[str, str]:
    return {e.key: e.value for e in tensor.external_data}


def is_external(tensor: Any) -> bool:
    from onnx import TensorProto

    return tensor.data_location == TensorProto.EXTERNAL


def read_initializer(tensor: Any, base_dir: Path) -> np.ndarray:
    """The tensor's values, read from its external-data file (relative to ``base_dir``) when
    it has one: only this tensor's bytes are read."""
    from onnx import TensorProto, numpy_helper

    if not is_external(tensor):
        return numpy_helper.to_array(tensor)
    copy = TensorProto()  # onnx loads the bytes into the tensor it reads: keep them off ours
    copy.CopyFrom(tensor)
    return numpy_helper.to_array(copy, base_dir=str(base_dir))


def save_with_external_data(model: Any, target: Path, base_dir: Path | None = None) -> None:
    """Save ``model``; above 2 GB of weights, or when any weight is external (relative to
    ``base_dir``), every initializer of at least 1 KiB goes to ``<target>.data`` beside it,
    copied from its source file in chunks when it was never loaded. ``model`` is changed to
    refer to the new file."""
    import onnx

    inits = list(model.graph.initializer)
    external = [t for t in inits if is_external(t)]
    inline_bytes = sum(len(t.raw_data) for t in inits)
    if not external and inline_bytes < TWO_GB:
        onnx.save_model(model, str(target))
        return
    if external and base_dir is None:
        raise ValueError("external weights need the folder they are relative to")
    location = f"{target.name}.data"
    with open(target.parent / location, "wb") as out:
        for tensor in inits:
            if is_external(tensor):
                fields = _external_fields(tensor)
                source = Path(base_dir or ".") / fields["location"]
                offset, length = int(fields.get("offset", 0)), int(fields["length"])
                start = _align(out)
                with open(source, "rb") as src:
                    src.seek(offset)
                    left = length
                    while left:
                        block = src.read(min(_CHUNK, left))
                        if not block:
                            raise OSError(f"{source} ends before {tensor.name}'s data")
                        out.write(block)
                        left -= len(block)
            elif tensor.HasField("raw_data") and len(tensor.raw_data) >= INLINE_BYTES:
                start = _align(out)
                length = len(tensor.raw_data)
                out.write(tensor.raw_data)
                tensor.ClearField("raw_data")
            else:
                continue
            del tensor.external_data[:]
            for key, value in (("location", location), ("offset", str(start)),
                               ("length", str(length))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            tensor.data_location = onnx.TensorProto.EXTERNAL
    onnx.save_model(model, str(target))


def _align(out: Any, alignment: int = 4096) -> int:
    """Pad the file to the next page so each tensor can be memory-mapped; return its offset."""
    position = out.tell()
    pad = (-position) % alignment
    if pad:
        out.write(b"\0" * pad)
    return position + pad
