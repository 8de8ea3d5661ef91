"""ONNX Runtime backend: engines are ONNX files (FP32, or rewritten with Q/DQ and FP16 regions)
run by an InferenceSession; CPU by default, CUDA when ONNX Runtime has it."""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from quantkit.backends.base import Backend, BuildRequest, Engine, Runner
from quantkit.errors import MissingDependencyError, QuantkitError
from quantkit.export import ONNX_NAME, TOKENIZER_DIR, export_manifest, onnx_model_hash

ENGINE_ONNX = "engine.onnx"


def _ort() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise MissingDependencyError("onnxruntime", "onnxruntime") from None
    return onnxruntime


def copy_export_context(onnx_path: Path, out_dir: Path) -> dict[str, Any]:
    """Copy the tokenizer saved beside the export and return what the engine should record
    about its source model (hash, vocab size, positions, tokenizer)."""
    manifest = export_manifest(onnx_path) or {}
    tokenizer_src = Path(onnx_path).parent / TOKENIZER_DIR
    if tokenizer_src.is_dir():
        shutil.copytree(tokenizer_src, out_dir / TOKENIZER_DIR)
    return {
        "source_model_hash": manifest.get("model_hash") or onnx_model_hash(onnx_path),
        "source_model": manifest.get("inputs", {}).get("model"),
        "vocab_size": manifest.get("vocab_size"),
        "max_positions": manifest.get("max_positions"),
        "tokenizer": TOKENIZER_DIR if tokenizer_src.is_dir() else None,
    }


def engine_size_bytes(directory: Path, names: list[str]) -> int:
    total = 0
    for name in names:
        for path in (directory / name, directory / f"{name}.data"):
            if path.is_file():
                total += path.stat().st_size
    return total


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def _build_impl(self, request: BuildRequest, out_dir: Path) -> dict[str, Any]:
        _ort()
        fields = copy_export_context(request.onnx_path, out_dir)
        target = out_dir / ENGINE_ONNX
        if request.precision == "fp32" and (
            request.plan is None or not [n for n, d in request.plan.decisions.items()
                                         if d.precision.value != "fp32"]
        ):
            _copy_onnx(request.onnx_path, target)
            fields["int8_coverage"] = 0.0
        else:
            raise QuantkitError(
                f"precision '{request.precision}' is not available in this build of quantkit yet",
                "only fp32 engines can be built so far",
            )
        fields["onnx"] = ENGINE_ONNX
        fields["size_bytes"] = engine_size_bytes(out_dir, [ENGINE_ONNX])
        return fields

    def _runner_impl(self, engine: Engine, **options: Any) -> Runner:
        return OnnxRuntimeRunner(engine, **options)


def _copy_onnx(src: Path, dst: Path) -> None:
    shutil.copyfile(src, dst)
    data = Path(f"{src}.data")
    if data.is_file():
        # external data is referenced by file name: keep the name the model expects
        shutil.copyfile(data, dst.parent / data.name)


class OnnxRuntimeRunner(Runner):
    """An InferenceSession over the engine's ONNX. ``threads=None`` uses every core."""

    def __init__(
        self,
        engine: Engine,
        threads: int | None = None,
        providers: list[str] | None = None,
    ) -> None:
        super().__init__(engine)
        self.threads = threads
        self.providers = providers
        self._session: Any = None

    def _activate_impl(self) -> None:
        ort = _ort()
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads or os.cpu_count() or 1
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        available = ort.get_available_providers()
        providers = self.providers or [
            p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available
        ]
        path = self.engine.path / str(self.engine.manifest.get("onnx", ENGINE_ONNX))
        try:
            self._session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise QuantkitError(
                f"ONNX Runtime cannot load {path}: {str(exc).splitlines()[0]}"
            ) from None
        self._threads_used = options.intra_op_num_threads

    def _deactivate_impl(self) -> None:
        self._session = None

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self._session.get_inputs()]

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self._session.get_outputs()]

    def _run_impl(
        self, feeds: Mapping[str, np.ndarray], outputs: list[str] | None
    ) -> dict[str, np.ndarray]:
        names = outputs or self.output_names
        values = self._session.run(names, {k: feeds[k] for k in self.input_names})
        return dict(zip(names, values, strict=True))

    def describe(self) -> dict[str, Any]:
        return {
            "backend": "onnxruntime",
            "providers": self._session.get_providers() if self._session else self.providers,
            "intra_op_threads": getattr(self, "_threads_used", self.threads),
            "onnxruntime": _ort().__version__,
        }


__all__ = ["OnnxRuntimeBackend", "OnnxRuntimeRunner", "ONNX_NAME"]
