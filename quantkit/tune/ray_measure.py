"""Autotune's measurements as Ray tasks (``quantkit autotune --ray``, ``quantkit quantize --ray``).

Each measurement (a subset, the INT8 groups, range overrides) is one plain ``ray.remote`` task
running ``quantkit.tune.measure.score``, the function the driver runs without Ray. A worker
process builds its own probe session (ONNX Runtime) on its first task and keeps it for the next
ones of the same probe (one per process: a task function with a per-process cache, not an actor,
so Ray places every task on any free worker and retries a task alone when its worker dies,
``max_retries``). The probe's inputs go into Ray's object store once (``ray.put``); tasks carry
only the configuration and return plain numbers.

The driver submits a step's independent measurements (``Measurer.prefetch``), keeps ``width`` of
them in flight, and writes each result into the measurement cache as it arrives; the search
reads them in its own order and decides exactly as without Ray. The speculative ones (the next
steps of a bisection, the halves of a greedy chunk, ``speculation``) are measured in the same
batch and only read where the serial search would have measured them.

Measurements run ONNX Runtime's CPU provider: a task asks for ``threads`` CPUs (the probe's
intra-op threads, one when not set) and no GPU. Engine builds and their verification (the only
GPU-capable work of autotune) stay on the driver. Workers read the ONNX model from its path:
on a cluster of several hosts, a path every host sees (a shared folder).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantkit.errors import QuantkitError
from quantkit.ray_tasks import die_once_if_asked, hook_env
from quantkit.tune.measure import Request, score


@dataclass(frozen=True)
class ProbeSpec:
    """What a worker needs to build the probe and score on the subsets (plain, picklable)."""

    onnx_path: Path
    groups: list[Any]  # QuantGroup
    amax: dict[str, float]  # the table's ranges (overrides come with each task)
    per_channel: bool
    threads: int | None
    weights: Any  # the table's GPTQ weights, or None
    weight_layout: str
    subsets: dict[str, Any]  # subset -> token ids
    max_length: int
    batch_size: int


_PROBES: dict[str, tuple[Any, ProbeSpec]] = {}  # in a worker: probe key -> probe, its spec


def _probe(key: str, spec_box: list[Any]) -> tuple[Any, ProbeSpec]:
    """This worker's probe for ``key``, built from the spec in the object store when new."""
    cached = _PROBES.get(key)
    if cached is not None:
        return cached
    import ray

    from quantkit.tune.probe import ProbeSession

    for old, _ in _PROBES.values():  # one probe per worker process: memory stays bounded
        old.close()
    _PROBES.clear()
    spec: ProbeSpec = ray.get(spec_box[0])
    probe = ProbeSession(spec.onnx_path, spec.groups, spec.amax, per_channel=spec.per_channel,
                         threads=spec.threads, weights=spec.weights,
                         weight_layout=spec.weight_layout)
    _PROBES[key] = (probe, spec)
    return probe, spec


def measure_task(key: str, spec_box: list[Any], subset: str, groups: tuple[str, ...],
                 amax: dict[str, float]) -> dict[str, Any]:
    """One measurement on a Ray worker (``spec_box``: the spec's object reference in a list, so
    Ray does not fetch it for every task)."""
    die_once_if_asked()
    probe, spec = _probe(key, spec_box)
    return score(probe, spec.subsets[subset], spec.max_length, spec.batch_size, groups, amax)


