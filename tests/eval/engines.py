"""Tiny real models for evaluation tests: random-weight HF models, exported to ONNX and built into
FP32 ONNX Runtime engines. Built once per test session (shared by tests/eval and tests/cli)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("QUANTKIT_SHARED", REPO.parent / "shared"))
GPT2_TOKENIZER = SHARED / "tokenizers" / "gpt2"
WIKITEXT_TEST = SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw"
TINY_MAX_POSITIONS = 256

_BUILT: dict[str, Path] = {}


def byte_tokenizer() -> Any:
    """A byte-level BPE tokenizer of exactly the 256 byte symbols (no merges): one token a byte."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def gpt2_tokenizer() -> Any:
    if not GPT2_TOKENIZER.is_dir():
        pytest.skip(f"shared GPT-2 tokenizer not found at {GPT2_TOKENIZER} (../shared is absent)")
    from transformers import GPT2TokenizerFast

    # transformers 5 ignores vocab_file=/merges_file= (an empty tokenizer): load the folder
    tokenizer = GPT2TokenizerFast.from_pretrained(str(GPT2_TOKENIZER))
    assert tokenizer("Hello world")["input_ids"] == [15496, 995]
    return tokenizer


def tiny_llama(seed: int = 0) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=TINY_MAX_POSITIONS,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0) -> Any:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=50257, n_embd=64, n_layer=2, n_head=4,
                        n_positions=TINY_MAX_POSITIONS)
    return GPT2LMHeadModel(config).eval()


def export_and_build(model: Any, tokenizer: Any, root: Path, name: str, with_nll: bool) -> Path:
    """Export ``model`` to ONNX under ``root/name-export`` and build an FP32 ORT engine
    ``root/name``; return the engine directory."""
    from quantkit.backends import get_backend
    from quantkit.backends.base import BuildRequest
    from quantkit.export import export_model
    from quantkit.models import LoadedModel, ModelSpec

    exported = export_model(
        LoadedModel(model, tokenizer, ModelSpec("dir", name), {}), root / f"{name}-export",
        with_nll=with_nll,
    )
    engine = get_backend("onnxruntime").build(
        BuildRequest(exported.onnx_path, "fp32", None, None, {}), root / name
    )
    return engine.path


def built(root: Path, key: str) -> Path:
    """The engine directory for ``key``, built on first use in this session.

    keys: ``llama`` (fused nll), ``llama-logits`` (no nll output, same weights, so a different
    ONNX and model hash), ``llama-twin`` (a second FP32 engine from the ``llama`` export),
    ``gpt2`` (real GPT-2 tokenizer; skipped without ../shared).
    """
    if key in _BUILT:
        return _BUILT[key]
    from quantkit.backends import get_backend
    from quantkit.backends.base import BuildRequest

    if key == "llama":
        path = export_and_build(tiny_llama(), byte_tokenizer(), root, key, with_nll=True)
    elif key == "llama-logits":
        path = export_and_build(tiny_llama(), byte_tokenizer(), root, key, with_nll=False)
    elif key == "llama-twin":
        source = built(root, "llama")
        onnx_path = source.parent / "llama-export" / "model.onnx"
        path = get_backend("onnxruntime").build(
            BuildRequest(onnx_path, "fp32", None, None, {}), root / key
        ).path
    elif key == "gpt2":
        path = export_and_build(tiny_gpt2(), gpt2_tokenizer(), root, key, with_nll=True)
    else:
        raise KeyError(key)
    _BUILT[key] = path
    return path


def copy_with_tokenizer(engine: Path, tokenizer: Any, out: Path) -> Path:
    """A copy of ``engine`` whose saved tokenizer is replaced by ``tokenizer``."""
    shutil.copytree(engine, out)
    shutil.rmtree(out / "tokenizer")
    tokenizer.save_pretrained(str(out / "tokenizer"))
    return out


def torch_model_of(key: str) -> Any:
    """The PyTorch model a tiny engine was exported from (same seed, same weights)."""
    return {"llama": tiny_llama, "llama-logits": tiny_llama, "gpt2": tiny_gpt2}[key]()
