"""The calibrator's data side: DeviceBatchFeeder sequencing on the CPU, and its CUDA path
(pinned staging, asynchronous copies, device buffers read back bit-exact) on a GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from quantkit.backends.tensorrt.buffers import DeviceBatchFeeder
from quantkit.data import TokenBlocks, resolve_text_source
from quantkit.errors import QuantkitError

NAMES = {"input_ids": np.int64, "attention_mask": np.int64}

gpu = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"
)


def batches(rows: int, seq: int, per_batch: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """A re-iterable list of batches of distinct token ids, the last batch possibly smaller."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 50_000, size=(rows, seq), dtype=np.int64)
    mask = rng.integers(0, 2, size=(rows, seq), dtype=np.int64)
    return [{"input_ids": ids[i:i + per_batch], "attention_mask": mask[i:i + per_batch]}
            for i in range(0, rows, per_batch)]


def rows_of(data: list[dict[str, np.ndarray]], name: str) -> np.ndarray:
    return np.concatenate([b[name] for b in data])


@pytest.fixture
def blocks(tiny_tokenizer):
    """Real TokenBlocks over the bundled sample: 7 blocks of 16 tokens in batches of 3."""
    return TokenBlocks(resolve_text_source("sample"), tiny_tokenizer, seq_len=16, num_samples=7,
                       batch_size=3, seed=1)


def drain(feeder: DeviceBatchFeeder, names: list[str]) -> list[dict[str, np.ndarray]]:
    """Every batch the feeder hands out, read back from its buffers through the pointers."""
    out = []
    while (pointers := feeder.get_batch(names)) is not None:
        got = {}
        for name, pointer in zip(names, pointers, strict=True):
            assert pointer == feeder.buffer(name).data_ptr()
            got[name] = feeder.buffer(name).cpu().numpy().copy()
        out.append(got)
    return out


# -- host side, on the CPU ------------------------------------------------------------------------

def test_cpu_batches_match_token_blocks_in_order(blocks):
    feeder = DeviceBatchFeeder(blocks, NAMES, (3, 16), device="cpu")
    got = drain(feeder, ["input_ids", "attention_mask"])
    expected = blocks.blocks
    assert len(got) == 2  # 7 rows -> two batches of 3, one row left over
    for k, batch in enumerate(got):
        np.testing.assert_array_equal(batch["input_ids"], expected[3 * k:3 * k + 3])
        np.testing.assert_array_equal(batch["attention_mask"], np.ones((3, 16), np.int64))
    assert feeder.batches_fed == 2 and feeder.rows_fed == 6 and feeder.dropped_rows == 1


def test_pointers_follow_the_order_tensorrt_asks_for():
    feeder = DeviceBatchFeeder(batches(4, 8, 2), NAMES, (2, 8), device="cpu")
    forward = feeder.get_batch(["input_ids", "attention_mask"])
    backward = feeder.pointers(["attention_mask", "input_ids"])
    assert forward is not None
    assert backward == forward[::-1]
    assert forward[0] != forward[1]
    assert feeder.pointers(["input_ids"]) == [feeder.buffer("input_ids").data_ptr()]


def test_buffers_are_allocated_once():
    feeder = DeviceBatchFeeder(batches(8, 8, 2), NAMES, (2, 8), device="cpu")
    first = feeder.get_batch(["input_ids", "attention_mask"])
    seen = [feeder.get_batch(["input_ids", "attention_mask"]) for _ in range(3)]
    assert all(p == first for p in seen)
    assert feeder.get_batch(["input_ids", "attention_mask"]) is None


def test_rows_are_recut_across_incoming_batches():
    data = batches(rows=11, seq=4, per_batch=3)  # incoming 3+3+3+2
    feeder = DeviceBatchFeeder(data, NAMES, (4, 4), device="cpu")
    got = drain(feeder, ["attention_mask", "input_ids"])
    ids, mask = rows_of(data, "input_ids"), rows_of(data, "attention_mask")
    assert len(got) == 2
    for k, batch in enumerate(got):
        np.testing.assert_array_equal(batch["input_ids"], ids[4 * k:4 * k + 4])
        np.testing.assert_array_equal(batch["attention_mask"], mask[4 * k:4 * k + 4])
    assert feeder.dropped_rows == 3