class RayMeasurements:
    """A ``quantkit.tune.measure.Executor`` over Ray tasks for one tuning context."""

    def __init__(self, ray: Any, context: Any, max_retries: int) -> None:
        from quantkit.artifacts import sha256_json

        settings = context.settings
        measurer = context.measurer
        spec = ProbeSpec(Path(context.onnx_path).resolve(), list(context.groups),
                         dict(context.table.amax), settings.per_channel, settings.threads,
                         context.table.weights, context.weight_layout, dict(measurer.subsets),
                         measurer.max_length, measurer.batch_size)
        self._ray = ray
        self._key = sha256_json({"measurer": measurer.key, "onnx": str(spec.onnx_path),
                                 "threads": spec.threads, "batch_size": spec.batch_size,
                                 "layout": spec.weight_layout,
                                 "subsets": measurer._subset_keys})
        self._spec_box = [ray.put(spec)]
        cpus = max(1, int(settings.threads or 1))
        options: dict[str, Any] = {"num_cpus": cpus, "num_gpus": 0, "max_retries": max_retries}
        options.update(hook_env())
        self._task = ray.remote(**options)(measure_task)
        self.width = max(1, int(ray.cluster_resources().get("CPU", 1)) // cpus)
        self.submitted = 0  # tasks submitted (Ray's retries of a task not counted)

    def run(self, requests: Sequence[Request], stop: Callable[[], bool] | None = None,
            ) -> Iterator[tuple[int, dict[str, Any] | QuantkitError]]:
        ray = self._ray
        pending: dict[Any, int] = {}
        following = 0
        while following < len(requests) or pending:
            while following < len(requests) and len(pending) < self.width:
                if stop is not None and stop():
                    following = len(requests)
                    break
                subset, groups, amax = requests[following]
                pending[self._task.remote(self._key, self._spec_box, subset, groups,
                                          amax)] = following
                self.submitted += 1
                following += 1
            if not pending:
                break
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                index = pending.pop(ref)
                yield index, self._get(ref)

    def _get(self, ref: Any) -> dict[str, Any] | QuantkitError:
        """A task's result, or the error the measurement raised (returned: the measurer
        decides whether the search needs it)."""
        ray = self._ray
        try:
            return dict(ray.get(ref))
        except ray.exceptions.RayTaskError as exc:  # the measurement itself raised
            cause = getattr(exc, "cause", None)
            if isinstance(cause, QuantkitError):
                return cause
            return QuantkitError(f"a measurement failed on a Ray worker: {exc}")
        except ray.exceptions.RayError as exc:  # its worker or node died, retries spent
            raise QuantkitError(f"a measurement's Ray worker died and its retries are spent: "
                                f"{type(exc).__name__}: {exc}",
                                "rerun: every finished measurement is reused from the cache"
                                ) from None


def attach(ray: Any, context: Any, max_retries: int) -> RayMeasurements:
    """Have ``context``'s measurer run its measurements as Ray tasks."""
    executor = RayMeasurements(ray, context, max_retries)
    context.measurer.executor = executor
    return executor


def bisection_points(lo: int, hi: int, levels: int) -> list[int]:
    """The prefix lengths a bisection between ``lo`` (within) and ``hi`` (not) may measure in
    its next ``levels`` steps, the next step's first: the speculation that lets ``width``
    workers take ``log2(width + 1)`` steps in the time of one."""
    points: list[int] = []
    spans = [(lo, hi)]
    for _ in range(levels):
        following: list[tuple[int, int]] = []
        for a, b in spans:
            if b - a > 1:
                mid = (a + b) // 2
                points.append(mid)
                following += [(a, mid), (mid, b)]
        spans = following
    return points


def levels(width: int) -> int:
    """Bisection steps that ``width`` measurements at once cover: floor(log2(width + 1))."""
    return max(1, (max(1, width) + 1).bit_length() - 1)


def speculate_bisection(search: Any, subset: str, order: Sequence[str], lo: int, hi: int,
                        whole: bool = False) -> None:
    """Before a bisection step over the prefixes of ``order`` between ``lo`` (within) and
    ``hi`` (not): have ``search`` prefetch the prefixes its next steps may measure, as many as
    its workers take at once. ``whole``: the whole ``order`` is measured first (the bisection
    only follows when it is not within)."""
    width = int(search.width)
    if width <= 1:  # nothing to run beside the next measurement
        return
    points = [len(order), *bisection_points(lo, hi, levels(width - 1))] if whole else \
        bisection_points(lo, hi, levels(width))
    search.prefetch(subset, [list(order[:m]) for m in points])
