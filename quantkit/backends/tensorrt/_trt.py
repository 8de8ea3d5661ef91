"""The one place that imports ``tensorrt``, lazily.

Every function of the backend that needs TensorRT calls :func:`require_tensorrt` first and then
does ``import tensorrt as trt`` inside its own body (so mypy checks the calls against the TensorRT
stubs). Importing :mod:`quantkit.backends.tensorrt` itself never imports TensorRT.
"""

from __future__ import annotations

import functools
from importlib import metadata
from types import ModuleType

from quantkit.errors import MissingDependencyError, QuantkitError


@functools.cache
def _load() -> ModuleType | None:
    try:
        import tensorrt
    except ImportError:
        return None
    return tensorrt


def require_tensorrt() -> ModuleType:
    """The ``tensorrt`` module, or one clear error naming the extra to install."""
    module = _load()
    if module is None:
        raise MissingDependencyError("tensorrt", "tensorrt")
    return module


def tensorrt_available() -> bool:
    return _load() is not None


def installed_tensorrt_version() -> str | None:
    """The installed version from package metadata, without importing (or loading) TensorRT."""
    for dist in ("tensorrt", "tensorrt-cu12", "tensorrt-cu13", "tensorrt_cu12", "tensorrt_cu13"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def runtime_tensorrt_version() -> str:
    """``tensorrt.__version__`` of the imported module (raises the missing-dependency error)."""
    return str(require_tensorrt().__version__)


def require_tensorrt_gpu() -> ModuleType:
    """TensorRT, and a CUDA GPU that torch sees (builds and runs need both): checked up front by
    the CLI, so a machine without them fails before any export, tokenizing or output."""
    module = require_tensorrt()
    import torch

    if not torch.cuda.is_available():
        raise QuantkitError(
            f"TensorRT {module.__version__} is installed, but torch sees no CUDA GPU",
            "TensorRT engines build and run on an NVIDIA GPU with a CUDA build of torch",
        )
    return module
