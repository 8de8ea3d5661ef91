from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from calib_graphs import float_input_model, lm_batches, toy_lm

from quantkit.calib import calibrate
from quantkit.calib.collect import collect_activation_stats
from quantkit.calib.histogram import StreamingHistogram
from quantkit.calib.stats import ActivationStats
from quantkit.errors import QuantkitError
from quantkit.export import onnx_model_hash


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return toy_lm(tmp_path_factory.mktemp("toy") / "toy.onnx")


def test_all_mode_calibrates_activations_and_skips_masks_and_constants(lm):
    stats = collect_activation_stats(lm, lm_batches(3))
    measured = {"emb", "q", "k", "v", "scores", "scaled", "tril", "probs", "ctx", "out",
                "logits"}
    assert measured <= set(stats.histograms)
    # rearranged tensors share their source's histogram
    assert stats.aliases == {"kt": "k", "ctx_flat": "ctx"}
    assert stats.histograms["kt"] is stats.histograms["k"]
    assert stats.histograms["ctx_flat"] is stats.histograms["ctx"]
    # masks and constant-like tensors: skipped, with the reason
    assert stats.skipped["masked"].startswith("mask: holds -3.403e+38")
    assert stats.skipped["ones"] == "constant: every element is 1"
    assert stats.skipped["zeros"] == "constant: every element is 0"
    assert stats.skipped["zeros2"] == "constant: every element is 0"
    assert stats.skipped["mask_f"] == "constant: every element is 1"
    assert set(stats.histograms) | set(stats.skipped) == measured | {
        "kt", "ctx_flat", "masked", "ones", "zeros", "zeros2", "mask_f"}
    # weights, shape computations and int tensors are not activations
    for name in ("E", "Wq", "scale", "neg", "ids_shape", "seq", "keep"):
        assert name not in stats.histograms and name not in stats.skipped
    assert (stats.num_batches, stats.num_samples, stats.num_tokens) == (3, 9, 108)
    assert stats.model_hash == onnx_model_hash(lm)


def test_padding_makes_the_float_mask_an_activation(lm):
    stats = collect_activation_stats(lm, lm_batches(2, pad=True))
    assert "mask_f" in stats.histograms and stats.histograms["mask_f"].amax == 1.0
    assert stats.num_tokens == 2 * (3 * 12 - 6)


def test_quantizable_mode_takes_the_activation_inputs_of_matmuls(lm):
    stats = collect_activation_stats(lm, lm_batches(2), tensors="quantizable")
    # q/k/v projections, both attention batched MatMuls, o_proj and lm_head; no weights
    assert set(stats.histograms) == {"emb", "q", "kt", "probs", "v", "ctx_flat", "out"}
    assert stats.aliases == {"kt": "k", "ctx_flat": "ctx"}
    assert stats.skipped == {}


def reference_histograms(model_path, batches, names, num_bins=2048):
    """Every tensor exposed as a graph output of one session, histogrammed row by row."""
    model = onnx.load(str(model_path))
    have = {o.name for o in model.graph.output}
    for name in names:
        if name not in have:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, 1, None))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    hists = {n: StreamingHistogram(num_bins) for n in names}
    for batch in batches:
        for row in range(batch["input_ids"].shape[0]):
            feed = {k: v[row:row + 1] for k, v in batch.items()}
            for name, value in zip(names, sess.run(names, feed), strict=True):
                hists[name].update(value)
    return hists


@pytest.mark.parametrize("max_tensors", [1, 3, 1000])
def test_histograms_equal_a_direct_computation(lm, max_tensors):
    batches = lm_batches(3, seed=1)
    # a 1-byte budget makes every run one row, like the reference
    stats = collect_activation_stats(lm, batches, max_tensors_per_segment=max_tensors,
                                     activation_budget=1)
    names = sorted(stats.histograms)
    ref = reference_histograms(lm, batches, names)
    for name in names:
        got, want = stats.histograms[name], ref[name]
        assert got.bin_width == want.bin_width, name
        np.testing.assert_array_equal(got.counts, want.counts, err_msg=name)
        assert (got.amax, got.total) == (want.amax, want.total), name


