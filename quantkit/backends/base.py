"""The backend template: public ``build``/``run`` check inputs and state, subclasses implement
``_build_impl`` / ``_activate_impl`` / ``_run_impl``.

An ``Engine`` is an artifact directory (``manifest.json`` of kind ``engine`` plus whatever the
backend writes); a ``Runner`` loads one and runs batches. Runners are context managers.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from quantkit.artifacts import atomic_output_dir, make_manifest, read_manifest, write_manifest
from quantkit.errors import QuantkitError

if TYPE_CHECKING:
    from quantkit.calib.table import CalibrationTable
    from quantkit.plan import PrecisionPlan

ENGINE_KIND = "engine"


@dataclass(frozen=True)
class BuildRequest:
    """Everything a backend needs to build one engine."""

    onnx_path: Path
    precision: str  # fp32 | fp16 | int8 | mixed: the user's label for this engine
    plan: PrecisionPlan | None
    table: CalibrationTable | None
    options: Mapping[str, Any]


@dataclass(frozen=True)
class Engine:
    """A built engine on disk: its directory and the manifest that describes it."""

    path: Path
    manifest: Mapping[str, Any]

    @classmethod
    def load(cls, path: Path) -> Engine:
        path = Path(path)
        return cls(path=path, manifest=read_manifest(path, kind=ENGINE_KIND))

    @property
    def backend(self) -> str:
        return str(self.manifest["backend"])

    @property
    def precision(self) -> str:
        return str(self.manifest["precision"])

    def runner(self, **options: Any) -> Runner:
        from quantkit.backends import get_backend

        return get_backend(self.backend).runner(self, **options)


class Runner(abc.ABC):
    """Runs batches on one engine; a context manager: ``with engine.runner() as r: r.run(...)``."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._active = False

    # -- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> Runner:
        self.activate()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.deactivate()

    def activate(self) -> None:
        if self._active:
            raise QuantkitError(f"runner for {self.engine.path} is already active")
        self._activate_impl()
        self._active = True

    def deactivate(self) -> None:
        if self._active:
            self._deactivate_impl()
            self._active = False

    @property
    def is_active(self) -> bool:
        return self._active

    # -- running ---------------------------------------------------------------------------
    def run(
        self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Run one batch; inputs and outputs are host numpy arrays.

        ``outputs`` picks the outputs to fetch (all by default), e.g. only ``nll`` so full logits
        never leave the engine.
        """
        self._check_ready(feeds)
        if outputs is not None:
            unknown = [name for name in outputs if name not in self.output_names]
            if unknown:
                raise QuantkitError(
                    f"engine {self.engine.path} has no output {', '.join(unknown)}",
                    f"its outputs: {', '.join(self.output_names)}",
                )
        return self._run_impl(feeds, list(outputs) if outputs is not None else None)

    def benchmark(
        self, feeds: Mapping[str, np.ndarray], warmup: int, iterations: int
    ) -> list[float]:
        """Seconds per iteration over ``iterations`` timed runs after ``warmup`` untimed ones.

        The default times host-to-host runs with a monotonic clock; GPU runners override this
        with device events.
        """
        self._check_ready(feeds)
        for _ in range(warmup):
            self._run_impl(feeds, None)
        times = []
        for _ in range(iterations):
            start = time.perf_counter()
            self._run_impl(feeds, None)
            times.append(time.perf_counter() - start)
        return times

    def _check_ready(self, feeds: Mapping[str, np.ndarray]) -> None:
        if not self._active:
            raise QuantkitError("runner is not active", "use it inside a 'with' block")
        missing = [name for name in self.input_names if name not in feeds]
        if missing:
            raise QuantkitError(f"missing engine inputs: {', '.join(missing)}")

    @property
    @abc.abstractmethod
    def input_names(self) -> list[str]: ...

    @property
    @abc.abstractmethod
    def output_names(self) -> list[str]: ...

    def describe(self) -> dict[str, Any]:
        """Settings that affect the numbers (providers, threads, device); recorded with results."""
        return {}

    @abc.abstractmethod
    def _activate_impl(self) -> None: ...

    @abc.abstractmethod
    def _deactivate_impl(self) -> None: ...

    @abc.abstractmethod
    def _run_impl(
        self, feeds: Mapping[str, np.ndarray], outputs: list[str] | None
    ) -> dict[str, np.ndarray]: ...


class Backend(abc.ABC):
    """Builds engines from an FP32 ONNX model, a PrecisionPlan and a CalibrationTable."""

    name: ClassVar[str]

    def build(self, request: BuildRequest, out: Path, *, force: bool = False) -> Engine:
        """Check the request, build into a temporary directory, then move it to ``out``."""
        onnx_path = Path(request.onnx_path)
        if not onnx_path.is_file():
            raise QuantkitError(f"ONNX model {onnx_path} does not exist")
        self._check_request(request)
        with atomic_output_dir(Path(out), force=force) as tmp:
            fields = self._build_impl(request, tmp)
            inputs = {
                "onnx": str(onnx_path),
                "precision": request.precision,
                "plan": request.plan.to_dict() if request.plan is not None else None,
                "table_hash": _table_hash(request.table),
                "options": dict(request.options),
            }
            if request.table is not None:
                fields["text_roles"] = {"calibration": dict(request.table.data),
                                        "tuning": dict(request.table.tuning_data) or None}
            manifest = make_manifest(
                ENGINE_KIND, inputs, backend=self.name, precision=request.precision, **fields
            )
            write_manifest(tmp, manifest)
        return Engine.load(Path(out))

    def runner(self, engine: Engine, **options: Any) -> Runner:
        if engine.backend != self.name:
            raise QuantkitError(
                f"{engine.path} was built by the {engine.backend} backend, not {self.name}"
            )
        return self._runner_impl(engine, **options)

    def _check_request(self, request: BuildRequest) -> None:
        """Backend-specific checks before anything is written; raise QuantkitError."""
        return None

    @abc.abstractmethod
    def _build_impl(self, request: BuildRequest, out_dir: Path) -> dict[str, Any]:
        """Write the engine's files into ``out_dir``; return extra manifest fields."""

    @abc.abstractmethod
    def _runner_impl(self, engine: Engine, **options: Any) -> Runner: ...


def _table_hash(table: CalibrationTable | None) -> str | None:
    if table is None:
        return None
    from quantkit.artifacts import sha256_json

    return sha256_json(table.to_dict())
