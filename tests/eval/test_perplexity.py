"""Perplexity through real FP32 ONNX Runtime engines of tiny models, against PyTorch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from quantkit.backends.base import Engine
from quantkit.data import resolve_text_source
from quantkit.errors import QuantkitError
from quantkit.eval.perplexity import evaluate_perplexity, tokenize_text
from quantkit.eval.text import load_evaluation_text
from quantkit.models import load_tokenizer
from tests.eval.engines import WIKITEXT_TEST, torch_model_of
from tests.eval.reference import exact_torch_perplexity, hf_guide_perplexity

REL_TOL = 1e-3  # the bar: same perplexity as PyTorch within 0.1% relative


def sample_tokens(engine: Path, limit: int) -> np.ndarray:
    tokenizer = load_tokenizer(engine / "tokenizer")
    text = load_evaluation_text(resolve_text_source("sample", split="test"))
    return tokenize_text(tokenizer, text.text, limit_tokens=limit).ids


def ort_perplexity(engine: Path, ids: np.ndarray, max_length: int, stride: int,
                   batch_size: int = 1, **kwargs: object):
    with Engine.load(engine).runner(threads=1) as runner:
        return evaluate_perplexity(runner, ids, max_length, stride, batch_size, **kwargs)


@pytest.fixture(scope="module")
def llama_torch():
    return torch_model_of("llama")


@pytest.mark.parametrize(("max_length", "stride"), [(64, 64), (128, 128), (100, 100)])
def test_fp32_engine_matches_hf_guide_loop(llama_engine: Path, llama_torch, max_length: int,
                                           stride: int) -> None:
    ids = sample_tokens(llama_engine, 1000)  # 1000 % max_length is never 1: no NaN window there
    reference = hf_guide_perplexity(llama_torch, ids, max_length, stride)
    result = ort_perplexity(llama_engine, ids, max_length, stride)
    assert result.output == "nll"
    assert result.perplexity == pytest.approx(reference, rel=REL_TOL)
    # a random 256-token model is near-uniform: a sanity check that the numbers are real
    assert 150 < result.perplexity < 600


@pytest.mark.parametrize(("max_length", "stride"), [(64, 16), (100, 37), (128, 127)])
def test_overlapping_windows_match_torch(llama_engine: Path, llama_torch, max_length: int,
                                         stride: int) -> None:
    ids = sample_tokens(llama_engine, 700)
    reference, count = exact_torch_perplexity(llama_torch, ids, max_length, stride)
    result = ort_perplexity(llama_engine, ids, max_length, stride)
    assert result.num_scored_tokens == count == len(ids) - 1
    assert result.perplexity == pytest.approx(reference, rel=REL_TOL)


def test_batched_windows_give_the_same_numbers(llama_engine: Path) -> None:
    ids = sample_tokens(llama_engine, 1000)  # 15 windows of 64 and one of 40
    one = ort_perplexity(llama_engine, ids, 64, 64, batch_size=1)
    four = ort_perplexity(llama_engine, ids, 64, 64, batch_size=4)
    assert four.batch_size == 4 and one.num_windows == four.num_windows == 16
    assert four.num_scored_tokens == one.num_scored_tokens == 1000 - 16
    assert four.nll_sum == pytest.approx(one.nll_sum, rel=1e-5)


def test_logits_path_matches_fused_nll(llama_engine: Path) -> None:
    ids = sample_tokens(llama_engine, 600)
    fused = ort_perplexity(llama_engine, ids, 96, 48, batch_size=3)
    logits = ort_perplexity(llama_engine, ids, 96, 48, batch_size=3, use_nll=False,
                            vocab_size=256)
    assert (fused.output, logits.output) == ("nll", "logits")
    assert logits.perplexity == pytest.approx(fused.perplexity, rel=1e-5)


def test_logits_batch_is_capped_by_the_memory_budget(llama_engine: Path) -> None:
    ids = sample_tokens(llama_engine, 600)
    # one window of logits is 96 x 256 x 4 = 96 KiB: a 200 KiB budget allows 2 windows a call
    capped = ort_perplexity(llama_engine, ids, 96, 96, batch_size=5, use_nll=False,
                            vocab_size=256, logits_budget_bytes=200 << 10)
    free = ort_perplexity(llama_engine, ids, 96, 96, batch_size=5, use_nll=False,
                          vocab_size=256)
    assert (capped.batch_size, free.batch_size) == (2, 5)
    assert capped.nll_sum == pytest.approx(free.nll_sum, rel=1e-5)


def test_engine_without_nll_output_uses_logits(llama_logits_engine: Path, llama_torch) -> None:
    ids = sample_tokens(llama_logits_engine, 500)
    result = ort_perplexity(llama_logits_engine, ids, 64, 32, vocab_size=256)
    assert result.output == "logits"
    reference, _ = exact_torch_perplexity(llama_torch, ids, 64, 32)
    assert result.perplexity == pytest.approx(reference, rel=REL_TOL)
    with pytest.raises(QuantkitError, match="no fused 'nll' output"):
        ort_perplexity(llama_logits_engine, ids, 64, 32, use_nll=True)


def test_progress_callback_counts_windows(llama_engine: Path) -> None:
    ids = sample_tokens(llama_engine, 300)
    seen: list[int] = []
    result = ort_perplexity(llama_engine, ids, 64, 64, batch_size=2, on_batch=seen.append)
    assert sum(seen) == result.num_windows == 5 and seen == [2, 2, 1]


def test_gpt2_tokenizer_on_wikitext_matches_torch(gpt2_engine: Path) -> None:
    if not WIKITEXT_TEST.is_file():
        pytest.skip(f"{WIKITEXT_TEST} not found (../shared is absent)")
    tokenizer = load_tokenizer(gpt2_engine / "tokenizer")
    text = load_evaluation_text(resolve_text_source(str(WIKITEXT_TEST), split="test"))
    assert "\r" not in text.text and text.num_documents == 1
    tokens = tokenize_text(tokenizer, text.text, limit_tokens=800)
    assert tokens.ids[:6].tolist() == tokenizer(" = Robert Boulter = ")["input_ids"][:6]
    result = ort_perplexity(gpt2_engine, tokens.ids, 200, 200, batch_size=2)
    reference = hf_guide_perplexity(torch_model_of("gpt2"), tokens.ids, 200, 200)
    assert result.perplexity == pytest.approx(reference, rel=REL_TOL)