def test_end_of_data_stays_ended_and_reset_replays_identically():
    data = batches(6, 8, 2)
    feeder = DeviceBatchFeeder(data, NAMES, (2, 8), device="cpu")
    names = ["input_ids", "attention_mask"]
    first = drain(feeder, names)
    assert len(first) == 3
    assert feeder.get_batch(names) is None and feeder.get_batch(names) is None
    assert feeder.exhausted
    feeder.reset()
    assert feeder.batches_fed == 0 and not feeder.exhausted
    second = drain(feeder, names)
    assert len(second) == 3
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
        np.testing.assert_array_equal(a["attention_mask"], b["attention_mask"])


def test_reset_in_the_middle_starts_over():
    data = batches(6, 8, 2)
    feeder = DeviceBatchFeeder(data, NAMES, (2, 8), device="cpu")
    feeder.get_batch(["input_ids"])
    feeder.get_batch(["input_ids"])
    feeder.reset()
    feeder.get_batch(["input_ids"])
    np.testing.assert_array_equal(feeder.buffer("input_ids").numpy(), data[0]["input_ids"])


def test_a_one_shot_iterator_cannot_be_replayed():
    feeder = DeviceBatchFeeder(iter(batches(4, 8, 2)), NAMES, (2, 8), device="cpu")
    feeder.reset()  # nothing consumed yet: fine
    assert feeder.get_batch(["input_ids"]) is not None
    with pytest.raises(QuantkitError, match="one-shot iterator"):
        feeder.reset()


def test_zero_batches():
    feeder = DeviceBatchFeeder([], NAMES, (2, 8), device="cpu")
    assert feeder.get_batch(["input_ids", "attention_mask"]) is None
    assert feeder.batches_fed == 0
    short = DeviceBatchFeeder(batches(1, 8, 1), NAMES, (2, 8), device="cpu")
    assert short.get_batch(["input_ids"]) is None
    assert short.batches_fed == 0 and short.dropped_rows == 1


def test_tokens_are_cast_to_the_engine_input_type():
    data = batches(4, 8, 2)
    feeder = DeviceBatchFeeder(data, {"input_ids": np.int32}, (2, 8), device="cpu")
    feeder.get_batch(["input_ids"])
    buf = feeder.buffer("input_ids")
    assert buf.dtype == torch.int32
    np.testing.assert_array_equal(buf.numpy(), data[0]["input_ids"].astype(np.int32))
    big = [{"input_ids": np.full((2, 8), 2**40, dtype=np.int64)}]
    with pytest.raises(QuantkitError, match="outside int32"):
        DeviceBatchFeeder(big, {"input_ids": np.int32}, (2, 8), device="cpu").get_batch(
            ["input_ids"])


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ([{"input_ids": np.zeros((2, 8), np.int64)}], "lacks input\\(s\\) attention_mask"),
        ([{"input_ids": np.zeros((2, 9), np.int64), "attention_mask": np.zeros((2, 9), np.int64)}],
         "has shape \\[2, 9\\], expected \\[rows, 8\\]"),
        ([{"input_ids": np.zeros((2, 8), np.int64), "attention_mask": np.zeros((3, 8), np.int64)}],
         "different numbers of rows"),
    ],
)
def test_bad_batches(data, match):
    feeder = DeviceBatchFeeder(data, NAMES, (2, 8), device="cpu")
    with pytest.raises(QuantkitError, match=match):
        feeder.get_batch(["input_ids", "attention_mask"])


def test_tensorrt_asking_for_an_unknown_input():
    feeder = DeviceBatchFeeder(batches(2, 8, 2), NAMES, (2, 8), device="cpu")
    with pytest.raises(QuantkitError, match="asked for calibration input\\(s\\) position_ids"):
        feeder.get_batch(["input_ids", "position_ids"])


