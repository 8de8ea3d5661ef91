"""The results file: schema, deltas, round trip, and the reader's errors."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from quantkit.errors import QuantkitError
from quantkit.eval.latency import LatencyPoint
from quantkit.eval.results import (
    SCHEMA,
    Delta,
    EngineResult,
    EvalResults,
    load_results,
    with_deltas,
    write_results,
)


def engine(name: str, precision: str, perplexity: float) -> EngineResult:
    return EngineResult(
        name=name, path=f"/engines/{name}", backend="onnxruntime", precision=precision,
        int8_coverage=0.0 if precision == "fp32" else 0.9, source_model_hash="abc",
        size_bytes=1000, perplexity=perplexity, nll_mean=1.0, nll_sum=10.0, num_scored_tokens=10,
        eval_output="nll", eval_batch_size=1, eval_seconds=1.0, eval_tokens_per_s=10.0,
        delta_vs_fp32=None, delta_vs_fp16=None,
        latency=(LatencyPoint(1, 128, 2, 10, 5.0, 6.0, 7.0, 5.5, 4.0, 8.0, 23272.7),),
        peak_rss_bytes=10, rss_baseline_bytes=5, peak_rss_delta_bytes=5,
        peak_rss_method="VmHWM", runner={"threads": 2},
    )


def results(*engines: EngineResult) -> EvalResults:
    filled, reference = with_deltas(engines)
    return EvalResults(
        created="2025-01-01T00:00:00+00:00",
        commands=("quantkit eval --engine a --out r.json",),
        environment={"python": "3.11", "platform": "linux", "cpu": "x", "cpu_count": 2,
                     "libraries": {"onnxruntime": "1.32.0"}, "commit": None, "gpu": None},
        dataset={"source": {"kind": "local", "name": "t.raw"}, "text_sha256": "t",
                 "tokens_sha256": "k", "tokenizer_sha256": "z", "total_tokens": 100,
                 "num_tokens": 100, "max_length": 10, "stride": 10, "num_windows": 10,
                 "num_scored_tokens": 90, "num_documents": 1, "num_chars": 400,
                 "limit_tokens": None},
        settings={"batch_size": 1, "threads": 2, "warmup": 2, "iterations": 10,
                  "latency_grid": ["1x128"]},
        reference=reference,
        engines=filled,
    )


def test_deltas_against_the_first_fp32_and_fp16() -> None:
    r = results(engine("int8", "int8", 30.0), engine("fp32", "fp32", 25.0),
                engine("fp16", "fp16", 25.5), engine("fp32b", "fp32", 99.0))
    assert r.reference == {"fp32": "fp32", "fp16": "fp16"}
    int8 = r.engine("int8")
    assert int8.delta_vs_fp32 == Delta(abs=pytest.approx(5.0), pct=pytest.approx(20.0))
    assert int8.delta_vs_fp16 is not None and int8.delta_vs_fp16.pct == pytest.approx(
        100 * 4.5 / 25.5)
    assert r.engine("fp32").delta_vs_fp32 == Delta(0.0, 0.0)
    no_refs = results(engine("int8", "int8", 30.0))
    assert no_refs.reference == {"fp32": None, "fp16": None}
    assert no_refs.engines[0].delta_vs_fp32 is None and no_refs.engines[0].delta_vs_fp16 is None


def test_round_trip(tmp_path: Path) -> None:
    r = results(engine("fp32", "fp32", 25.0), engine("int8", "int8", 26.0))
    path = write_results(r, tmp_path / "results.json")
    data = json.loads(path.read_text())
    assert data["schema"] == SCHEMA == "quantkit.results/1"
    assert list(data)[0] == "schema"
    loaded = load_results(path)
    assert loaded == r
    assert loaded.engine("int8").latency_at(1, 128) is not None
    with pytest.raises(QuantkitError, match="already exists"):
        write_results(r, path)
    write_results(r, path, force=True)
    with pytest.raises(QuantkitError, match="no engine 'bf16'"):
        loaded.engine("bf16")


def _broken(mutate: Any) -> dict[str, Any]:
    data = results(engine("fp32", "fp32", 25.0), engine("int8", "int8", 26.0)).to_dict()
    data = copy.deepcopy(json.loads(json.dumps(data)))
    mutate(data)
    return data


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(schema="quantkit.results/2"), "schema 'quantkit.results/2' is not"),
        (lambda d: d.update(schema="other"), "not a quantkit results file"),
        (lambda d: d.pop("environment"), "environment is missing"),
        (lambda d: d["engines"][1]["latency"][0].update(p50_ms="fast"),
         r"engines\[1\]\.latency\[0\]\.p50_ms: expected a number"),
        (lambda d: d["engines"][0].pop("perplexity"), r"engines\[0\]\.perplexity is missing"),
        (lambda d: d["engines"][0].update(perplexity=0.5), "expected at least 1"),
        (lambda d: d["engines"][0].update(size_bytes=True), "size_bytes: expected an integer"),
        (lambda d: d["engines"][0].update(eval_output="probs"),
         "expected 'nll', 'logits' or 'decode'"),
        (lambda d: d["engines"][1].update(name="fp32"), "duplicate names fp32"),
        (lambda d: d["reference"].update(fp32="gone"), "reference.fp32: no engine named 'gone'"),
        (lambda d: d.update(engines=[]), "at least one engine"),
        (lambda d: d["dataset"].update(num_tokens=-1), "dataset.num_tokens: expected at least 1"),
        (lambda d: d["engines"][0].update(delta_vs_fp32={"abs": 1}), "delta_vs_fp32.pct is"),
    ],
)
def test_reader_names_the_bad_key(tmp_path: Path, mutate: Any, message: str) -> None:
    path = tmp_path / "results.json"
    path.write_text(json.dumps(_broken(mutate)))
    with pytest.raises(QuantkitError, match=message) as info:
        load_results(path)
    assert str(path) in str(info.value)


def test_reader_errors_for_missing_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(QuantkitError, match="does not exist"):
        load_results(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(QuantkitError, match="not valid JSON"):
        load_results(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(QuantkitError, match="expected an object"):
        load_results(tmp_path / "list.json")


def test_writer_refuses_invalid_results(tmp_path: Path) -> None:
    bad = results(engine("fp32", "fp32", 25.0), engine("fp32", "int8", 26.0))
    with pytest.raises(QuantkitError, match="duplicate names"):
        write_results(bad, tmp_path / "r.json")
    assert not (tmp_path / "r.json").exists()
