"""Engine directories for evaluation: loading each one with its tokenizer, naming them, and
refusing before anything runs what cannot be compared or run (engines of different models,
tokenizers, vocabularies or KV-cache layouts; shapes outside a TensorRT optimization profile),
and the texts each engine's ranges came from.

Kept apart from the evaluation run (:mod:`quantkit.eval.evaluate`): what an engine directory
holds and whether a set of them belongs together does not depend on how they are then measured.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantkit.errors import QuantkitError


@dataclass
class EngineInfo:
    """An engine directory checked for evaluation, with its tokenizer."""

    name: str
    engine: Any  # quantkit.backends.base.Engine
    tokenizer: Any = field(repr=False)
    tokenizer_sha256: str

    @property
    def manifest(self) -> Any:
        return self.engine.manifest

    @property
    def max_positions(self) -> int | None:
        value = self.manifest.get("max_positions")
        return int(value) if isinstance(value, int) else None

    @property
    def vocab_size(self) -> int | None:
        value = self.manifest.get("vocab_size")
        return int(value) if isinstance(value, int) else None

    @property
    def cache_layout(self) -> Any:
        """The KV-cache layout of a cache engine, else None."""
        from quantkit.export_cache import CacheLayout

        cache = self.manifest.get("cache")
        return CacheLayout.from_dict(cache) if cache else None


def load_engine_info(path: Path) -> tuple[Any, Any, str]:
    """(Engine, tokenizer, tokenizer fingerprint) of an engine directory, or QuantkitError."""
    from quantkit.backends.base import Engine
    from quantkit.models import load_tokenizer, tokenizer_fingerprint

    path = Path(path)
    if not path.is_dir():
        raise QuantkitError(f"engine directory {path} does not exist")
    try:
        engine = Engine.load(path)
    except QuantkitError as exc:
        raise QuantkitError(
            f"{path} is not an engine: {exc.message}", "build one with 'quantkit build'"
        ) from None
    missing = [k for k in ("backend", "precision", "source_model_hash")
               if not engine.manifest.get(k)]
    if missing:
        raise QuantkitError(f"engine {path} has an incomplete manifest (no {', '.join(missing)})")
    tok_dir = engine.manifest.get("tokenizer")
    if not tok_dir or not (path / str(tok_dir)).is_dir():
        raise QuantkitError(
            f"engine {path} has no tokenizer",
            "build it from an export made by 'quantkit export', which saves the tokenizer",
        )
    tokenizer = load_tokenizer(path / str(tok_dir))
    return engine, tokenizer, tokenizer_fingerprint(tokenizer)


def engine_names(paths: Sequence[Path]) -> list[str]:
    names: list[str] = []
    for path in paths:
        base = Path(path).resolve().name or "engine"
        name, k = base, 2
        while name in names:
            name, k = f"{base}-{k}", k + 1
        names.append(name)
    return names


def load_engines(paths: Sequence[Path], names: Sequence[str] | None = None
                 ) -> list[EngineInfo]:
    """Load and cross-check the engines of one run (same model, same tokenizer); ``names``
    label them (default: their directory names)."""
    if not paths:
        raise QuantkitError("no engine given", "pass --engine DIR (one or more)")
    resolved = [Path(p).resolve() for p in paths]
    for i, p in enumerate(resolved):
        if p in resolved[:i]:
            raise QuantkitError(f"engine {paths[i]} is given twice")
    infos = []
    labels = list(names) if names is not None else engine_names(paths)
    if len(set(labels)) != len(paths):
        raise QuantkitError("each engine needs its own name", f"got {', '.join(labels)}")
    for name, path in zip(labels, paths, strict=True):
        engine, tokenizer, fingerprint = load_engine_info(Path(path))
        infos.append(EngineInfo(name, engine, tokenizer, fingerprint))
    check_compatible(infos)
    return infos


def engine_text_roles(name: str, manifest: Mapping[str, Any]) -> list[Any]:
    """The texts an engine's ranges came from: its table's calibration (and tuning) text, or the
    text TensorRT's own calibrator read (implicit INT8)."""
    from dataclasses import replace

    from quantkit.text_roles import role_text

    recorded = dict(manifest.get("text_roles") or {})
    if manifest.get("calibration_data"):
        recorded.setdefault("calibration", manifest["calibration_data"])
    roles = []
    for role in ("calibration", "tuning"):
        text = role_text(role, recorded.get(role))
        if text is not None:
            roles.append(replace(text, owner=name))
    return roles


def check_compatible(infos: Sequence[EngineInfo]) -> None:
    """Refuse to compare engines of different models, tokenizers or vocabularies, or KV-cache
    engines with full-sequence ones."""
    first = infos[0]
    for other in infos[1:]:
        if (first.cache_layout is None) != (other.cache_layout is None):
            cache, plain = (first, other) if first.cache_layout else (other, first)
            raise QuantkitError(
                f"engine {cache.name} is a KV-cache engine and {plain.name} a full-sequence one",
                "evaluate engines built from the --with-cache export in one run and engines of "
                "the plain export in another")
        if first.cache_layout != other.cache_layout:
            raise QuantkitError(f"engines {first.name} and {other.name} have different KV-cache "
                                "layouts", "compare engines built from one export in one run")
        a, b = first.manifest["source_model_hash"], other.manifest["source_model_hash"]
        if a != b:
            raise QuantkitError(
                f"engines {first.name} and {other.name} were built from different models "
                f"(source model {str(a)[:12]} vs {str(b)[:12]})",
                "compare engines built from one export in one run",
            )
        if first.tokenizer_sha256 != other.tokenizer_sha256:
            raise QuantkitError(
                f"engines {first.name} and {other.name} have different tokenizers",
                "compare engines built from one export in one run",
            )
        if first.vocab_size != other.vocab_size:
            raise QuantkitError(
                f"engines {first.name} and {other.name} have different vocabulary sizes "
                f"({first.vocab_size} vs {other.vocab_size})"
            )


def shape_limits(manifest: Any) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """(min, max) of (batch, seq) an engine accepts, for engines built with fixed shape ranges
    (TensorRT optimization profiles; the runner uses profile 0 by default), else None."""
    profiles = (manifest.get("tensorrt") or {}).get("profiles") if manifest else None
    if not profiles:
        return None
    first = profiles[0]
    return (int(first["min"][0]), int(first["min"][1])), (int(first["max"][0]),
                                                          int(first["max"][1]))


def check_shapes(name: str, manifest: Any, shapes: Sequence[tuple[int, int]]) -> None:
    """Refuse before any engine runs if a (batch, seq) of this run is outside the shape range
    of engine ``name`` (its manifest)."""
    limits = shape_limits(manifest)
    if limits is None:
        return
    (min_b, min_s), (max_b, max_s) = limits
    outside = sorted({(b, s) for b, s in shapes
                      if not (min_b <= b <= max_b and min_s <= s <= max_s)})
    if outside:
        listed = ", ".join(f"{b}x{s}" for b, s in outside)
        raise QuantkitError(
            f"engine {name} accepts batch {min_b}..{max_b} x seq {min_s}..{max_s} "
            f"(optimization profile 0); this run needs {listed}",
            "change --max-length, --batch-size or --latency-grid, or rebuild the engine with a "
            "wider profile",
        )


__all__ = [
    "EngineInfo",
    "check_compatible",
    "check_shapes",
    "engine_names",
    "engine_text_roles",
    "load_engine_info",
    "load_engines",
    "shape_limits",
]
