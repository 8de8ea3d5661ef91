"""Window planning, batching, the logits reduction and tokenization: pure functions, no engine."""

from __future__ import annotations

import numpy as np
import pytest

from quantkit.errors import QuantkitError
from quantkit.eval.perplexity import (
    Window,
    check_window_settings,
    join_documents,
    logits_batch_cap,
    nll_from_logits,
    plan_windows,
    tokenize_text,
    window_batches,
    window_feeds,
)


def test_non_overlapping_windows_score_all_but_their_first_token() -> None:
    windows = plan_windows(10, max_length=4, stride=4)
    assert windows == [Window(0, 4, 1), Window(4, 8, 5), Window(8, 10, 9)]
    assert sum(w.num_scored for w in windows) == 10 - 3


def test_overlapping_windows_score_each_new_token_once() -> None:
    windows = plan_windows(10, max_length=4, stride=2)
    # begin 0: scores 1..3; begin 2 (ends 6): 4..5; begin 4 (ends 8): 6..7; begin 6: 8..9
    assert windows == [Window(0, 4, 1), Window(2, 6, 4), Window(4, 8, 6), Window(6, 10, 8)]


@pytest.mark.parametrize("num_tokens", [2, 3, 7, 16, 17, 31, 64, 65])
@pytest.mark.parametrize(("max_length", "stride"), [(2, 1), (4, 4), (8, 3), (8, 7), (8, 8),
                                                    (16, 5), (5, 5)])
def test_window_invariants(num_tokens: int, max_length: int, stride: int) -> None:
    windows = plan_windows(num_tokens, max_length, stride)
    scored = [t for w in windows for t in range(w.score_begin, w.end)]
    assert len(scored) == len(set(scored)), "a token is scored twice"
    assert scored == sorted(scored)
    for w in windows:
        assert 0 <= w.begin < w.score_begin < w.end <= num_tokens
        assert w.length <= max_length
        assert w.begin % stride == 0
    if stride < max_length:
        assert windows[-1].end == num_tokens
        assert scored == list(range(1, num_tokens))
    else:  # disjoint windows: every token but each window's first (a 1-token window is dropped)
        assert windows[-1].end >= num_tokens - 1
        assert set(scored) == set(range(num_tokens)) - set(range(0, num_tokens, stride))


def test_trailing_single_token_window_is_dropped() -> None:
    # 9 tokens, windows of 4: the last window [8, 9) has nothing to score
    windows = plan_windows(9, 4, 4)
    assert [(w.begin, w.end) for w in windows] == [(0, 4), (4, 8)]


@pytest.mark.parametrize(
    ("max_length", "stride", "max_positions", "message"),
    [
        (512, 513, None, "stride 513 is larger than max-length 512"),
        (512, 0, None, "stride must be at least 1"),
        (1024, 512, 512, "max-length 1024 is beyond the model's limit of 512 positions"),
        (1, 1, None, "max-length must be at least 2"),
    ],
)
def test_bad_window_settings(max_length: int, stride: int, max_positions: int | None,
                             message: str) -> None:
    with pytest.raises(QuantkitError, match=message):
        check_window_settings(max_length, stride, max_positions)


def test_too_few_tokens() -> None:
    with pytest.raises(QuantkitError, match="needs at least 2"):
        plan_windows(1, 4, 4)


def test_batches_keep_order_and_equal_lengths() -> None:
    windows = plan_windows(22, 4, 4)  # five windows of 4, then [20, 22)
    batches = list(window_batches(windows, 2))
    assert [[w.begin for w in b] for b in batches] == [[0, 4], [8, 12], [16], [20]]
    assert all(len({w.length for w in b}) == 1 for b in batches)
    feeds = window_feeds(np.arange(22), batches[0])
    assert feeds["input_ids"].tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert feeds["input_ids"].dtype == np.int64 and feeds["attention_mask"].min() == 1
    with pytest.raises(QuantkitError, match="batch-size"):
        list(window_batches(windows, 0))


def test_nll_from_logits_matches_float64_log_softmax() -> None:
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((150, 1000)) * 8).astype(np.float32)  # > one row chunk
    targets = rng.integers(0, 1000, size=150)
    x = logits.astype(np.float64)
    m = x.max(axis=1, keepdims=True)
    expected = (np.log(np.exp(x - m).sum(axis=1)) + m[:, 0]) - x[np.arange(150), targets]
    got = nll_from_logits(logits.copy(), targets)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_logits_batch_cap() -> None:
    assert logits_batch_cap(512, 49152, budget=512 << 20) == 5  # 96 MiB a window
    assert logits_batch_cap(512, 49152, budget=1) == 1


def test_tokenize_text_limit_and_hashes() -> None:
    from tests.eval.engines import byte_tokenizer

    tok = byte_tokenizer()
    full = tokenize_text(tok, join_documents(["abc", "de"]))
    assert full.num_tokens == len("abc\n\nde") and full.total_tokens == full.num_tokens
    cut = tokenize_text(tok, "abc\n\nde", limit_tokens=4)
    assert cut.num_tokens == 4 and cut.total_tokens == 7
    assert cut.ids.tolist() == full.ids[:4].tolist()
    assert cut.text_sha256 == full.text_sha256 and cut.tokens_sha256 != full.tokens_sha256
    with pytest.raises(QuantkitError, match="evaluation text is empty"):
        tokenize_text(tok, " \n\n ")
    with pytest.raises(QuantkitError, match="needs at least 2"):
        tokenize_text(tok, "a")
    with pytest.raises(QuantkitError, match="limit-tokens must be at least 2"):
        tokenize_text(tok, "abc", limit_tokens=1)
