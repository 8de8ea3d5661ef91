"""Fixed evaluation subsets and cached perplexity measurements of probe configurations.

The evaluation text is tokenized once and cut into consecutive windows of ``max_length`` tokens;
a seeded permutation assigns them to named, disjoint subsets (``search`` and ``holdout``). A
subset is scored window by window (each scores all of its tokens but the first, exactly as
``quantkit eval`` does with ``stride == max_length``), and each window's mean NLL is kept: the
search tells a plan's increase from the spread of that increase between windows.

Every measurement (subset, INT8 groups, per-tensor method overrides) is cached in one JSON file
per probe key (the model, table, stats, groups and windows it depends on), written atomically
after each new measurement: a rerun or an interrupted search costs no repeated model runs.

With an ``executor`` (``quantkit.tune.ray_measure``: Ray tasks), ``prefetch`` measures several
independent configurations side by side and the cache takes each as it comes back (written here,
by the driver, only); the search then reads them in its own order. A prefetched measurement
counts as a model run (``cached`` False) the first time it is read, as it would have serially,
so the search's path and its counts are the same either way.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from quantkit.artifacts import atomic_write_json, sha256_json
from quantkit.errors import QuantkitError
from quantkit.eval.perplexity import evaluate_perplexity

CACHE_SCHEMA = "quantkit.tune-cache/2"  # 2: mean NLL per window


def choose_windows(ids: np.ndarray, max_length: int, counts: Mapping[str, int],
                   seed: int) -> dict[str, np.ndarray]:
    """Disjoint subsets of whole windows: name -> the subset's token ids, windows back to back."""
    need = sum(counts.values())
    available = int(ids.shape[0]) // max_length
    if available < need:
        raise QuantkitError(
            f"the evaluation text has {int(ids.shape[0])} tokens, {available} window(s) of "
            f"{max_length}; the subsets need {need}",
            "use more text (--dataset/--split/--limit-tokens), fewer windows or a shorter "
            "--max-length",
        )
    windows = np.asarray(ids[: available * max_length], dtype=np.int64).reshape(available,
                                                                                max_length)
    order = np.random.default_rng(seed).permutation(available)
    out: dict[str, np.ndarray] = {}
    start = 0
    for name, count in counts.items():
        picked = np.sort(order[start : start + count])
        out[name] = windows[picked].reshape(-1)
        start += count
    return out


Request = tuple[str, tuple[str, ...], dict[str, float]]  # subset, INT8 groups, amax overrides


class Executor(Protocol):
    """Where measurements run besides this process (``quantkit.tune.ray_measure``)."""

    width: int  # measurements it runs at once

    def run(self, requests: Sequence[Request], stop: Callable[[], bool] | None = None,
            ) -> Iterator[tuple[int, dict[str, Any] | QuantkitError]]:
        """(index into ``requests``, ``score``'s result or the error it raised) as each
        finishes; no request is started once ``stop()`` says so."""
        ...


def score(probe: Any, ids: np.ndarray, max_length: int, batch_size: int,
          groups: Sequence[str], amax: Mapping[str, float]) -> dict[str, Any]:
    """One measurement: the probe configured with ``groups`` in INT8 and the ranges ``amax``
    (overrides of its table's), scored window by window on ``ids``. Plain data (it crosses
    Ray's wire); the same function here and on a Ray worker, so the numbers are the same."""
    probe.configure(groups, dict(amax))
    started = time.perf_counter()
    windows = [evaluate_perplexity(probe, ids[i : i + max_length], max_length, max_length,
                                   batch_size)
               for i in range(0, len(ids) - max_length + 1, max_length)]
    nll_sum = sum(w.nll_sum for w in windows)
    count = sum(w.num_scored_tokens for w in windows)
    perplexity = math.exp(nll_sum / count)
    if not math.isfinite(perplexity):
        raise QuantkitError("a probe configuration gave a non-finite perplexity")
    return {"perplexity": perplexity, "nll_sum": nll_sum, "num_scored_tokens": count,
            "window_nll": [w.nll_sum / w.num_scored_tokens for w in windows],
            "seconds": time.perf_counter() - started, "windows": len(windows)}


@dataclass(frozen=True)
class Measurement:
    subset: str
    groups: tuple[str, ...]
    methods: tuple[tuple[str, str], ...]  # (tensor, method) overrides, sorted
    perplexity: float
    nll_sum: float
    num_scored_tokens: int
    cached: bool
    window_nll: tuple[float, ...] = ()  # mean NLL of each window, in the subset's order