@pytest.mark.parametrize("max_tensors", [1, 1000])
def test_background_histograms_equal_the_ones_made_in_line(tiny_llama_export, max_tensors):
    """Histograms made on a second thread while ONNX Runtime runs the next segment: the same
    counts, widths and skips, bit for bit, as histogramming each segment's outputs at once."""
    from tests.build_helpers import token_feeds

    feeds = token_feeds(3, batch=2, seq=24, seed=7)
    runs = {background: collect_activation_stats(
        tiny_llama_export.onnx_path, feeds, tensors="all", max_tensors_per_segment=max_tensors,
        background=background) for background in (False, True)}
    inline, threaded = runs[False], runs[True]
    assert inline.skipped == threaded.skipped and inline.aliases == threaded.aliases
    assert set(inline.histograms) == set(threaded.histograms) and len(inline.histograms) > 20
    for name, hist in inline.histograms.items():
        other = threaded.histograms[name]
        assert (other.bin_width, other.amax, other.total) == (
            hist.bin_width, hist.amax, hist.total), name
        np.testing.assert_array_equal(other.counts, hist.counts, err_msg=name)
    # the outputs waiting for their histograms are counted in the activation peak
    assert threaded.peak_activation_bytes >= inline.peak_activation_bytes


@pytest.mark.parametrize("segment_weight_bytes", [1, 64 << 10])
def test_layer_by_layer_equals_batch_by_batch(tiny_llama_export, segment_weight_bytes):
    """One segment over every sequence, then the next (one segment's weights in memory): the
    same histograms, bit for bit, as every segment on one sequence at a time."""
    from tests.build_helpers import token_feeds

    feeds = token_feeds(3, batch=2, seq=24, seed=8)
    batchwise = collect_activation_stats(tiny_llama_export.onnx_path, feeds, tensors="all",
                                         activation_budget=1)
    marks: list[tuple[int, int]] = []
    layerwise = collect_activation_stats(
        tiny_llama_export.onnx_path, feeds, tensors="all",
        segment_weight_bytes=segment_weight_bytes, progress=lambda b, t: marks.append((b, t)))
    assert (layerwise.num_batches, layerwise.num_samples, layerwise.num_tokens) == (
        batchwise.num_batches, batchwise.num_samples, batchwise.num_tokens) == (3, 6, 144)
    assert layerwise.skipped == batchwise.skipped
    assert set(layerwise.histograms) == set(batchwise.histograms)
    for name, hist in batchwise.histograms.items():
        other = layerwise.histograms[name]
        assert (other.bin_width, other.amax, other.total) == (
            hist.bin_width, hist.amax, hist.total), name
        np.testing.assert_array_equal(other.counts, hist.counts, err_msg=name)
    assert len(marks) > 2 and marks[-1] == (3, 144)  # after every segment; all done at the end
    assert marks == sorted(marks)


def test_segments_hold_at_most_the_weight_cap(tiny_llama_export):
    from quantkit.calib.graph import analyse, partition, select_tensors
    from quantkit.onnx_io import tensor_bytes

    model = onnx.load(str(tiny_llama_export.onnx_path))
    info = analyse(model)
    roots = [r for r in select_tensors(info, "quantizable") if r not in info.inputs]
    sizes = {t.name: tensor_bytes(t) for t in model.graph.initializer}
    cap = 64 << 10
    whole = partition(info, roots, 1000)
    capped = partition(info, roots, 1000, sizes, cap)
    assert len(whole) == 1 and len(capped) > 3
    assert sum(len(s.roots) for s in capped) == len(whole[0].roots)
    for seg in capped:  # past the cap only where one node's own weights are (never split)
        held = sum(sizes[n] for n in seg.initializers)
        first = sum(sizes[n] for n in set(seg.nodes[0].input) if n in sizes)
        assert held <= max(cap, first), seg.index


def test_sub_batch_size_does_not_change_totals_or_ranges(lm):
    batches = lm_batches(2, batch=5, seed=2)
    small = collect_activation_stats(lm, batches, activation_budget=1)
    large = collect_activation_stats(lm, batches, activation_budget=1 << 30)
    assert set(small.histograms) == set(large.histograms)
    assert small.num_samples == large.num_samples == 10
    for name, hist in small.histograms.items():
        assert hist.amax == pytest.approx(large.histograms[name].amax, rel=1e-6)
        if name != "tril":  # the only tensor without a batch dimension: counted once per run
            assert hist.total == large.histograms[name].total, name


