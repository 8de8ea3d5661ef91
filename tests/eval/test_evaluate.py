"""evaluate_engines end to end on tiny FP32 engines, and every bad input it must refuse."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from quantkit.backends.base import Engine
from quantkit.errors import QuantkitError
from quantkit.eval.engines import load_engines
from quantkit.eval.evaluate import EvalConfig, evaluate_engines
from quantkit.eval.latency import GridPoint
from quantkit.eval.perplexity import evaluate_perplexity
from quantkit.eval.results import load_results, write_results
from tests.eval.engines import copy_with_tokenizer

CONFIG = EvalConfig(
    dataset="sample", split="test", max_length=64, stride=64, limit_tokens=600, batch_size=4,
    latency_grid=(GridPoint(1, 16), GridPoint(2, 32)), warmup=1, iterations=3, threads=1,
)


def test_two_engines_of_one_export(llama_engine: Path, llama_twin_engine: Path,
                                   tmp_path: Path, monkeypatch) -> None:
    def alone(*args, **kwargs):
        raise AssertionError("two engines are timed together, not one after the other")

    monkeypatch.setattr("quantkit.eval.evaluate.measure_latency", alone)
    results = evaluate_engines([llama_engine, llama_twin_engine], CONFIG,
                               command="quantkit eval ...")
    assert results.names == ["llama", "llama-twin"]
    assert results.reference == {"fp32": "llama", "fp16": None}
    data = results.dataset
    assert (data["num_tokens"], data["limit_tokens"], data["max_length"], data["stride"]) == (
        600, 600, 64, 64)
    assert data["total_tokens"] > 600 and data["num_windows"] == 10
    assert data["num_scored_tokens"] == 600 - 10
    assert data["source"]["kind"] == "local" and data["split"] == "test"
    first, twin = results.engines
    # same ONNX, same tokens: the same perplexity, and the direct library call agrees
    assert first.perplexity == pytest.approx(twin.perplexity, rel=1e-9)
    assert twin.delta_vs_fp32 is not None and abs(twin.delta_vs_fp32.pct) < 1e-6
    assert first.delta_vs_fp16 is None
    from quantkit.data import resolve_text_source
    from quantkit.eval.perplexity import tokenize_text
    from quantkit.eval.text import load_evaluation_text
    from quantkit.models import load_tokenizer

    text = load_evaluation_text(resolve_text_source("sample", split="test"))
    ids = tokenize_text(load_tokenizer(llama_engine / "tokenizer"), text.text, 600).ids
    with Engine.load(llama_engine).runner(threads=1) as runner:
        direct = evaluate_perplexity(runner, ids, 64, 64, 4)
    assert first.perplexity == pytest.approx(direct.perplexity, rel=1e-9)
    assert first.num_scored_tokens == 590 and first.eval_output == "nll"
    assert first.eval_batch_size == 4
    manifest = Engine.load(llama_engine).manifest
    assert first.size_bytes == manifest["size_bytes"] > 0
    assert first.source_model_hash == manifest["source_model_hash"]
    assert first.precision == "fp32" and first.int8_coverage == 0.0
    for engine in results.engines:  # both timed, interleaved
        assert [(p.batch, p.seq, p.iterations) for p in engine.latency] == [
            (1, 16, 3), (2, 32, 3)]
    assert first.runner["intra_op_threads"] == 1
    assert first.peak_rss_bytes is not None and first.peak_rss_bytes > 0
    assert results.environment["cpu_count"] and "libraries" in results.environment
    path = write_results(results, tmp_path / "results.json")
    assert load_results(path) == results


def test_spread_scores_windows_from_the_whole_text(llama_engine: Path) -> None:
    """--spread: the same number of windows as the first 600 tokens, cut evenly from the whole
    text, each scored exactly as the direct call scores those pieces."""
    from quantkit.data import resolve_text_source
    from quantkit.eval.perplexity import spread_pieces, tokenize_text
    from quantkit.eval.text import load_evaluation_text
    from quantkit.models import load_tokenizer

    config = dataclasses.replace(CONFIG, spread=True, latency_grid=())
    results = evaluate_engines([llama_engine], config)
    data = results.dataset
    assert data["spread"] is True and data["num_windows"] == 9 and data["num_tokens"] == 9 * 64
    text = load_evaluation_text(resolve_text_source("sample", split="test"))
    all_ids = tokenize_text(load_tokenizer(llama_engine / "tokenizer"), text.text).ids
    ids = spread_pieces(all_ids, 600, 64)
    step = len(all_ids) // 9
    assert list(ids[64:128]) == list(all_ids[step:step + 64])
    assert list(ids[-64:]) == list(all_ids[8 * len(all_ids) // 9:8 * len(all_ids) // 9 + 64])
    with Engine.load(llama_engine).runner(threads=1) as runner:
        direct = evaluate_perplexity(runner, ids, 64, 64, 4)
    assert results.engines[0].perplexity == pytest.approx(direct.perplexity, rel=1e-9)
    first = evaluate_engines([llama_engine], dataclasses.replace(config, spread=False))
    assert first.engines[0].perplexity != pytest.approx(direct.perplexity, rel=1e-6)


def test_spread_pieces_never_overlap_and_stay_inside() -> None:
    import numpy as np

    from quantkit.eval.perplexity import spread_pieces

    ids = np.arange(100)
    assert list(spread_pieces(ids, 30, 10)) == [*range(10), *range(33, 43), *range(66, 76)]
    assert list(spread_pieces(ids, 15, 10)) == list(range(15))  # one piece: the start
    for limit, length in ((99, 33), (64, 8), (50, 25)):
        pieces = spread_pieces(ids, limit, length).reshape(-1, length)
        assert len(pieces) == limit // length and len(set(pieces.ravel())) == pieces.size
        assert all(list(p) == list(range(p[0], p[0] + length)) for p in pieces)


def test_engine_names_are_unique(llama_engine: Path, tmp_path: Path) -> None:
    other = tmp_path / "a" / "llama"
    other.parent.mkdir()
    import shutil

    shutil.copytree(llama_engine, other)
    infos = load_engines([llama_engine, other])
    assert [i.name for i in infos] == ["llama", "llama-2"]


def test_logits_config_matches_fused(llama_engine: Path) -> None:
    config = dataclasses.replace(CONFIG, latency_grid=(), use_nll=False)
    via_logits = evaluate_engines([llama_engine], config).engines[0]
    fused = evaluate_engines([llama_engine], dataclasses.replace(config, use_nll=None)).engines[0]
    assert (via_logits.eval_output, fused.eval_output) == ("logits", "nll")
    assert via_logits.perplexity == pytest.approx(fused.perplexity, rel=1e-5)
    assert via_logits.latency == ()


def other_byte_tokenizer():
    """The byte tokenizer with its ids in reverse order: same vocabulary size, different ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), reverse=True)
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def test_different_models_are_refused(llama_engine: Path, llama_logits_engine: Path) -> None:
    with pytest.raises(QuantkitError, match="llama and llama-logits were built from different "
                                            "models"):
        evaluate_engines([llama_engine, llama_logits_engine], CONFIG)


