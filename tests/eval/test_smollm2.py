"""SmolLM2-135M: the FP32 ONNX Runtime engine gives PyTorch's perplexity within 0.1% (slow)."""

from __future__ import annotations

import pytest

from tests.eval.reference import hf_guide_perplexity

pytestmark = pytest.mark.slow

NUM_TOKENS = 2048  # 4 windows of 512


def test_smollm2_fp32_engine_matches_pytorch(wikitext_test_file, smollm2, smollm2_export,
                                             tmp_path_factory) -> None:
    """``smollm2`` / ``smollm2_export`` are the session fixtures of tests/conftest.py;
    ``wikitext_test_file`` comes first so that, without ../shared, the test skips before the
    model is fetched and exported."""
    from quantkit.backends import get_backend
    from quantkit.backends.base import BuildRequest
    from quantkit.data import resolve_text_source
    from quantkit.eval.perplexity import evaluate_perplexity, tokenize_text
    from quantkit.eval.text import load_evaluation_text
    from quantkit.models import load_tokenizer, tokenizer_fingerprint

    engine = get_backend("onnxruntime").build(
        BuildRequest(smollm2_export.onnx_path, "fp32", None, None, {}),
        tmp_path_factory.mktemp("smol-engine") / "fp32",
    )
    tokenizer = load_tokenizer(engine.path / "tokenizer")
    assert tokenizer_fingerprint(tokenizer) == tokenizer_fingerprint(smollm2.tokenizer)
    text = load_evaluation_text(resolve_text_source(str(wikitext_test_file), split="test"))
    ids = tokenize_text(tokenizer, text.text, limit_tokens=NUM_TOKENS).ids
    with engine.runner(threads=2) as runner:
        result = evaluate_perplexity(runner, ids, 512, 512, batch_size=2)
    reference = hf_guide_perplexity(smollm2.model, ids, 512, 512)
    assert result.num_windows == 4 and result.num_scored_tokens == NUM_TOKENS - 4
    assert result.perplexity == pytest.approx(reference, rel=1e-3)
    assert 10 < result.perplexity < 60  # a real model on English text, not a broken pipeline


def test_smollm2_cache_engine_perplexity_and_generation(wikitext_test_file, smollm2_export,
                                                        smollm2_cache_export, tmp_path) -> None:
    """The KV-cache engine of SmolLM2-135M, scored token by token through its cache, gives the
    plain FP32 engine's perplexity (1e-5 relative); its generation numbers come out whole, and its
    greedy tokens agree with themselves."""
    from quantkit.build import build_engine
    from quantkit.eval.evaluate import EvalConfig, evaluate_engines
    from quantkit.eval.generation import DecodePoint, GenerationConfig

    cache_engine = build_engine(tmp_path / "cache-fp32", precision="fp32",
                                onnx=smollm2_cache_export.directory)
    plain_engine = build_engine(tmp_path / "plain-fp32", precision="fp32",
                                onnx=smollm2_export.directory)
    config = EvalConfig(dataset=str(wikitext_test_file), split="test", max_length=128,
                        limit_tokens=256, threads=2, latency_grid=(), warmup=1,
                        generation=GenerationConfig(prompt_lengths=(64,),
                                                    decode_grid=(DecodePoint(2, 64),),
                                                    iterations=2, agreement_prompts=2,
                                                    agreement_prompt_tokens=16,
                                                    agreement_new_tokens=8))
    plain = evaluate_engines([plain_engine.path], config).engines[0]
    cached = evaluate_engines([cache_engine.path], config).engines[0]
    assert cached.eval_output == "decode" and cached.num_scored_tokens == plain.num_scored_tokens
    assert cached.perplexity == pytest.approx(plain.perplexity, rel=1e-5)
    gen = cached.generation
    assert [(p.tokens, p.iterations) for p in gen.ttft] == [(64, 2)]
    assert [(p.batch, p.past) for p in gen.decode] == [(2, 64)]
    assert gen.agreement is not None and gen.agreement.token_match == 1.0
    assert len(gen.tokens) == 2 and all(len(row) == 8 for row in gen.tokens)
