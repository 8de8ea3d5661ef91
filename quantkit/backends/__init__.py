"""Inference backends. Each lives in its own module and is imported only when asked for by name."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from quantkit.errors import QuantkitError

if TYPE_CHECKING:
    from quantkit.backends.base import Backend

_BACKENDS = {
    "onnxruntime": ("quantkit.backends.onnxruntime", "OnnxRuntimeBackend"),
    "tensorrt": ("quantkit.backends.tensorrt", "TensorRTBackend"),
}


def available_backends() -> list[str]:
    return sorted(_BACKENDS)


def get_backend(name: str) -> Backend:
    """Instantiate a backend by name, importing its module (and its library) only now."""
    try:
        module_name, class_name = _BACKENDS[name]
    except KeyError:
        choices = ", ".join(available_backends())
        raise QuantkitError(f"unknown backend '{name}'", f"use one of: {choices}") from None
    module = importlib.import_module(module_name)
    backend: Backend = getattr(module, class_name)()
    return backend
