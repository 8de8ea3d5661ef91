"""Running a TensorRT engine: deserialize, ``set_input_shape``, ``set_tensor_address`` and
``execute_async_v3`` on a torch CUDA stream; outputs land in torch CUDA tensors (``run_device``)
and, for ``run``, are copied to host numpy through pinned memory. ``benchmark`` times
``execute_async_v3`` alone with CUDA events, inputs already on the GPU.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from quantkit.backends.base import Engine, Runner
from quantkit.backends.tensorrt._trt import require_tensorrt
from quantkit.backends.tensorrt.diagnostics import LogBook, make_logger
from quantkit.backends.tensorrt.dtypes import cast_tokens, numpy_dtype, torch_dtype
from quantkit.backends.tensorrt.options import pick_profile
from quantkit.backends.tensorrt.version import TrtVersion
from quantkit.errors import QuantkitError

if TYPE_CHECKING:
    import tensorrt as trt
    import torch

ENGINE_FILE = "engine.plan"


def engine_io(engine: Engine) -> list[dict[str, Any]]:
    try:
        return list(engine.manifest["tensorrt"]["io"])
    except (KeyError, TypeError):
        raise QuantkitError(
            f"{engine.path} has no TensorRT I/O description in its manifest",
            "rebuild the engine with this version of quantkit",
        ) from None


def check_profile_fit(
    name: str, shape: tuple[int, ...], profiles: list[list[list[int]]], profile: int
) -> None:
    """Refuse a shape outside the engine's optimization profile, before TensorRT does."""
    if profile >= len(profiles):
        raise QuantkitError(f"the engine has {len(profiles)} profile(s), not {profile + 1}")
    low, _, high = profiles[profile]
    if len(shape) != len(low) or any(not lo <= s <= hi for s, lo, hi in
                                     zip(shape, low, high, strict=True)):
        raise QuantkitError(
            f"input '{name}' has shape {list(shape)}, outside the engine's profile {profile}: "
            f"min {low}, max {high}",
            "rebuild the engine with a profile that covers this shape",
        )


