"""Evaluation results: the ``results.json`` that ``quantkit eval`` writes and reports read.

Schema ``quantkit.results/1`` (every key below is present; ``null`` only where marked)::

    {
      "schema": "quantkit.results/1",
      "created": "2025-01-01T00:00:00+00:00",          # UTC, ISO 8601
      "commands": ["quantkit eval --engine ... --out results.json"],   # exact command line(s)
      "environment": {                                   # where it was measured
        "python", "platform", "cpu" (model name), "cpu_count",
        "isa": {"arch", "name", "flags", "u8s8_saturates", "source"} (quantkit.environment;
               absent in results written before it was recorded),
        "libraries": {"quantkit", "numpy", "onnx", "onnxruntime", "torch", "transformers",
                      "tensorrt": version or null},
        "commit": git commit of quantkit ("-dirty" if modified) or null,
        "gpu": [{"name", "memory_total_mib", "driver"}] or null (no NVIDIA GPU)
      },
      "dataset": {
        "source": {"kind": "hub"|"local", "name", "config", "split", "column"},
        "split", "num_documents", "num_chars", "joined_with": "\\n\\n" (the separator itself),
        "text_sha256",            # sha256 of the joined text (UTF-8)
        "tokenizer_sha256",       # quantkit.models.tokenizer_fingerprint of the engines' tokenizer
        "add_special_tokens": false,
        "total_tokens",           # tokens of the whole text
        "limit_tokens": int or null,
        "spread": bool,           # (absent in older files) limit_tokens as windows spread
                                  # evenly over the text instead of its first tokens
        "num_tokens",             # tokens evaluated (first limit_tokens of the text)
        "tokens_sha256",          # sha256 of the evaluated ids as little-endian int64
        "max_length", "stride", "num_windows",
        "num_scored_tokens"       # num_tokens - 1 if stride < max_length,
                                  # else num_tokens - num_windows (see quantkit.eval.perplexity)
      },
      "settings": {"batch_size", "threads": int or null (null: every core), "warmup",
                   "iterations", "latency_grid": ["1x128", ...], "latency_seed"},
      "reference": {"fp32": engine name or null, "fp16": engine name or null},
      "engines": [                                       # in the order given, at least one
        {
          "name",                 # unique in the file (the directory name, "-2" etc. if repeated)
          "path", "backend", "precision",            # precision: fp32 | fp16 | int8 | mixed | ...
          "int8_coverage": float or null,             # share of quantizable ops run in INT8
          "source_model_hash", "size_bytes": int or null,
          "perplexity", "nll_mean", "nll_sum", "num_scored_tokens",
          "eval_output": "nll" | "logits" | "decode",  # fused per-token NLL, logits reduced here,
                                  # or a KV-cache engine's last-position logits, token by token
          "eval_batch_size", "eval_seconds", "eval_tokens_per_s",   # whole perplexity loop
          "delta_vs_fp32": {"abs": ppl - ppl_fp32, "pct": 100 * abs / ppl_fp32} or null,
          "delta_vs_fp16": same against the fp16 reference, or null,
          "latency": [{"batch", "seq", "warmup", "iterations", "p50_ms", "p90_ms", "p99_ms",
                       "mean_ms", "min_ms", "max_ms", "tokens_per_s"}],  # [] if no grid
          "peak_rss_bytes": int or null, "rss_baseline_bytes": int or null,
          "peak_rss_delta_bytes": int or null, "peak_rss_method": str,
          "runner": {...},        # Runner.describe(): providers, threads, device, versions
          "generation": {         # KV-cache engines only (absent or null otherwise);
                                  # quantkit.eval.generation defines every number
            "ttft": [{"kind": "prefill", "batch", "tokens" (prompt length), "past": 0,
                      "warmup", "iterations", "p50_ms", "p90_ms", "p99_ms", "mean_ms",
                      "min_ms", "max_ms", "tokens_per_s" (prompt tokens/s)}],
            "decode": [{"kind": "decode", "batch", "tokens": 1, "past" (cache length), ...,
                        "tokens_per_s" (output tokens/s of the batch)}],
            "tokens": [[greedy token ids of each agreement prompt]],
            "agreement": {"reference" (engine name), "prompts", "new_tokens", "positions",
                          "equal", "identical", "token_match", "mean_common_prefix",
                          "identical_share", "first_differences": [int or null per prompt],
                          "teacher_forced_equal", "teacher_forced" (share; both or null)} or null
                          # quantkit.agreement defines them; files of older quantkit lack
                          # positions, equal, identical, first_differences and teacher_forced*
          }
        }
      ]
    }

``settings`` of a run with cache engines also holds ``"generation"``: {"prompt_lengths",
"decode_grid": ["1x128", ...], "dropped": [default points beyond the model's positions],
"warmup", "iterations", "seed", "interleaved": true, "agreement_prompts",
"agreement_prompt_tokens", "agreement_new_tokens", "agreement_offsets"}.

Reference engines are the first engine of precision ``fp32`` (and ``fp16``) in the run; a reference
engine's delta against itself is 0. ``load_results`` checks all of the above and raises
``QuantkitError`` naming the first offending key, e.g. ``engines[1].latency[0].p50_ms``. Readers
should refuse other schema strings; additive, backward-compatible changes keep ``/1``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from quantkit.agreement import Agreement
from quantkit.errors import QuantkitError
from quantkit.eval.generation import GenerationMetrics, StepLatency
from quantkit.eval.latency import LatencyPoint

SCHEMA = "quantkit.results/1"
SCHEMA_PREFIX = "quantkit.results/"


@dataclass(frozen=True)
class Delta:
    abs: float
    pct: float

    @classmethod
    def between(cls, value: float, reference: float) -> Delta:
        diff = value - reference
        return cls(abs=diff, pct=100.0 * diff / reference)


@dataclass(frozen=True)
class EngineResult:
    name: str
    path: str
    backend: str
    precision: str
    int8_coverage: float | None
    source_model_hash: str
    size_bytes: int | None
    perplexity: float
    nll_mean: float
    nll_sum: float
    num_scored_tokens: int
    eval_output: str
    eval_batch_size: int
    eval_seconds: float
    eval_tokens_per_s: float
    delta_vs_fp32: Delta | None
    delta_vs_fp16: Delta | None
    latency: tuple[LatencyPoint, ...]
    peak_rss_bytes: int | None
    rss_baseline_bytes: int | None
    peak_rss_delta_bytes: int | None
    peak_rss_method: str
    runner: dict[str, Any] = field(default_factory=dict)
    # why the engine has no latency: it emulates a precision (FP16 rounding in float32)
    accuracy_only: str | None = None
    # KV-cache engines: generation latency and greedy-token agreement
    generation: GenerationMetrics | None = None

    def latency_at(self, batch: int, seq: int) -> LatencyPoint | None:
        return next((p for p in self.latency if (p.batch, p.seq) == (batch, seq)), None)


@dataclass(frozen=True)
class EvalResults:
    created: str
    commands: tuple[str, ...]
    environment: dict[str, Any]
    dataset: dict[str, Any]
    settings: dict[str, Any]
    reference: dict[str, str | None]
    engines: tuple[EngineResult, ...]
    schema: str = SCHEMA

    def engine(self, name: str) -> EngineResult:
        for eng in self.engines:
            if eng.name == name:
                return eng
        raise QuantkitError(
            f"no engine '{name}' in these results", f"engines: {', '.join(self.names)}"
        )

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.engines]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        ordered = {"schema": data.pop("schema")}
        ordered.update(data)
        ordered["commands"] = list(self.commands)
        for eng, result in zip(ordered["engines"], self.engines, strict=True):
            eng["latency"] = list(eng["latency"])
            eng["generation"] = (None if result.generation is None
                                 else result.generation.to_dict())
        ordered["engines"] = list(ordered["engines"])
        return ordered

    @classmethod
    def from_dict(cls, data: Any) -> EvalResults:
        """Validate and convert; raises QuantkitError naming the first bad key."""
        return _parse_results(data)


def with_deltas(engines: Sequence[EngineResult]) -> tuple[tuple[EngineResult, ...],
                                                           dict[str, str | None]]:
    """Fill ``delta_vs_fp32`` / ``delta_vs_fp16`` from the first engine of each precision."""
    from dataclasses import replace

    refs: dict[str, EngineResult | None] = {
        p: next((e for e in engines if e.precision == p), None) for p in ("fp32", "fp16")
    }
    out = []
    for eng in engines:
        deltas = {
            f"delta_vs_{p}": (Delta.between(eng.perplexity, ref.perplexity) if ref else None)
            for p, ref in refs.items()
        }
        out.append(replace(eng, **deltas))
    return tuple(out), {p: (ref.name if ref else None) for p, ref in refs.items()}


def write_results(results: EvalResults, path: Path, force: bool = False) -> Path:
    """Write atomically; refuse to replace an existing file unless ``force``."""
    from quantkit.artifacts import atomic_write_json, check_can_write

    data = results.to_dict()
    _parse_results(json.loads(json.dumps(data)))  # never write a file the reader rejects
    check_can_write(Path(path), force)
    atomic_write_json(Path(path), data)
    return Path(path)


def load_results(path: Path) -> EvalResults:
    """Read and validate a ``results.json``; errors name the file and the offending key."""
    from quantkit.artifacts import read_json

    path = Path(path)
    data = read_json(path)
    try:
        return _parse_results(data)
    except QuantkitError as exc:
        raise QuantkitError(f"{path}: {exc.message}", exc.hint) from None


# -- validation ------------------------------------------------------------------------------
class _Checker:
    def __init__(self, data: Any, where: str) -> None:
        if not isinstance(data, Mapping):
            raise QuantkitError(f"{where or 'results'}: expected an object, "
                                f"got {type(data).__name__}")
        self.data = data
        self.where = where

    def _path(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def get(self, key: str, kinds: tuple[type, ...], nullable: bool = False,
            what: str | None = None) -> Any:
        if key not in self.data:
            raise QuantkitError(f"{self._path(key)} is missing")
        value = self.data[key]
        if value is None and nullable:
            return None
        ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
        if not ok:
            expected = what or " or ".join(k.__name__ for k in kinds)
            raise QuantkitError(
                f"{self._path(key)}: expected {expected}{' or null' if nullable else ''}, "
                f"got {json.dumps(value)[:60]}"
            )
        return value

    def string(self, key: str, nullable: bool = False) -> Any:
        return self.get(key, (str,), nullable)

    def integer(self, key: str, nullable: bool = False, minimum: int | None = 0) -> Any:
        value = self.get(key, (int,), nullable, "an integer")
        if value is not None and minimum is not None and value < minimum:
            raise QuantkitError(f"{self._path(key)}: expected at least {minimum}, got {value}")
        return value

    def number(self, key: str, nullable: bool = False, finite: bool = True) -> Any:
        value = self.get(key, (int, float), nullable, "a number")
        if value is not None and finite and not math.isfinite(value):
            raise QuantkitError(f"{self._path(key)}: expected a finite number, got {value}")
        return None if value is None else float(value)

    def obj(self, key: str, nullable: bool = False) -> Any:
        value = self.get(key, (dict,), nullable, "an object")
        return None if value is None else _Checker(value, self._path(key))

    def array(self, key: str) -> list[Any]:
        return list(self.get(key, (list,), False, "an array"))


_LATENCY_INTS = ("batch", "seq", "warmup", "iterations")
_LATENCY_FLOATS = ("p50_ms", "p90_ms", "p99_ms", "mean_ms", "min_ms", "max_ms", "tokens_per_s")


def _parse_latency(data: Any, where: str) -> LatencyPoint:
    c = _Checker(data, where)
    ints = {k: c.integer(k) for k in _LATENCY_INTS}
    floats = {k: c.number(k) for k in _LATENCY_FLOATS}
    if ints["batch"] < 1 or ints["seq"] < 1 or ints["iterations"] < 1:
        raise QuantkitError(f"{where}: batch, seq and iterations must be at least 1")
    return LatencyPoint(**ints, **floats)


_STEP_INTS = ("batch", "tokens", "past", "warmup", "iterations")


def _parse_step(data: Any, where: str, kind: str) -> StepLatency:
    c = _Checker(data, where)
    if c.string("kind") != kind:
        raise QuantkitError(f"{where}.kind: expected '{kind}', got '{data['kind']}'")
    ints = {k: c.integer(k) for k in _STEP_INTS}
    floats = {k: c.number(k) for k in _LATENCY_FLOATS}
    if ints["batch"] < 1 or ints["tokens"] < 1 or ints["iterations"] < 1:
        raise QuantkitError(f"{where}: batch, tokens and iterations must be at least 1")
    return StepLatency(kind=kind, **ints, **floats)


def _parse_generation(data: Any, where: str) -> GenerationMetrics:
    c = _Checker(data, where)
    ttft = tuple(_parse_step(x, f"{where}.ttft[{i}]", "prefill")
                 for i, x in enumerate(c.array("ttft")))
    decode = tuple(_parse_step(x, f"{where}.decode[{i}]", "decode")
                   for i, x in enumerate(c.array("decode")))
    rows = c.array("tokens")
    if not all(isinstance(r, list) and all(isinstance(t, int) and not isinstance(t, bool)
                                           for t in r) for r in rows):
        raise QuantkitError(f"{where}.tokens: expected arrays of token ids")
    a = c.obj("agreement", nullable=True)
    agreed = None if a is None else _parse_agreement(a)
    return GenerationMetrics(ttft, decode, tuple(tuple(r) for r in rows), agreed)


def _parse_agreement(a: _Checker) -> Agreement:
    """An engine's agreement (``quantkit.agreement``). Files of older quantkit hold the shares
    without the counts (then derived from the shares: eval's rows are all ``new_tokens`` long),
    the first differences (then None) and the teacher-forced share (then None)."""
    prompts, new_tokens = a.integer("prompts", minimum=1), a.integer("new_tokens", minimum=1)
    shares = {"token_match": a.number("token_match"),
              "identical_share": a.number("identical_share"),
              "teacher_forced": (a.number("teacher_forced", nullable=True)
                                 if "teacher_forced" in a.data else None)}
    for key, share in shares.items():
        if share is not None and not 0.0 <= share <= 1.0:
            raise QuantkitError(f"{a.where}.{key}: a share must be between 0 and 1, got {share}")
    positions = (a.integer("positions", minimum=1) if "positions" in a.data
                 else prompts * new_tokens)

    def count(key: str, share: float | None, total: int) -> int | None:
        if key in a.data:
            return a.integer(key, nullable=True)
        return None if share is None else round(share * total)

    firsts = None
    if a.data.get("first_differences") is not None:
        firsts = tuple(a.array("first_differences"))
        if len(firsts) != prompts or not all(
                f is None or (isinstance(f, int) and not isinstance(f, bool) and f >= 0)
                for f in firsts):
            raise QuantkitError(f"{a.where}.first_differences: expected {prompts} positions "
                                "(integers or null)")
    equal, identical = (count("equal", shares["token_match"], positions),
                        count("identical", shares["identical_share"], prompts))
    if equal is None or identical is None:
        raise QuantkitError(f"{a.where}: equal and identical must be integers")
    agreed = Agreement(a.string("reference"), prompts, new_tokens, positions, equal, identical,
                       a.number("mean_common_prefix"), firsts,
                       count("teacher_forced_equal", shares["teacher_forced"], positions))
    for key, share in shares.items():
        value = getattr(agreed, key)
        if (share is None) != (value is None) or (
                share is not None and value is not None and abs(share - value) > 1e-9):
            raise QuantkitError(f"{a.where}.{key}: {share} does not match the counts ({value})")
    return agreed


def _parse_delta(c: _Checker, key: str) -> Delta | None:
    d = c.obj(key, nullable=True)
    return None if d is None else Delta(abs=d.number("abs"), pct=d.number("pct"))


def _parse_engine(data: Any, where: str) -> EngineResult:
    c = _Checker(data, where)
    output = c.string("eval_output")
    if output not in ("nll", "logits", "decode"):
        raise QuantkitError(
            f"{where}.eval_output: expected 'nll', 'logits' or 'decode', got '{output}'")
    perplexity = c.number("perplexity")
    if perplexity < 1.0:
        raise QuantkitError(f"{where}.perplexity: expected at least 1, got {perplexity}")
    latency = tuple(
        _parse_latency(item, f"{where}.latency[{i}]") for i, item in enumerate(c.array("latency"))
    )
    return EngineResult(
        name=c.string("name"),
        path=c.string("path"),
        backend=c.string("backend"),
        precision=c.string("precision"),
        int8_coverage=c.number("int8_coverage", nullable=True),
        source_model_hash=c.string("source_model_hash"),
        size_bytes=c.integer("size_bytes", nullable=True),
        perplexity=perplexity,
        nll_mean=c.number("nll_mean"),
        nll_sum=c.number("nll_sum"),
        num_scored_tokens=c.integer("num_scored_tokens", minimum=1),
        eval_output=output,
        eval_batch_size=c.integer("eval_batch_size", minimum=1),
        eval_seconds=c.number("eval_seconds"),
        eval_tokens_per_s=c.number("eval_tokens_per_s"),
        delta_vs_fp32=_parse_delta(c, "delta_vs_fp32"),
        delta_vs_fp16=_parse_delta(c, "delta_vs_fp16"),
        latency=latency,
        peak_rss_bytes=c.integer("peak_rss_bytes", nullable=True),
        rss_baseline_bytes=c.integer("rss_baseline_bytes", nullable=True),
        peak_rss_delta_bytes=c.integer("peak_rss_delta_bytes", nullable=True),
        peak_rss_method=c.string("peak_rss_method"),
        runner=dict(c.obj("runner").data),
        accuracy_only=data.get("accuracy_only") if isinstance(data, dict) else None,
        generation=(None if data.get("generation") is None
                    else _parse_generation(data["generation"], f"{where}.generation")),
    )


_DATASET_INTS = ("total_tokens", "num_tokens", "max_length", "stride", "num_windows",
                 "num_scored_tokens", "num_documents", "num_chars")


def _parse_results(data: Any) -> EvalResults:
    c = _Checker(data, "")
    schema = c.string("schema")
    if schema != SCHEMA:
        if schema.startswith(SCHEMA_PREFIX):
            raise QuantkitError(
                f"results schema '{schema}' is not supported (this quantkit reads '{SCHEMA}')",
                "use the quantkit version that wrote it",
            )
        raise QuantkitError(f"not a quantkit results file (schema '{schema}')")
    commands = c.array("commands")
    if not all(isinstance(x, str) for x in commands):
        raise QuantkitError("commands: expected an array of strings")
    env = c.obj("environment")
    for key in ("cpu", "platform", "python"):
        env.string(key)
    env.integer("cpu_count", nullable=True)
    env.obj("libraries")
    env.string("commit", nullable=True)
    env.get("gpu", (list,), nullable=True, what="an array")
    dataset = c.obj("dataset")
    dataset.obj("source")
    for key in ("text_sha256", "tokens_sha256", "tokenizer_sha256"):
        dataset.string(key)
    for key in _DATASET_INTS:
        dataset.integer(key, minimum=1)
    dataset.integer("limit_tokens", nullable=True)
    settings = c.obj("settings")
    for key in ("batch_size", "iterations"):
        settings.integer(key, minimum=1)
    settings.integer("warmup")
    settings.integer("threads", nullable=True, minimum=1)
    settings.array("latency_grid")
    reference = c.obj("reference")
    refs = {p: reference.string(p, nullable=True) for p in ("fp32", "fp16")}
    items = c.array("engines")
    if not items:
        raise QuantkitError("engines: expected at least one engine")
    engines = tuple(_parse_engine(item, f"engines[{i}]") for i, item in enumerate(items))
    names = [e.name for e in engines]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise QuantkitError(f"engines: duplicate names {', '.join(duplicates)}")
    for precision, name in refs.items():
        if name is not None and name not in names:
            raise QuantkitError(f"reference.{precision}: no engine named '{name}'")
    return EvalResults(
        schema=schema,
        created=c.string("created"),
        commands=tuple(commands),
        environment=dict(env.data),
        dataset=dict(dataset.data),
        settings=dict(settings.data),
        reference=refs,
        engines=engines,
    )


__all__ = [
    "SCHEMA",
    "Delta",
    "EngineResult",
    "EvalResults",
    "load_results",
    "with_deltas",
    "write_results",
]