def test_different_tokenizers_are_refused(llama_engine: Path, tmp_path: Path) -> None:
    other = copy_with_tokenizer(llama_engine, other_byte_tokenizer(), tmp_path / "retok")
    with pytest.raises(QuantkitError, match="llama and retok have different tokenizers"):
        evaluate_engines([llama_engine, other], CONFIG)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"max_length": 512}, "max-length 512 is beyond the model's limit of 256 positions"),
        ({"stride": 65}, "stride 65 is larger than max-length 64"),
        ({"stride": 0}, "stride must be at least 1"),
        ({"latency_grid": (GridPoint(1, 300),)}, "1x300 is beyond the model's limit of 256"),
        ({"batch_size": 0}, "batch-size must be at least 1"),
        ({"limit_tokens": 1}, "limit-tokens must be at least 2"),
        ({"iterations": 0}, "iterations must be at least 1"),
        ({"dataset": "/no/such/file.txt"}, "not found"),
        ({"spread": True, "limit_tokens": None}, "--spread needs --limit-tokens"),
        ({"spread": True, "stride": 32}, "--spread scores windows that do not overlap"),
    ],
)
def test_bad_settings(llama_engine: Path, changes: dict, message: str) -> None:
    with pytest.raises(QuantkitError, match=message):
        evaluate_engines([llama_engine], dataclasses.replace(CONFIG, **changes))


def test_default_max_length_is_capped_by_the_model(llama_engine: Path) -> None:
    config = dataclasses.replace(CONFIG, max_length=None, stride=None, latency_grid=())
    data = evaluate_engines([llama_engine], config).dataset
    assert (data["max_length"], data["stride"]) == (256, 256)  # min(512, 256 positions)


def test_empty_text_is_refused(llama_engine: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n   \n")
    with pytest.raises(QuantkitError, match="evaluation text from .* is empty"):
        evaluate_engines([llama_engine], dataclasses.replace(CONFIG, dataset=str(empty)))


def test_not_an_engine(llama_engine: Path, tmp_path: Path) -> None:
    export_dir = llama_engine.parent / "llama-export"
    with pytest.raises(QuantkitError, match="is not an engine: .*'onnx-export' artifact"):
        evaluate_engines([export_dir], CONFIG)
    (tmp_path / "plain").mkdir()
    with pytest.raises(QuantkitError, match="is not an engine: .*no manifest.json"):
        evaluate_engines([tmp_path / "plain"], CONFIG)
    with pytest.raises(QuantkitError, match="does not exist"):
        evaluate_engines([tmp_path / "missing"], CONFIG)
    with pytest.raises(QuantkitError, match="given twice"):
        evaluate_engines([llama_engine, llama_engine], CONFIG)
    with pytest.raises(QuantkitError, match="no engine given"):
        evaluate_engines([], CONFIG)


def test_config_from_recipe() -> None:
    from quantkit.config import EvaluationConfig

    recipe = EvaluationConfig(dataset="sample", max_length=128, stride=64, limit_tokens=1000,
                              latency_grid=["1x128", "4x64"], warmup=1, iterations=5, threads=2)
    config = EvalConfig.from_recipe(recipe, batch_size=8)
    assert config == EvalConfig(
        dataset="sample", dataset_config=None, split="test", text_column="text", max_length=128,
        stride=64, limit_tokens=1000, batch_size=8,
        latency_grid=(GridPoint(1, 128), GridPoint(4, 64)), warmup=1, iterations=5, threads=2,
    )


def test_shape_ranges_of_fixed_profile_engines() -> None:
    from quantkit.eval.engines import check_shapes, shape_limits

    manifest = {"tensorrt": {"profiles": [{"min": [1, 1], "opt": [1, 256], "max": [4, 512]},
                                          {"min": [1, 1], "opt": [8, 64], "max": [8, 128]}]}}
    assert shape_limits(manifest) == ((1, 1), (4, 512))
    assert shape_limits({"backend": "onnxruntime"}) is None
    check_shapes("trt-int8", manifest, [(4, 512), (1, 100), (1, 128)])
    with pytest.raises(QuantkitError, match=r"trt-int8 accepts batch 1\.\.4 x seq 1\.\.512 "
                                            r"\(optimization profile 0\); this run needs "
                                            r"1x1024, 8x512"):
        check_shapes("trt-int8", manifest, [(8, 512), (1, 1024), (1, 128)])
