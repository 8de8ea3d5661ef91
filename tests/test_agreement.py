"""Greedy-token agreement (``quantkit.agreement``): the one definition that quantize's generation
check, eval and the generation benchmark share — free-running counts on rows of any length,
first differences, the teacher-forced count and ``forced_top1``."""

from __future__ import annotations

import numpy as np
import pytest

from quantkit.agreement import Agreement, compare_tokens, first_difference, forced_top1
from quantkit.errors import QuantkitError


def test_identical_rows_agree_completely():
    ref = [[1, 2, 3, 4], [5, 6, 7, 8]]
    got = compare_tokens(ref, [list(r) for r in ref], reference="fp32", forced_rows=ref)
    assert got == Agreement("fp32", 2, 4, 8, 8, 2, 4.0, (None, None), 8)
    assert (got.token_match, got.identical_share, got.teacher_forced) == (1.0, 1.0, 1.0)


def test_equal_length_rows():
    """Eval's case: every row ``new_tokens`` long (numpy rows as eval has them)."""
    ref = np.array([[1, 2, 3, 4], [5, 6, 7, 8], [9, 9, 9, 9]])
    other = np.array([[1, 2, 0, 4],    # differs at 2, re-converges: 3 of 4 equal
                      [0, 6, 7, 8],    # differs at 0: 3 of 4 equal all the same
                      [9, 9, 9, 9]])   # identical
    got = compare_tokens(ref, other, new_tokens=4)
    assert (got.positions, got.equal, got.identical) == (12, 10, 1)
    assert got.token_match == pytest.approx(10 / 12)
    assert got.first_differences == (2, 0, None)
    assert got.mean_common_prefix == pytest.approx((2 + 0 + 4) / 3)
    assert got.identical_share == pytest.approx(1 / 3)
    assert got.teacher_forced is None and got.teacher_forced_equal is None


def test_a_row_that_differs_at_the_first_token():
    got = compare_tokens([[7, 8, 9]], [[1, 8, 9]])
    assert (got.equal, got.identical, got.first_differences) == (2, 0, (0,))
    assert got.mean_common_prefix == 0.0


def test_rows_of_different_lengths():
    """Rows stop at end-of-text: the reference's positions are scored, a position beyond the
    engine's shorter row counts as different, the engine's extra tokens are not scored."""
    ref = [[1, 2, 3, 4], [5, 6], [8, 9, 10]]
    got = compare_tokens(ref, [[1, 2], [5, 6, 7, 0], [8, 9, 10]], new_tokens=4)
    assert (got.prompts, got.new_tokens, got.positions) == (3, 4, 9)
    assert (got.equal, got.identical) == (2 + 2 + 3, 1)
    assert got.token_match == pytest.approx(7 / 9)
    assert got.first_differences == (2, 2, None)
    assert got.mean_common_prefix == pytest.approx((2 + 2 + 3) / 3)
    assert compare_tokens([[1, 2, 3]], [[1]]).new_tokens == 3  # default: the longest row


def test_first_difference():
    assert first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert first_difference([1, 2, 3], [1, 2]) == 2
    assert first_difference([1, 2], [1, 2, 3]) == 2
    assert first_difference([4, 2], [1, 2]) == 0
    assert first_difference([1, 2], [1, 2]) is None


def test_teacher_forced_count():
    ref = [[1, 2, 3, 4], [5, 6]]
    free = [[1, 9, 9, 9], [5, 6]]     # free-running, it left the reference at position 1
    forced = [[1, 2, 0, 4], [0, 6]]   # reading the reference, it misses two of six
    got = compare_tokens(ref, free, forced_rows=forced)
    assert (got.equal, got.teacher_forced_equal) == (3, 4)
    assert got.token_match == pytest.approx(3 / 6)
    assert got.teacher_forced == pytest.approx(4 / 6)
    with pytest.raises(QuantkitError, match="teacher-forced rows"):
        compare_tokens(ref, free, forced_rows=[[1, 2, 3], [5, 6]])
    with pytest.raises(QuantkitError, match="teacher-forced rows"):
        compare_tokens(ref, free, forced_rows=[[1, 2, 3, 4]])


def test_rows_that_cannot_be_compared():
    with pytest.raises(QuantkitError, match="cannot be compared"):
        compare_tokens([[1, 2]], [[1, 2], [3]])
    with pytest.raises(QuantkitError, match="cannot be compared"):
        compare_tokens([], [])
    with pytest.raises(QuantkitError, match="no tokens"):
        compare_tokens([[]], [[1]])


def test_to_dict_holds_the_counts_and_the_shares():
    data = compare_tokens([[1, 2], [3, 4]], [[1, 0], [3, 4]], reference="fp32",
                          forced_rows=[[1, 2], [0, 4]]).to_dict()
    assert data == {"reference": "fp32", "prompts": 2, "new_tokens": 2, "positions": 4,
                    "equal": 3, "identical": 1, "token_match": 0.75, "mean_common_prefix": 1.5,
                    "identical_share": 0.5, "first_differences": [1, None],
                    "teacher_forced_equal": 3, "teacher_forced": 0.75}


class _Layout:
    """A one-tensor cache whose past is the token ids read so far."""

    past_names = ["past.0"]
    present_names = ["present.0"]

    @staticmethod
    def empty_past(batch: int) -> dict[str, np.ndarray]:
        return {"past.0": np.zeros((batch, 0), dtype=np.int64)}


class _NextToken:
    """A model whose top-1 is the last token read plus one (vocabulary 100); it checks that each
    step gets the cache, mask and positions of everything read before."""

    def __init__(self) -> None:
        self.steps = 0

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        ids, past = feeds["input_ids"], feeds["past.0"]
        read = np.concatenate([past, ids], axis=1)
        assert feeds["attention_mask"].shape == read.shape
        assert feeds["position_ids"].tolist() == [list(range(past.shape[1], read.shape[1]))]
        logits = np.zeros((1, ids.shape[1], 100), dtype=np.float32)
        logits[0, np.arange(ids.shape[1]), (ids[0] + 1) % 100] = 1.0
        self.steps += 1
        return {"logits": logits, "present.0": read}


def test_forced_top1_reads_the_continuation():
    """Each prediction follows the continuation's own previous token, not the model's
    previous prediction."""
    runner = _NextToken()
    assert forced_top1(runner, _Layout(), [3, 4], [5, 9, 2]) == [5, 6, 10]
    assert runner.steps == 3  # one prefill, then one step per continuation token but the last
    assert forced_top1(runner, _Layout(), [3], []) == []


def test_forced_top1_of_an_engine_on_its_own_greedy_tokens_is_them(tiny_llama_cache_export,
                                                                    tmp_path):
    """On a real cache engine: reading its own greedy continuation, an engine predicts it (so
    an engine's teacher-forced share against itself is 1)."""
    from quantkit.build import build_engine
    from quantkit.generate import engine_cache_layout, greedy_decode

    engine = build_engine(tmp_path / "fp32", precision="fp32",
                          onnx=tiny_llama_cache_export.directory)
    layout = engine_cache_layout(engine)
    prompt = [5, 17, 42, 8, 99]
    with engine.runner(threads=1) as runner:
        rows, _ = greedy_decode(runner, layout, [prompt], 8, pad_id=0, eos_ids=())
        forced = forced_top1(runner, layout, prompt, rows[0])
    assert forced == rows[0]
    assert compare_tokens(rows, rows, forced_rows=[forced]).teacher_forced == 1.0