class TensorRTRunner(Runner):
    """Runs one TensorRT engine on one CUDA device; a context manager like every runner."""

    def __init__(self, engine: Engine, device: int = 0, profile: int = 0) -> None:
        super().__init__(engine)
        self.device_index = int(device)
        self.profile = int(profile)
        self._io = engine_io(engine)
        self._inputs = [t for t in self._io if t["mode"] == "input"]
        self._outputs = [t for t in self._io if t["mode"] == "output"]
        self._book = LogBook()
        self._logger: Any = None
        self._runtime: Any = None
        self._engine: Any = None
        self._context: Any = None
        self._stream: Any = None
        self._out_device: dict[str, torch.Tensor] = {}
        self._out_host: dict[str, torch.Tensor] = {}
        self._in_device: dict[str, torch.Tensor] = {}

    @property
    def input_names(self) -> list[str]:
        return [t["name"] for t in self._inputs]

    @property
    def output_names(self) -> list[str]:
        return [t["name"] for t in self._outputs]

    # -- lifecycle --------------------------------------------------------------------------------
    def _activate_impl(self) -> None:
        trt_mod = require_tensorrt()
        import tensorrt as trt
        import torch

        if not torch.cuda.is_available():
            raise QuantkitError(
                "TensorRT engines run on a CUDA GPU, and torch sees none",
                "run on a machine with an NVIDIA GPU and a CUDA build of torch",
            )
        built = str(self.engine.manifest.get("tensorrt", {}).get("version", ""))
        here = str(trt_mod.__version__)
        if built and TrtVersion.parse(built) != TrtVersion.parse(here):
            raise QuantkitError(
                f"{self.engine.path} was built with TensorRT {built}; this is TensorRT {here}",
                "TensorRT engines only load in the version that built them: rebuild it",
            )
        self.device = torch.device("cuda", self.device_index)
        torch.cuda.set_device(self.device)
        path = self.engine.path / str(self.engine.manifest.get("engine_file", ENGINE_FILE))
        data = path.read_bytes()
        self._logger = make_logger(self._book, "WARNING")
        self._runtime = trt.Runtime(self._logger)
        engine = self._runtime.deserialize_cuda_engine(data)
        if engine is None:
            raise QuantkitError(
                f"TensorRT could not load {path}: "
                + (" | ".join(r.message for r in self._book.errors()[-3:]) or "no reason given"),
            )
        self._engine = engine
        context = engine.create_execution_context()
        if context is None:
            raise QuantkitError(
                f"TensorRT could not create an execution context for {path} (GPU memory?): "
                + " | ".join(r.message for r in self._book.errors()[-3:])
            )
        self._context = context
        self._stream = torch.cuda.Stream(device=self.device)
        if self.profile:
            if not context.set_optimization_profile_async(self.profile, self._stream.cuda_stream):
                raise QuantkitError(f"TensorRT refused optimization profile {self.profile}")
            self._stream.synchronize()
        self._version = here

    def _deactivate_impl(self) -> None:
        if self._stream is not None:
            self._stream.synchronize()
        # TensorRT objects go in dependency order: context, engine, runtime
        self._context = None
        self._engine = None
        self._runtime = None
        self._out_device.clear()
        self._out_host.clear()
        self._in_device.clear()
        self._stream = None

    # -- running ----------------------------------------------------------------------------------
    def _bind_inputs(self, feeds: Mapping[str, Any]) -> None:
        import torch

        context: trt.IExecutionContext = self._context
        # torch tensors fed in were written on the caller's stream: TensorRT, on the runner's own
        # stream, must not read them before that work is done
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            tensors: dict[str, torch.Tensor] = {}
            for spec in self._inputs:
                name = spec["name"]
                value = feeds[name]
                if isinstance(value, torch.Tensor):
                    tensor = value.to(self.device, torch_dtype(spec["dtype"]), non_blocking=True)
                else:
                    array = cast_tokens(np.asarray(value), numpy_dtype(spec["dtype"]), name)
                    host = torch.from_numpy(np.ascontiguousarray(array))
                    tensor = host.pin_memory().to(self.device, non_blocking=True)
                tensors[name] = tensor.contiguous()
            self._switch_profile({n: tuple(int(d) for d in t.shape) for n, t in tensors.items()})
            for spec in self._inputs:
                name = spec["name"]
                tensor = tensors[name]
                shape = tuple(int(d) for d in tensor.shape)
                check_profile_fit(name, shape, spec.get("profiles", []), self.profile)
                if not context.set_input_shape(name, shape):
                    raise QuantkitError(f"TensorRT refused shape {list(shape)} for input '{name}'")
                if not context.set_tensor_address(name, tensor.data_ptr()):
                    raise QuantkitError(f"TensorRT refused the buffer of input '{name}'")
                self._in_device[name] = tensor  # keep alive until the next run

    def _switch_profile(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """Activate the optimization profile that covers this run's shapes (a KV-cache engine's
        prefill and decode profiles), if it is not the active one; where none covers them,
        ``check_profile_fit`` names the input that does not fit."""
        profiles = {spec["name"]: spec.get("profiles", []) for spec in self._inputs}
        chosen = pick_profile(shapes, profiles, self.profile)
        if chosen is None or chosen == self.profile:
            return
        if not self._context.set_optimization_profile_async(chosen, self._stream.cuda_stream):
            raise QuantkitError(f"TensorRT refused optimization profile {chosen}")
        self.profile = chosen

    def _bind_outputs(self) -> None:
        import torch

        context: trt.IExecutionContext = self._context
        for spec in self._outputs:
            name = spec["name"]
            dims = context.get_tensor_shape(name)
            shape = tuple(int(dims[k]) for k in range(len(dims)))
            if any(d < 0 for d in shape):
                raise QuantkitError(f"TensorRT could not infer the shape of output '{name}'")
            buf = self._out_device.get(name)
            if buf is None or tuple(buf.shape) != shape:
                buf = torch.empty(shape, dtype=torch_dtype(spec["dtype"]), device=self.device)
                self._out_device[name] = buf
            if not context.set_tensor_address(name, buf.data_ptr()):
                raise QuantkitError(f"TensorRT refused the buffer of output '{name}'")

    def _execute(self) -> None:
        context: trt.IExecutionContext = self._context
        if not context.execute_async_v3(self._stream.cuda_stream):
            raise QuantkitError(
                "TensorRT failed to run the engine: "
                + (" | ".join(r.message for r in self._book.errors()[-3:]) or "no reason given")
            )

    def _prepare(self, feeds: Mapping[str, Any]) -> None:
        """Inputs on the GPU and every tensor's address set (out of memory: a clear error)."""
        import torch

        try:
            self._bind_inputs(feeds)
            self._bind_outputs()
        except torch.cuda.OutOfMemoryError:
            shapes = {k: list(np.shape(v)) for k, v in feeds.items()}
            raise QuantkitError(
                f"GPU out of memory for a batch of shape {shapes}",
                "run smaller batches or shorter sequences, or free GPU memory",
            ) from None

    def run_device(self, feeds: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Run one batch; outputs stay on the GPU as torch tensors (reused by the next run:
        clone what you keep). Inputs may be numpy arrays or torch tensors."""
        self._check_ready(feeds)
        self._prepare(feeds)
        self._execute()
        self._stream.synchronize()
        return dict(self._out_device)

    def _run_impl(
        self, feeds: Mapping[str, np.ndarray], outputs: list[str] | None = None
    ) -> dict[str, np.ndarray]:
        import torch

        self._prepare(feeds)
        self._execute()
        names = outputs or self.output_names
        with torch.cuda.stream(self._stream):
            for name in names:
                device = self._out_device[name]
                host = self._out_host.get(name)
                if host is None or host.shape != device.shape:
                    host = torch.empty(device.shape, dtype=device.dtype, pin_memory=True)
                    self._out_host[name] = host
                host.copy_(device, non_blocking=True)
        self._stream.synchronize()
        return {name: self._out_host[name].numpy().copy() for name in names}

    def benchmark(
        self, feeds: Mapping[str, np.ndarray], warmup: int, iterations: int
    ) -> list[float]:
        """Seconds per ``execute_async_v3``, measured with CUDA events on the runner's stream;
        inputs are copied to the GPU once, before timing."""
        import torch

        self._check_ready(feeds)
        self._prepare(feeds)
        for _ in range(warmup):
            self._execute()
        events = [
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            for _ in range(iterations)
        ]
        for start, end in events:
            start.record(self._stream)
            self._execute()
            end.record(self._stream)
        self._stream.synchronize()
        return [start.elapsed_time(end) / 1000.0 for start, end in events]

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "backend": "tensorrt",
            "tensorrt": self.engine.manifest.get("tensorrt", {}).get("version"),
            "profile": self.profile,
            "timing": "CUDA events around execute_async_v3; inputs resident on the GPU",
        }
        try:
            import torch

            if torch.cuda.is_available():
                info["device"] = torch.cuda.get_device_name(self.device_index)
                info["cuda"] = torch.version.cuda
        except Exception:  # noqa: BLE001 - describe() must never fail
            pass
        return info