class Measurer:
    """Perplexity of probe configurations on the subsets, cached.

    ``tables`` maps a calibration method to its amax per tensor (the base method first); an
    override ``tensor -> method`` takes that tensor's range from the method's table."""

    def __init__(self, probe: Any, subsets: Mapping[str, np.ndarray], max_length: int,
                 batch_size: int, tables: Mapping[str, Mapping[str, float]],
                 cache_path: Path | None, key_inputs: Mapping[str, Any]) -> None:
        self.probe = probe
        self.subsets = dict(subsets)
        self._subset_keys = {name: hashlib.sha256(np.ascontiguousarray(ids, np.int64).tobytes())
                             .hexdigest() for name, ids in self.subsets.items()}
        self.max_length = max_length
        self.batch_size = batch_size
        self.tables = {k: dict(v) for k, v in tables.items()}
        self.base_method = next(iter(self.tables))
        self.key = sha256_json(dict(key_inputs))
        self.cache_path = cache_path
        self.runs = 0  # measurements that ran the model (not cached), counted when read
        self.executed = 0  # measurements this measurer ran or had run (read or not)
        self.executor: Executor | None = None  # runs measurements elsewhere (Ray), see prefetch
        self._fresh: set[str] = set()  # prefetched in this process and not read yet
        self._failed: dict[str, QuantkitError] = {}  # prefetched measurements that raised
        self._run_seconds = 0.0  # time of those runs ...
        self._run_windows = 0  # ... and the windows they scored
        self._cache: dict[str, dict[str, Any]] = {}
        if cache_path is not None and cache_path.is_file():
            try:
                data = json.loads(cache_path.read_text(encoding="utf-8"))
                if data.get("schema") == CACHE_SCHEMA and data.get("key") == self.key:
                    self._cache = dict(data.get("measurements", {}))
            except (OSError, ValueError):
                self._cache = {}

    def window_seconds(self) -> float | None:
        """Mean seconds of one window of ``max_length`` tokens in the runs so far (None before
        the first run): what time limits are planned with."""
        return self._run_seconds / self._run_windows if self._run_windows else None

    def amax_for(self, methods: Mapping[str, str]) -> dict[str, float]:
        """The ranges of the overridden tensors."""
        out: dict[str, float] = {}
        for tensor, method in methods.items():
            try:
                out[tensor] = self.tables[method][tensor]
            except KeyError:
                raise QuantkitError(f"no {method} range for {tensor}") from None
        return out

    def _request(self, subset: str, groups: Iterable[str],
                 methods: Mapping[str, str] | None) -> tuple[str, Request]:
        """The cache key of a measurement and what running it needs."""
        chosen = tuple(sorted(set(groups)))
        overrides = tuple(sorted((methods or {}).items()))
        key = sha256_json({"tokens": self._subset_keys[subset], "groups": chosen,
                           "methods": overrides})
        return key, (subset, chosen, self.amax_for(dict(overrides)))

    def _store(self, key: str, result: Mapping[str, Any]) -> None:
        """A new measurement into the cache, and the cache onto disk (atomically)."""
        self._run_seconds += float(result["seconds"])
        self._run_windows += int(result["windows"])
        self.executed += 1
        self._cache[key] = {k: result[k] for k in ("perplexity", "nll_sum",
                                                   "num_scored_tokens", "window_nll")}
        if self.cache_path is not None:
            atomic_write_json(self.cache_path, {"schema": CACHE_SCHEMA, "key": self.key,
                                                "measurements": self._cache})

    @property
    def unread(self) -> int:
        """Prefetched measurements not read (yet): speculation the search did not need."""
        return len(self._fresh)

    def cached(self, subset: str, groups: Iterable[str],
               methods: Mapping[str, str] | None = None) -> bool:
        """Whether ``measure`` would read this from the cache (no model run)."""
        return self._request(subset, groups, methods)[0] in self._cache

    def prefetch(self, wanted: Iterable[tuple[str, Iterable[str], Mapping[str, str] | None]],
                 stop: Callable[[], bool] | None = None,
                 progress: Callable[[int, int], None] | None = None) -> int:
        """Measure the (subset, groups, methods) of ``wanted`` that are not cached, side by side
        on the executor (none: nothing is done, ``measure`` runs them one by one when asked).
        Each result is cached as it arrives; returns how many ran. A measurement that raised
        is not cached: ``measure`` raises its error if the search asks for it (a speculative
        one the search never reads must not stop it)."""
        if self.executor is None:
            return 0
        todo: dict[str, Request] = {}
        for subset, groups, methods in wanted:
            key, request = self._request(subset, groups, methods)
            if key not in self._cache:
                todo.setdefault(key, request)
        keys, requests = list(todo), list(todo.values())
        done = 0
        for index, result in self.executor.run(requests, stop):
            if isinstance(result, QuantkitError):
                self._failed[keys[index]] = result
                continue
            self._store(keys[index], result)
            self._fresh.add(keys[index])
            done += 1
            if progress is not None:
                progress(done, len(requests))
        return done

    def measure(self, subset: str, groups: Iterable[str],
                methods: Mapping[str, str] | None = None) -> Measurement:
        key, (_, chosen, amax) = self._request(subset, groups, methods)
        overrides = tuple(sorted((methods or {}).items()))
        if key not in self._cache:
            if self.executor is not None:
                self.prefetch([(subset, chosen, methods)])
                if key in self._failed:
                    raise self._failed.pop(key)
            else:
                result = score(self.probe, self.subsets[subset], self.max_length,
                               self.batch_size, chosen, amax)
                self._store(key, result)
                self._fresh.add(key)
        hit = self._cache[key]
        fresh = key in self._fresh
        if fresh:  # run in this process for this read (here, or prefetched): a model run
            self._fresh.discard(key)
            self.runs += 1
        return Measurement(subset, chosen, overrides, float(hit["perplexity"]),
                           float(hit["nll_sum"]), int(hit["num_scored_tokens"]), not fresh,
                           tuple(float(v) for v in hit.get("window_nll", ())))
