"""Streaming token batches into device buffers for TensorRT's calibrator (no TensorRT import).

:class:`DeviceBatchFeeder` is the data side of the INT8 calibrator: it allocates one device
buffer per network input, once, at the calibration shape (batch, seq); each :meth:`get_batch`
copies the next batch there and returns the buffers' addresses in the order TensorRT asks for.
On CUDA the host data goes through pinned staging tensors and asynchronous copies on the
feeder's own stream, which is synchronised before the addresses are returned, so TensorRT (on
its own stream) always reads complete data.

TensorRT calibrates at one shape, so batches are re-cut into exactly ``batch`` rows: rows are
taken across the incoming batches in order, and a remainder smaller than ``batch`` at the very end
is dropped and counted (``dropped_rows``). Nothing is padded, so no invented tokens reach the
activation statistics.

The feeder also runs with ``device="cpu"`` (no staging, no stream): the same sequencing, checked
by CPU unit tests; GPU tests check the CUDA path bit-exactly.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from quantkit.backends.tensorrt.dtypes import cast_tokens
from quantkit.errors import QuantkitError

if TYPE_CHECKING:
    import torch

Batch = Mapping[str, np.ndarray]


class DeviceBatchFeeder:
    """Token batches -> fixed device buffers, one per input; see the module docstring.

    ``inputs`` maps each network input name to its numpy dtype (the engine's input type; token
    arrays are cast to it, refusing values that do not fit). ``shape`` is (batch, seq).
    """

    def __init__(
        self,
        batches: Iterable[Batch],
        inputs: Mapping[str, np.dtype | str | type],
        shape: tuple[int, int],
        *,
        device: str = "cuda",
        pinned: bool | None = None,
    ) -> None:
        import torch

        if not inputs:
            raise QuantkitError("the calibration feeder needs at least one input")
        batch, seq = (int(v) for v in shape)
        if batch < 1 or seq < 1:
            raise QuantkitError(f"calibration shape must be positive, got [{batch}, {seq}]")
        self.shape = (batch, seq)
        self.inputs = {name: np.dtype(dt) for name, dt in inputs.items()}
        self._batches = batches
        self.device = torch.device(device)
        self.is_cuda = self.device.type == "cuda"
        if self.is_cuda and not torch.cuda.is_available():
            raise QuantkitError(
                "calibration needs a CUDA GPU, and torch sees none",
                "run TensorRT builds on a machine with an NVIDIA GPU and a CUDA build of torch",
            )
        self.pinned = self.is_cuda if pinned is None else bool(pinned)
        if self.pinned and not self.is_cuda:
            raise QuantkitError("pinned staging only makes sense with a CUDA device")
        self._device: dict[str, torch.Tensor] = {}
        self._staging: dict[str, torch.Tensor] = {}
        self._stream: torch.cuda.Stream | None = None
        try:
            for name, dt in self.inputs.items():
                tdt = _torch_dtype(dt)
                self._device[name] = torch.empty(self.shape, dtype=tdt, device=self.device)
                if self.pinned:
                    self._staging[name] = torch.empty(self.shape, dtype=tdt, pin_memory=True)
            if self.is_cuda:
                self._stream = torch.cuda.Stream(device=self.device)
        except torch.cuda.OutOfMemoryError:
            raise QuantkitError(
                f"GPU out of memory allocating calibration buffers of shape {list(self.shape)}",
                "use a smaller calibration shape (calibration_shape) or free GPU memory",
            ) from None
        self._rows: Iterator[dict[str, np.ndarray]] | None = None
        self.batches_fed = 0
        self.dropped_rows = 0
        self.exhausted = False

    # -- host side: re-cutting the stream of batches into calibration batches ---------------------
    def _iter_batches(self) -> Iterator[dict[str, np.ndarray]]:
        batch, seq = self.shape
        pending: dict[str, list[np.ndarray]] = {name: [] for name in self.inputs}
        rows = 0
        for index, incoming in enumerate(self._batches):
            arrays = self._check_incoming(incoming, index)
            for name, array in arrays.items():
                pending[name].append(array)
            rows += len(next(iter(arrays.values())))
            while rows >= batch:
                out: dict[str, np.ndarray] = {}
                for name in self.inputs:
                    joined = np.concatenate(pending[name], axis=0)
                    out[name] = np.ascontiguousarray(joined[:batch])
                    pending[name] = [joined[batch:]] if len(joined) > batch else []
                rows -= batch
                yield out
        self.dropped_rows = rows

    def _check_incoming(self, incoming: Batch, index: int) -> dict[str, np.ndarray]:
        seq = self.shape[1]
        missing = [name for name in self.inputs if name not in incoming]
        if missing:
            raise QuantkitError(
                f"calibration batch {index} lacks input(s) {', '.join(missing)} of the network",
                f"it has: {', '.join(incoming) or 'nothing'}",
            )
        arrays: dict[str, np.ndarray] = {}
        rows: int | None = None
        for name, dtype in self.inputs.items():
            array = np.asarray(incoming[name])
            if array.ndim != 2 or array.shape[1] != seq:
                raise QuantkitError(
                    f"calibration batch {index}: '{name}' has shape {list(array.shape)}, "
                    f"expected [rows, {seq}]",
                    "the calibration shape's seq must equal the token blocks' seq-len",
                )
            if rows is not None and array.shape[0] != rows:
                raise QuantkitError(
                    f"calibration batch {index}: inputs have different numbers of rows"
                )
            rows = array.shape[0]
            arrays[name] = cast_tokens(array, dtype, name)
        return arrays

    def next_host_batch(self) -> dict[str, np.ndarray] | None:
        """The next calibration batch on the host, exactly ``shape``; None at the end."""
        if self.exhausted:
            return None
        if self._rows is None:
            self._rows = self._iter_batches()
        try:
            return next(self._rows)
        except StopIteration:
            self.exhausted = True
            return None

    # -- device side ------------------------------------------------------------------------------
    def load_next(self) -> bool:
        """Copy the next batch into the device buffers; False (buffers untouched) at the end."""
        import torch

        host = self.next_host_batch()
        if host is None:
            return False
        if self._stream is not None:
            with torch.cuda.stream(self._stream):
                for name, array in host.items():
                    source = torch.from_numpy(array)
                    if self.pinned:
                        staging = self._staging[name]
                        staging.copy_(source)  # host -> pinned host
                        self._device[name].copy_(staging, non_blocking=True)
                    else:
                        self._device[name].copy_(source)
            # TensorRT reads the buffers on its own stream: the copies must be complete first
            self._stream.synchronize()
        else:
            for name, array in host.items():
                self._device[name].copy_(torch.from_numpy(array))
        self.batches_fed += 1
        return True

    def pointers(self, names: Sequence[str]) -> list[int]:
        """Device addresses of the buffers, in the order of ``names`` (TensorRT's order)."""
        unknown = [name for name in names if name not in self._device]
        if unknown:
            raise QuantkitError(
                f"TensorRT asked for calibration input(s) {', '.join(unknown)}, "
                f"the feeder has {', '.join(self._device)}"
            )
        return [int(self._device[name].data_ptr()) for name in names]

    def get_batch(self, names: Sequence[str]) -> list[int] | None:
        """The calibrator's ``get_batch``: next batch's addresses in ``names`` order, or None."""
        if not self.load_next():
            return None
        return self.pointers(names)

    def reset(self) -> None:
        """Start again from the first batch (a second build, or a rebuild after a failure)."""
        if self._rows is None and not self.exhausted:
            return  # nothing consumed yet
        if iter(self._batches) is self._batches:
            raise QuantkitError(
                "the calibration data is a one-shot iterator and cannot be replayed",
                "pass a re-iterable such as TokenBlocks",
            )
        self._rows = None
        self.batches_fed = 0
        self.dropped_rows = 0
        self.exhausted = False

    # -- introspection (tests, manifests) ---------------------------------------------------------
    def buffer(self, name: str) -> torch.Tensor:
        return self._device[name]

    def staging(self, name: str) -> torch.Tensor | None:
        return self._staging.get(name)

    @property
    def rows_fed(self) -> int:
        return self.batches_fed * self.shape[0]

    def describe(self) -> dict[str, Any]:
        return {
            "shape": list(self.shape),
            "inputs": {name: dt.name for name, dt in self.inputs.items()},
            "device": str(self.device),
            "pinned": self.pinned,
            "batches_fed": self.batches_fed,
            "rows_fed": self.rows_fed,
            "dropped_rows": self.dropped_rows,
        }

    def close(self) -> None:
        self._device.clear()
        self._staging.clear()
        self._stream = None


def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    import torch

    return torch.from_numpy(np.empty(0, dtype=dtype)).dtype
