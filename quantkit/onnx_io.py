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

TWO_GB = 2**31 - 1  # the largest protobuf message
INLINE_BYTES = 1024  # smaller initializers stay in the graph file (onnx's default threshold)
_CHUNK = 64 * 2**20


def _external_fields(tensor: Any) -> dict[str, str]:
    return {e.key: e.value for e in tensor.external_data}


def is_external(tensor: Any) -> bool:
    from onnx import TensorProto

    return tensor.data_location == TensorProto.EXTERNAL


def _external_path(location: str, base_dir: Path | None) -> Path:
    """Where an external tensor's bytes are: relative to the model's folder, or an absolute
    scratch file of a rewrite in progress (``SpillFile``; never saved as such)."""
    path = Path(location)
    return path if path.is_absolute() else Path(base_dir or ".") / path


def read_initializer(tensor: Any, base_dir: Path) -> np.ndarray:
    """The tensor's values, read from its external-data file (relative to ``base_dir``) when
    it has one: only this tensor's bytes are read, and the tensor is left without them."""
    from onnx import helper, numpy_helper

    if not is_external(tensor):
        return numpy_helper.to_array(tensor)
    fields = _external_fields(tensor)
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type))
    count = int(np.prod(tensor.dims, dtype=np.int64))
    values = np.fromfile(_external_path(fields["location"], base_dir), dtype=dtype, count=count,
                         offset=int(fields.get("offset", 0)))
    if values.size != count:
        raise OSError(f"{fields['location']} ends before {tensor.name}'s data")
    return values.reshape(tuple(tensor.dims))


def tensor_bytes(tensor: Any) -> int:
    """Bytes of a tensor's values, wherever they are."""
    from onnx import helper

    if is_external(tensor):
        return int(_external_fields(tensor).get("length", 0)) or int(
            np.prod(tensor.dims, dtype=np.int64)
            * np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize)
    return len(tensor.raw_data)


def weight_bytes(model: Any) -> int:
    """Bytes of all the model's initializers, wherever they are (inline or external)."""
    return sum(tensor_bytes(t) for t in model.graph.initializer)


def _inline(tensor: Any, base_dir: Path | None) -> Any:
    from onnx import numpy_helper

    return numpy_helper.from_array(read_initializer(tensor, Path(base_dir or ".")), tensor.name)


def load_model(path: Path, with_weights: bool = True) -> Any:
    """An ONNX model, its external weights read in by quantkit's reader. ``onnx.load`` refuses a
    data file with several hard links ("a potential hardlink attack"), which an export's data
    file has while a calibration of it links the file beside its segment models
    (``link_external_data``): a build of the same export beside a running calibration failed.
    Locations must stay inside the model's folder (no absolute paths, no ``..``)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    check_locations(model)
    if with_weights:
        base = Path(path).parent
        for tensor in model.graph.initializer:
            if is_external(tensor):
                tensor.CopyFrom(_inline(tensor, base))
    return model


def check_locations(model: Any) -> None:
    """Refuse external data that points outside the model's folder (an absolute path or
    ``..``): what ``onnx.load`` and ONNX Runtime refuse too."""
    for tensor in model.graph.initializer:
        if not is_external(tensor):
            continue
        location = Path(_external_fields(tensor).get("location", ""))
        if location.is_absolute() or ".." in location.parts:
            raise ValueError(f"external data of {tensor.name} points outside the model's "
                             f"folder: {location}")


def link_external_data(model: Any, source_dir: Path, target_dir: Path) -> None:
    """Hard-link (copy, across filesystems) the external-data files ``model``'s weights refer
    to from ``source_dir`` into ``target_dir``, so a graph saved there loads its weights:
    ONNX Runtime refuses external data that resolves outside the loaded model's folder,
    symbolic links included."""
    import os
    import shutil

    for location in sorted({_external_fields(t)["location"] for t in model.graph.initializer
                            if is_external(t)}):
        link = Path(target_dir) / location
        if link.exists():
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        source = _external_path(location, source_dir).resolve()
        try:
            os.link(source, link)
        except OSError:  # another filesystem (or no hard links there)
            shutil.copyfile(source, link)


class SpillFile:
    """A scratch file that new initializers go to as a rewrite makes them, the graph keeping
    only a reference: a rewrite of a large model holds one weight in memory at a time, not a
    protobuf of all of them (whose memory is not returned until the whole model goes)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path).resolve()
        self._file = open(self.path, "wb")  # noqa: SIM115 - closed by close() / __exit__

    def tensor(self, array: np.ndarray, name: str) -> Any:
        """A TensorProto named ``name`` whose values are ``array``, written to the file."""
        from onnx import TensorProto, helper

        values = np.ascontiguousarray(array)
        start = _align(self._file)
        self._file.write(values.tobytes())
        self._file.flush()  # readable at once (read_initializer)
        tensor = TensorProto()
        tensor.name = name
        tensor.data_type = helper.np_dtype_to_tensor_dtype(values.dtype)
        tensor.dims.extend(values.shape)
        for key, value in (("location", str(self.path)), ("offset", str(start)),
                           ("length", str(values.nbytes))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        tensor.data_location = TensorProto.EXTERNAL
        return tensor

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> SpillFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def save_with_external_data(model: Any, target: Path, base_dir: Path | None = None,
                            external: bool = False) -> None:
    """Save ``model``; above 2 GB of weights, when any weight is external (relative to
    ``base_dir``), or when ``external`` asks for it, every initializer of at least 1 KiB goes to
    ``<target>.data`` beside it, copied from its source file in chunks when it was never
    loaded. ``model`` is changed to refer to the new file."""
    import onnx

    inits = list(model.graph.initializer)
    inline_bytes = sum(len(t.raw_data) for t in inits)
    # ByteSize() only where the weights alone fit: past 2 GB protobuf cannot size the message
    if (not external and not any(is_external(t) for t in inits) and inline_bytes < TWO_GB
            and model.ByteSize() < TWO_GB):
        onnx.save_model(model, str(target))
        return
    location = f"{target.name}.data"
    with open(target.parent / location, "wb") as out:
        for tensor in inits:
            if is_external(tensor) and tensor_bytes(tensor) < INLINE_BYTES:
                tensor.CopyFrom(_inline(tensor, base_dir))  # shape inference reads these
                continue
            if is_external(tensor):
                fields = _external_fields(tensor)
                source = _external_path(fields["location"], base_dir)
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
