"""ActivationStats: per-tensor |x| histograms collected over the calibration data, and
``calibrate()``, which turns them into a CalibrationTable with any registered algorithm."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from quantkit.artifacts import atomic_write_bytes
from quantkit.calib.algorithms import compute_amax, get_algorithm
from quantkit.calib.histogram import StreamingHistogram
from quantkit.calib.table import CalibrationTable
from quantkit.errors import QuantkitError

STATS_FORMAT = "quantkit-activation-stats"
STATS_VERSION = 1


@dataclass
class ActivationStats:
    """Histograms by tensor name. Tensors that hold the same values (a Reshape of another, ...)
    share one histogram object; ``aliases`` maps such a tensor to the one it was measured on."""

    histograms: dict[str, StreamingHistogram]
    skipped: dict[str, str] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)
    num_batches: int = 0
    num_samples: int = 0
    num_tokens: int = 0
    tensors: str = "all"
    num_bins: int = 2048
    model_hash: str | None = None
    data: dict[str, Any] = field(default_factory=dict)
    # The most bytes of activations (fetched outputs plus values passed between segments) alive
    # at one time during collection: the memory bound the collector kept.
    peak_activation_bytes: int = 0

    def unique_histograms(self) -> dict[str, StreamingHistogram]:
        """One entry per distinct histogram object, keyed by the first tensor that has it."""
        seen: dict[int, str] = {}
        out: dict[str, StreamingHistogram] = {}
        for name, hist in self.histograms.items():
            if id(hist) not in seen:
                seen[id(hist)] = name
                out[name] = hist
        return out

    @property
    def nbytes(self) -> int:
        """Size of the histogram state: what grows, if anything, with more data."""
        return sum(h.nbytes for h in self.unique_histograms().values())

    # ------------------------------------------------------------------ (de)serialisation
    def _meta(self) -> dict[str, Any]:
        return {
            "format": STATS_FORMAT, "version": STATS_VERSION, "tensors": self.tensors,
            "num_bins": self.num_bins, "model_hash": self.model_hash, "data": self.data,
            "num_batches": self.num_batches, "num_samples": self.num_samples,
            "num_tokens": self.num_tokens, "skipped": self.skipped, "aliases": self.aliases,
            "peak_activation_bytes": self.peak_activation_bytes,
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form; histograms that several tensors share appear once."""
        unique = self.unique_histograms()
        first = {id(h): name for name, h in unique.items()}
        return {**self._meta(),
                "histograms": {name: h.to_dict() for name, h in unique.items()},
                "shared": {name: first[id(h)] for name, h in self.histograms.items()
                           if first[id(h)] != name}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ActivationStats:
        _check_meta(data, "activation stats")
        hists = {name: StreamingHistogram.from_dict(h) for name, h in data["histograms"].items()}
        for name, owner in data.get("shared", {}).items():
            hists[name] = hists[owner]
        return cls._from_meta(data, hists)

    @classmethod
    def _from_meta(cls, meta: dict[str, Any], hists: dict[str, StreamingHistogram]
                   ) -> ActivationStats:
        return cls(
            histograms=hists, skipped=dict(meta.get("skipped", {})),
            aliases=dict(meta.get("aliases", {})), num_batches=int(meta["num_batches"]),
            num_samples=int(meta["num_samples"]), num_tokens=int(meta["num_tokens"]),
            tensors=str(meta["tensors"]), num_bins=int(meta["num_bins"]),
            model_hash=meta.get("model_hash"), data=dict(meta.get("data") or {}),
            peak_activation_bytes=int(meta.get("peak_activation_bytes", 0)),
        )

    def save(self, path: Path) -> None:
        """Compressed ``.npz``: one int64 counts array per distinct histogram plus JSON metadata
        (no pickles)."""
        unique = self.unique_histograms()
        first = {id(h): name for name, h in unique.items()}
        records = []
        arrays: dict[str, np.ndarray] = {}
        for i, (name, hist) in enumerate(unique.items()):
            rec = hist.to_dict()
            del rec["counts"]
            records.append({"name": name, **rec})
            arrays[f"counts_{i}"] = np.asarray(hist.counts)
        meta = {**self._meta(), "records": records,
                "shared": {n: first[id(h)] for n, h in self.histograms.items()
                           if first[id(h)] != n},
                "order": list(self.histograms)}
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)  # type: ignore[arg-type]
        atomic_write_bytes(Path(path), buf.getvalue())

    @classmethod
    def load(cls, path: Path) -> ActivationStats:
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as npz:
                meta = json.loads(npz["meta"].tobytes().decode("utf-8"))
                _check_meta(meta, str(path))
                by_name: dict[str, StreamingHistogram] = {}
                for i, rec in enumerate(meta["records"]):
                    rec = dict(rec)
                    name = rec.pop("name")
                    by_name[name] = StreamingHistogram.from_dict(
                        {**rec, "counts": npz[f"counts_{i}"]})
        except FileNotFoundError:
            raise QuantkitError(f"activation stats {path} do not exist") from None
        except QuantkitError:
            raise
        except Exception as exc:  # zipfile/np.load raise many types on a damaged file
            raise QuantkitError(f"{path} is not a quantkit activation-stats file: {exc}") from None
        hists: dict[str, StreamingHistogram] = {}
        shared = meta.get("shared", {})
        for name in meta.get("order", list(by_name)):
            hists[name] = by_name[shared.get(name, name)]
        return cls._from_meta(meta, hists)


def _check_meta(meta: Any, source: str) -> None:
    if not isinstance(meta, dict) or meta.get("format") != STATS_FORMAT:
        raise QuantkitError(f"{source} is not quantkit activation stats")
    if meta.get("version") != STATS_VERSION:
        raise QuantkitError(f"{source} has stats version {meta.get('version')!r}; this quantkit "
                            f"reads version {STATS_VERSION}")


def calibrate(stats: ActivationStats, method: str = "entropy", **params: Any) -> CalibrationTable:
    """amax for every collected tensor by ``method`` (see ``available_algorithms()``).

    A tensor whose histogram yields no usable range (no nonzero value) is listed in ``skipped``;
    so are the tensors the collector skipped. Shared histograms are computed once.
    """
    algo = get_algorithm(method)
    resolved = algo.resolve_params(params)
    amax: dict[str, float] = {}
    skipped = dict(stats.skipped)
    done: dict[int, float | str] = {}
    for name, hist in stats.histograms.items():
        key = id(hist)
        if key not in done:
            try:
                done[key] = compute_amax(hist, algo, **resolved)
            except ValueError as exc:
                done[key] = f"no range: {exc}"
        result = done[key]
        if isinstance(result, str):
            skipped[name] = result
        else:
            amax[name] = result
    if not amax:
        raise QuantkitError("calibration produced no ranges: every tensor was skipped",
                            "check the model and the calibration data")
    return CalibrationTable(
        method=method, params=resolved, amax=amax, model_hash=stats.model_hash,
        data=dict(stats.data), skipped=skipped, num_samples=stats.num_samples,
        num_tokens=stats.num_tokens,
    )