def test_construction_errors():
    with pytest.raises(QuantkitError, match="pinned staging"):
        DeviceBatchFeeder([], NAMES, (2, 8), device="cpu", pinned=True)
    with pytest.raises(QuantkitError, match="at least one input"):
        DeviceBatchFeeder([], {}, (2, 8), device="cpu")
    with pytest.raises(QuantkitError, match="must be positive"):
        DeviceBatchFeeder([], NAMES, (0, 8), device="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on machines without CUDA")
def test_cuda_feeder_without_a_gpu_is_a_clear_error():
    with pytest.raises(QuantkitError, match="calibration needs a CUDA GPU"):
        DeviceBatchFeeder([], NAMES, (2, 8))


# -- device side, on a CUDA GPU -------------------------------------------------------------------

@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("pinned", [True, False])
def test_gpu_buffers_read_back_bit_exact(blocks, pinned):
    feeder = DeviceBatchFeeder(blocks, NAMES, (3, 16), pinned=pinned)
    assert feeder.is_cuda and feeder.pinned is pinned
    for name in NAMES:
        assert feeder.buffer(name).is_cuda
        staging = feeder.staging(name)
        assert (staging is not None and staging.is_pinned()) if pinned else staging is None
    expected = blocks.blocks
    names = ["attention_mask", "input_ids"]
    got = drain(feeder, names)
    assert len(got) == 2
    for k, batch in enumerate(got):
        assert batch["input_ids"].dtype == np.int64
        np.testing.assert_array_equal(batch["input_ids"], expected[3 * k:3 * k + 3])
        np.testing.assert_array_equal(batch["attention_mask"], np.ones((3, 16), np.int64))
    assert feeder.dropped_rows == 1


@pytest.mark.gpu
@gpu
def test_gpu_pointers_order_end_and_reset():
    data = batches(rows=10, seq=32, per_batch=4)  # re-cut into batches of 3: 3 + 1 dropped
    feeder = DeviceBatchFeeder(data, NAMES, (3, 32))
    names = ["input_ids", "attention_mask"]
    ids, mask = rows_of(data, "input_ids"), rows_of(data, "attention_mask")
    addresses = None
    for k in range(3):
        pointers = feeder.get_batch(names)
        assert pointers is not None
        if addresses is None:
            addresses = pointers
        assert pointers == addresses  # allocated once, at the calibration shape
        assert feeder.pointers(names[::-1]) == pointers[::-1]
        np.testing.assert_array_equal(feeder.buffer("input_ids").cpu().numpy(),
                                      ids[3 * k:3 * k + 3])
        np.testing.assert_array_equal(feeder.buffer("attention_mask").cpu().numpy(),
                                      mask[3 * k:3 * k + 3])
    assert feeder.get_batch(names) is None
    assert feeder.dropped_rows == 1
    feeder.reset()
    assert feeder.get_batch(names) == addresses
    np.testing.assert_array_equal(feeder.buffer("input_ids").cpu().numpy(), ids[:3])


@pytest.mark.gpu
@gpu
def test_gpu_copies_are_complete_when_pointers_are_returned():
    """The feeder synchronises its stream before returning: a kernel launched right away on
    another stream (as TensorRT does) sees the whole batch, for many large batches in a row."""
    data = batches(rows=64, seq=2048, per_batch=8, seed=3)
    feeder = DeviceBatchFeeder(data, NAMES, (8, 2048))
    other = torch.cuda.Stream()
    names = ["input_ids", "attention_mask"]
    ids = rows_of(data, "input_ids")
    for k in range(8):
        assert feeder.get_batch(names) is not None
        with torch.cuda.stream(other):
            total = feeder.buffer("input_ids").sum()  # runs on `other`, no extra sync
        other.synchronize()
        assert int(total.item()) == int(ids[8 * k:8 * k + 8].sum())
    assert feeder.get_batch(names) is None
