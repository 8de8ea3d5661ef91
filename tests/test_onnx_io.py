"""Graphs whose weights live in an external-data file: rewrites read them one at a time and
write them beside the new graph, never through a 2 GB protobuf (quantkit.onnx_io)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from quantkit.onnx_io import is_external, read_initializer, save_with_external_data
from quantkit.rotation import rotate_export


@pytest.fixture(scope="module")
def external_llama_export(tiny_llama_export, tmp_path_factory):
    """The tiny Llama export with every initializer of 1 KiB or more in model.onnx.data."""
    import shutil

    out = tmp_path_factory.mktemp("external") / "tiny-llama"
    shutil.copytree(tiny_llama_export.directory, out)
    model = onnx.load(str(out / "model.onnx"))
    onnx.save_model(model, str(out / "model.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=1024)
    return out


def _logits(path, seed=0):
    ids = np.random.default_rng(seed).integers(0, 512, (2, 16), dtype=np.int64)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0]


def test_read_initializer_reads_one_tensor_and_leaves_the_graph_weightless(
        external_llama_export):
    model = onnx.load(str(external_llama_export / "model.onnx"), load_external_data=False)
    loaded = onnx.load(str(external_llama_export / "model.onnx"))
    values = {t.name: numpy_helper.to_array(t) for t in loaded.graph.initializer}
    external = [t for t in model.graph.initializer if is_external(t)]
    assert len(external) >= 10
    for tensor in external:
        np.testing.assert_array_equal(read_initializer(tensor, external_llama_export),
                                      values[tensor.name])
        assert not tensor.HasField("raw_data")  # reading did not load it into the graph


def test_save_copies_untouched_weights_from_the_source_file(external_llama_export, tmp_path):
    model = onnx.load(str(external_llama_export / "model.onnx"), load_external_data=False)
    first = next(t for t in model.graph.initializer if is_external(t))
    changed = read_initializer(first, external_llama_export) * 2  # one tensor rewritten
    first.CopyFrom(numpy_helper.from_array(changed, first.name))
    target = tmp_path / "model.onnx"
    save_with_external_data(model, target, base_dir=external_llama_export)
    assert (tmp_path / "model.onnx.data").is_file()
    assert target.stat().st_size < 1e6  # the graph file holds no large weights
    saved = onnx.load(str(target))
    source = onnx.load(str(external_llama_export / "model.onnx"))
    expected = {t.name: numpy_helper.to_array(t) for t in source.graph.initializer}
    expected[first.name] = changed
    for tensor in saved.graph.initializer:
        np.testing.assert_array_equal(numpy_helper.to_array(tensor), expected[tensor.name])
    offsets = [int(e.value) for t in onnx.load(str(target), load_external_data=False)
               .graph.initializer for e in t.external_data if e.key == "offset"]
    assert offsets and all(o % 4096 == 0 for o in offsets)  # each tensor can be mapped


def test_a_small_in_memory_model_is_saved_as_one_file(tiny_llama_export, tmp_path):
    model = onnx.load(str(tiny_llama_export.onnx_path))
    save_with_external_data(model, tmp_path / "model.onnx")
    assert not (tmp_path / "model.onnx.data").exists()
    assert (tmp_path / "model.onnx").read_bytes() == tiny_llama_export.onnx_path.read_bytes()


def test_rotation_of_an_external_data_export_equals_the_inline_one(
        tiny_llama_export, external_llama_export, tmp_path):
    inline = rotate_export(tiny_llama_export.onnx_path, tmp_path / "inline", seed=3)
    external = rotate_export(external_llama_export / "model.onnx", tmp_path / "external", seed=3)
    # rotation rewrites every weight of this small model, so both results are one file
    np.testing.assert_array_equal(_logits(external), _logits(inline))
    manifest = json.loads((tmp_path / "external" / "manifest.json").read_text())
    assert manifest["check"]["relative_error"] < 1e-4
    assert manifest["check"]["against"] == "source_onnx"


def test_gptq_of_an_external_data_export_equals_the_inline_one(tiny_llama_export,
                                                              external_llama_export):
    from quantkit.calib.gptq import gptq_weights
    from tests.build_helpers import token_feeds

    feeds = token_feeds(2, batch=2, seq=24, seed=4)
    inline, _ = gptq_weights(tiny_llama_export.onnx_path, feeds)
    external, _ = gptq_weights(external_llama_export / "model.onnx", feeds)
    assert inline.keys() == external.keys() and len(inline) >= 10
    for key, weight in inline.items():
        np.testing.assert_array_equal(external[key].q, weight.q)
        np.testing.assert_array_equal(external[key].scale, weight.scale)


def test_calibration_of_an_external_data_export_equals_the_inline_one(tiny_llama_export,
                                                                     external_llama_export):
    """Segment sessions load the weights from a hard link beside them: ONNX Runtime refuses
    external data that resolves outside the loaded model's folder (a symbolic link did)."""
    from quantkit.calib.collect import collect_activation_stats
    from tests.build_helpers import token_feeds

    feeds = token_feeds(2, batch=2, seq=24, seed=6)
    inline = collect_activation_stats(tiny_llama_export.onnx_path, feeds, tensors="quantizable",
                                      max_tensors_per_segment=4)
    external = collect_activation_stats(external_llama_export / "model.onnx", feeds,
                                        tensors="quantizable", max_tensors_per_segment=4)
    assert inline.histograms.keys() == external.histograms.keys()
    for name, hist in inline.histograms.items():
        np.testing.assert_array_equal(external.histograms[name].counts, hist.counts)
        assert external.histograms[name].amax == hist.amax


def test_load_model_reads_weights_a_calibration_has_hard_linked(external_llama_export,
                                                                tmp_path) -> None:
    """While a calibration of an export runs, its data file has a second hard link beside the
    segment models; onnx.load refuses such a file ("hardlink attack"), quantkit's loader
    reads it (a build beside a running calibration failed that way)."""
    import os

    from quantkit.onnx_io import load_model

    data = next(p for p in external_llama_export.iterdir() if p.suffix == ".data")
    os.link(data, tmp_path / data.name)
    try:
        model = load_model(external_llama_export / "model.onnx")
    finally:
        (tmp_path / data.name).unlink()
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    reference = onnx.load(str(external_llama_export / "model.onnx"))
    want = {t.name: onnx.numpy_helper.to_array(t) for t in reference.graph.initializer}
    for t in model.graph.initializer:
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(t), want[t.name])


def test_load_model_refuses_data_outside_the_folder(tiny_llama_export, tmp_path) -> None:
    from quantkit.onnx_io import load_model

    model = onnx.load(str(tiny_llama_export.onnx_path))
    weight = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    weight.data_location = onnx.TensorProto.EXTERNAL
    del weight.external_data[:]
    weight.external_data.add(key="location", value="../elsewhere.bin")
    weight.ClearField("raw_data")
    onnx.save(model, str(tmp_path / "model.onnx"))
    with pytest.raises(ValueError, match="outside the model's folder"):
        load_model(tmp_path / "model.onnx")