def test_memory_does_not_grow_with_the_number_of_batches(lm):
    one = lm_batches(1, batch=4, seed=3)
    few = collect_activation_stats(lm, one * 2)
    many = collect_activation_stats(lm, one * 12)
    assert many.num_batches == 12
    assert many.nbytes == few.nbytes  # histogram state: fixed size
    assert many.peak_activation_bytes == few.peak_activation_bytes  # one sub-batch at a time
    # with a small budget only one row's activations are alive at once
    tight = collect_activation_stats(lm, one * 3, activation_budget=1)
    assert tight.peak_activation_bytes < few.peak_activation_bytes


def test_nan_activations_name_the_tensor(tmp_path):
    model = float_input_model(tmp_path / "sqrt.onnx", "Sqrt")
    batch = {"x": np.array([[1.0, 4.0, -1.0, 9.0]], dtype=np.float32)}
    with pytest.raises(QuantkitError, match="tensor 'y' has NaN values"):
        collect_activation_stats(model, [batch])


def test_inf_activations_name_the_tensor(tmp_path):
    model = float_input_model(tmp_path / "recip.onnx", "Reciprocal")
    batch = {"x": np.array([[1.0, 0.0, 2.0, 3.0]], dtype=np.float32)}
    with pytest.raises(QuantkitError, match="tensor 'y' has \\+Inf values"):
        collect_activation_stats(model, [batch])


def test_float_graph_inputs_are_calibrated(tmp_path):
    model = float_input_model(tmp_path / "sqrt.onnx", "Sqrt")
    batch = {"x": np.array([[1.0, 4.0, 0.25, 9.0], [16.0, 0.0, 2.0, 1.0]], dtype=np.float32)}
    stats = collect_activation_stats(model, [batch])
    assert set(stats.histograms) == {"x", "y", "z"}
    assert stats.histograms["x"].amax == 16.0 and stats.histograms["z"].amax == 8.0
    assert stats.num_tokens == 8


def test_bad_input(lm):
    with pytest.raises(QuantkitError, match="no calibration batches"):
        collect_activation_stats(lm, [])
    with pytest.raises(QuantkitError, match="lacks model input"):
        collect_activation_stats(lm, [{"input_ids": np.zeros((1, 4), np.int64)}])
    with pytest.raises(QuantkitError, match="'input_ids' is float32"):
        collect_activation_stats(lm, [{"input_ids": np.zeros((1, 4), np.float32),
                                       "attention_mask": np.ones((1, 4), np.int64)}])
    with pytest.raises(QuantkitError, match="unknown tensor selection"):
        collect_activation_stats(lm, lm_batches(1), tensors="some")
    with pytest.raises(QuantkitError, match="not found"):
        collect_activation_stats(lm.parent / "missing.onnx", lm_batches(1))


def test_progress_reports_batches_and_tokens(lm):
    seen = []
    collect_activation_stats(lm, lm_batches(3, batch=2, seq=5), progress=lambda b, t:
                             seen.append((b, t)))
    assert seen == [(1, 10), (2, 20), (3, 30)]


def test_calibrate_gives_a_table(lm):
    stats = collect_activation_stats(lm, lm_batches(3))
    for method in ("entropy", "minmax", "percentile", "mse"):
        table = calibrate(stats, method)
        assert set(table.amax) == set(stats.histograms)
        assert table.skipped == stats.skipped
        assert table.model_hash == stats.model_hash and table.num_tokens == 108
        assert table.amax["kt"] == table.amax["k"]
    minmax = calibrate(stats, "minmax")
    assert minmax.amax["probs"] <= 1.0
    assert calibrate(stats, "percentile", percentile=99.0).params == {"percentile": 99.0}
    with pytest.raises(QuantkitError, match="no parameter"):
        calibrate(stats, "entropy", percentile=99.0)


