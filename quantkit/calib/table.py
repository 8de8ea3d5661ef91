"""CalibrationTable: the amax of every calibrated tensor, how it was computed and from what."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantkit.artifacts import atomic_write_json
from quantkit.errors import QuantkitError

TABLE_FORMAT = "quantkit-calibration-table"
TABLE_VERSION = 1
INT8_MAX = 127.0
WEIGHTS_FILE = "weights.npz"  # GPTQ int8 weights beside table.json (quantkit.calib.gptq)
# a calibration directory (quantkit calibrate) holds the table and the same scales as a cache
TABLE_FILE = "table.json"
CACHE_BESIDE = "calibration.cache"


@dataclass
class CalibrationTable:
    """Per-tensor symmetric INT8 ranges. ``scale(name) = amax / 127``.

    ``skipped`` lists tensors that were looked at but have no range, with the reason (attention
    masks, constants, ...); a consumer must keep those in floating point. ``weights`` holds
    int8 weights computed with the calibration data (GPTQ, ``quantkit.calib.gptq``) by weight
    key; INT8 builds use them instead of rounding the FP32 weights to nearest. They are stored
    in ``weights.npz`` beside the table's JSON. ``data`` (and ``tuning_data`` for a table
    autotune wrote) say which text the ranges came from; engines record both, so evaluation can
    refuse text that calibration or tuning already read (``quantkit.text_roles``).
    """

    method: str
    params: dict[str, Any] = field(default_factory=dict)
    amax: dict[str, float] = field(default_factory=dict)
    model_hash: str | None = None
    data: dict[str, Any] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    num_samples: int = 0
    num_tokens: int = 0
    weights: dict[str, Any] | None = None  # weight key -> gptq.QuantizedWeight
    # the text autotune tuned this table's per-tensor methods on (``TuneContext.data``); empty
    # for a table straight from ``quantkit calibrate``, whose own text is ``data``
    tuning_data: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, value in self.amax.items():
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise QuantkitError(f"calibration table: amax of '{name}' is {value!r}",
                                    "every amax must be a finite number > 0")
        both = sorted(set(self.amax) & set(self.skipped))
        if both:
            raise QuantkitError(f"calibration table: {both[0]!r} is both calibrated and skipped")

    def scale(self, name: str) -> float:
        """The INT8 scale of a tensor (amax / 127)."""
        try:
            return self.amax[name] / INT8_MAX
        except KeyError:
            hint = f"it was skipped: {self.skipped[name]}" if name in self.skipped else None
            raise QuantkitError(f"tensor '{name}' is not in the calibration table", hint) from None

    def __contains__(self, name: object) -> bool:
        return name in self.amax

    def __len__(self) -> int:
        return len(self.amax)

    # ------------------------------------------------------------------ checks
    def check_model(self, model_hash: str | None) -> None:
        """Raise unless the table was computed for the model with this hash."""
        if self.model_hash is None or model_hash is None:
            return
        if model_hash != self.model_hash:
            raise QuantkitError(
                "the calibration table was computed for a different model "
                f"(table: {self.model_hash[:12]}, model: {model_hash[:12]})",
                "recalibrate for this model (quantkit calibrate)",
            )

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": TABLE_FORMAT,
            "version": TABLE_VERSION,
            "method": self.method,
            "params": dict(self.params),
            "model_hash": self.model_hash,
            "data": dict(self.data),
            "num_samples": int(self.num_samples),
            "num_tokens": int(self.num_tokens),
            "amax": {k: float(v) for k, v in self.amax.items()},
            "skipped": dict(self.skipped),
            **({"weights": WEIGHTS_FILE} if self.weights else {}),
            **({"tuning_data": dict(self.tuning_data)} if self.tuning_data else {}),
        }

    @classmethod
    def from_dict(cls, data: Any, source: str = "calibration table") -> CalibrationTable:
        if not isinstance(data, dict) or data.get("format") != TABLE_FORMAT:
            raise QuantkitError(f"{source} is not a quantkit calibration table",
                                f"expected a JSON object with \"format\": \"{TABLE_FORMAT}\"")
        version = data.get("version")
        if version != TABLE_VERSION:
            raise QuantkitError(f"{source} has table version {version!r}; this quantkit reads "
                                f"version {TABLE_VERSION}", "recalibrate with this quantkit")
        try:
            amax = data["amax"]
            skipped = data.get("skipped", {})
            if not isinstance(amax, dict) or not isinstance(skipped, dict):
                raise TypeError("'amax' and 'skipped' must be objects")
            return cls(
                method=str(data["method"]),
                params=dict(data.get("params") or {}),
                amax={str(k): _as_float(v, k) for k, v in amax.items()},
                model_hash=data.get("model_hash"),
                data=dict(data.get("data") or {}),
                skipped={str(k): str(v) for k, v in skipped.items()},
                num_samples=int(data.get("num_samples", 0)),
                num_tokens=int(data.get("num_tokens", 0)),
                tuning_data=dict(data.get("tuning_data") or {}),
            )
        except QuantkitError as exc:
            raise QuantkitError(f"{source}: {exc.message}", exc.hint) from None
        except (KeyError, TypeError, ValueError) as exc:
            raise QuantkitError(f"{source} is malformed: {exc}") from None

    def save(self, path: Path) -> None:
        if self.weights:
            from quantkit.calib.gptq import save_weights

            save_weights(Path(path).parent / WEIGHTS_FILE, self.weights)
        atomic_write_json(Path(path), self.to_dict())

    @classmethod
    def load(cls, path: Path) -> CalibrationTable:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise QuantkitError(f"calibration table {path} does not exist") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise QuantkitError(f"cannot read calibration table {path}: {exc}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise QuantkitError(f"{path} is not valid JSON: {exc}",
                                "was it written by quantkit calibrate?") from None
        table = cls.from_dict(data, source=str(path))
        if isinstance(data, dict) and data.get("weights"):
            from quantkit.calib.gptq import load_weights

            beside = path.parent / str(data["weights"])
            if not beside.is_file():
                raise QuantkitError(f"calibration table {path} names its int8 weights "
                                    f"{beside.name}, which is not beside it",
                                    "copy the whole calibration directory, or recalibrate")
            table.weights = load_weights(beside)
        if path.name == TABLE_FILE and (path.parent / CACHE_BESIDE).exists():
            check_cache_beside(path, table)
        return table


def check_cache_beside(path: Path, table: CalibrationTable) -> None:
    """Refuse a calibration directory whose ``calibration.cache`` is corrupt or does not hold
    ``table``'s scales.

    Checked by design, not ignored: quantkit's own builds make TensorRT caches from the table,
    but the cache beside it is what users hand to other TensorRT tools (``trtexec --calib``), so a
    damaged or stale one would go unnoticed until an engine came out wrong. A table without a
    cache beside it is fine."""
    from quantkit.calib.trt_cache import TrtCache, table_to_trt_cache

    cache_path = path.parent / CACHE_BESIDE
    hint = ("recalibrate, or delete it: quantkit builds its TensorRT caches from the table; "
            "only other tools read this file")
    try:
        cache = TrtCache.read(cache_path)
    except OSError as exc:
        raise QuantkitError(f"cannot read {cache_path}: {exc.strerror or exc}", hint) from None
    except QuantkitError as exc:  # its message names the file and the damage
        raise QuantkitError(f"damaged calibration cache beside {path.name}: {exc.message}",
                            hint) from None
    expected = table_to_trt_cache(table, cache.version).scales
    differ = sorted(n for n in expected.keys() | cache.scales.keys()
                    if expected.get(n) != cache.scales.get(n))
    if differ:
        raise QuantkitError(
            f"{cache_path} does not match {path.name} beside it: {len(differ)} of "
            f"{len(expected)} tensor scales differ or are missing (e.g. {differ[0]!r})", hint)


def _as_float(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"amax of '{name}' is not a number: {value!r}")
    return float(value)
