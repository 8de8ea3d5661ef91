"""Evaluation: sliding-window perplexity and latency of engines, and the results file.

* ``perplexity``: the Hugging Face perplexity-guide method over an engine's ``nll`` or ``logits``.
* ``latency``: warm-up + timed iterations over a batch x sequence grid; peak memory.
* ``results``: the versioned ``results.json`` schema (``quantkit.results/1``), writer and reader.
* ``engines``: loading engine directories and checking they can be compared and run.
* ``evaluate``: ``evaluate_engines`` runs all of it for ``quantkit eval``.

Importing this package imports numpy only; engines, tokenizers and rich load when used.
"""

from quantkit.eval.engines import load_engines
from quantkit.eval.evaluate import EvalConfig, evaluate_engines
from quantkit.eval.latency import GridPoint, LatencyPoint, measure_latency, parse_grid
from quantkit.eval.perplexity import (
    PerplexityResult,
    evaluate_perplexity,
    plan_windows,
    tokenize_text,
)
from quantkit.eval.results import SCHEMA, EngineResult, EvalResults, load_results, write_results

__all__ = [
    "SCHEMA",
    "EngineResult",
    "EvalConfig",
    "EvalResults",
    "GridPoint",
    "LatencyPoint",
    "PerplexityResult",
    "evaluate_engines",
    "evaluate_perplexity",
    "load_engines",
    "load_results",
    "measure_latency",
    "parse_grid",
    "plan_windows",
    "tokenize_text",
    "write_results",
]