def test_stats_round_trip(lm, tmp_path):
    stats = collect_activation_stats(lm, lm_batches(2), data={"dataset": "toy"})
    path = tmp_path / "stats.npz"
    stats.save(path)
    again = ActivationStats.load(path)
    assert list(again.histograms) == list(stats.histograms)
    assert again.histograms["kt"] is again.histograms["k"]
    for name, hist in stats.histograms.items():
        np.testing.assert_array_equal(again.histograms[name].counts, hist.counts)
        assert again.histograms[name].to_dict() == hist.to_dict()
    assert again.skipped == stats.skipped and again.data == {"dataset": "toy"}
    assert calibrate(again, "entropy") == calibrate(stats, "entropy")
    via_dict = ActivationStats.from_dict(stats.to_dict())
    assert via_dict.histograms["ctx_flat"] is via_dict.histograms["ctx"]
    path.write_bytes(b"garbage")
    with pytest.raises(QuantkitError, match="not a quantkit activation-stats file"):
        ActivationStats.load(path)


def test_tiny_llama_export(tiny_llama_export, tiny_tokenizer):
    """The real exporter's graph: causal masks are skipped, ranges come out for the rest, and
    every TensorRT cache name is a tensor of the model."""
    from quantkit.calib.trt_cache import check_trt_cache, table_to_trt_cache
    from quantkit.data import TokenBlocks, resolve_text_source

    blocks = TokenBlocks(resolve_text_source("sample"), tiny_tokenizer, seq_len=32,
                         num_samples=4, batch_size=2)
    onnx_path = tiny_llama_export.onnx_path
    stats = collect_activation_stats(onnx_path, blocks, data=blocks.describe())
    assert stats.num_batches == 2 and stats.num_tokens == 4 * 32
    masks = [n for n, why in stats.skipped.items() if why.startswith("mask:")]
    assert masks, stats.skipped  # the causal mask (finfo.min) and the scores it is added to
    quantizable = collect_activation_stats(onnx_path, blocks, tensors="quantizable")
    assert set(quantizable.histograms) <= set(stats.histograms)
    # every layer's MLP down projection input is there
    assert any("layers.1/mlp" in n for n in quantizable.histograms)
    table = calibrate(stats, "entropy")
    assert all(0 < v < 1e6 for v in table.amax.values())
    model = onnx.load(str(onnx_path), load_external_data=False)
    names = {o for node in model.graph.node for o in node.output} | {
        i.name for i in model.graph.input}
    check_trt_cache(table_to_trt_cache(table, "10.3.0"), tensor_names=names)


def test_huge_but_real_values_are_not_masks(tmp_path):
    """Squared massive activations reach ~1e9 in SmolLM2; only float32-extreme values
    (>= 1e30) or -inf count as mask sentinels."""
    model = float_input_model(tmp_path / "sqrt.onnx", "Sqrt")
    batch = {"x": np.array([[4e20, 1.0, 2.0, 9.0]], dtype=np.float32)}
    stats = collect_activation_stats(model, [batch])
    assert stats.skipped == {} and stats.histograms["x"].amax == pytest.approx(4e20)
    masked = {"x": np.array([[-3.4e38, 1.0, 2.0, 9.0]], dtype=np.float32)}
    with pytest.raises(QuantkitError, match="tensor 'y' has NaN"):  # sqrt(-3.4e38)
        collect_activation_stats(model, [masked])


def test_calibrate_goes_layer_by_layer_past_the_size_threshold(tiny_llama_export, tmp_path,
                                                                monkeypatch):
    """The CLI switches to layer by layer for big models; the table is the same either way."""
    import json

    from click.testing import CliRunner

    import quantkit.calib.run as calib_run
    from quantkit.cli.main import cli

    args = ["calibrate", "--onnx", str(tiny_llama_export.directory), "--dataset", "sample",
            "--num-samples", "4", "--seq-len", "32", "--batch-size", "2", "--method", "minmax"]
    assert calib_run.layer_segment_bytes(tiny_llama_export.onnx_path) is None
    plain = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "plain")])
    assert plain.exit_code == 0, plain.output
    monkeypatch.setattr(calib_run, "LAYER_BY_LAYER_FROM", 0)
    monkeypatch.setattr(calib_run, "LAYER_SEGMENT_BYTES", 32 << 10)
    assert calib_run.layer_segment_bytes(tiny_llama_export.onnx_path) == 32 << 10
    layered = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "layered")])
    assert layered.exit_code == 0, layered.output
    tables = [json.loads((tmp_path / d / "table.json").read_text())["amax"]
              for d in ("plain", "layered")]
    assert tables[0] == tables[1] and len(tables[0]) > 20
