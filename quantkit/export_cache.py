"""The KV-cache decoder graph of ``quantkit export --with-cache``: one ONNX graph for prefill (past
length 0) and decode.

Inputs ``input_ids`` [batch, seq], ``attention_mask`` [batch, past_seq + seq] (1 for real tokens,
0 for padding, over the cached and the new tokens), ``position_ids`` [batch, seq] and, per layer
``i``, ``past_key_values.<i>.key`` / ``.value`` [batch, kv_heads, past_seq, head_dim]; outputs
``logits`` [batch, seq, vocab] and ``present.<i>.key`` / ``.value`` [batch, kv_heads,
past_seq + seq, head_dim] (the names optimum and onnxruntime-genai use). Positions are an input,
as in Hugging Face's ``generate``: ``cumsum(attention_mask) - 1`` for a left-padded prompt, then
one more per new token (``quantkit.generate`` computes them).

transformers 5 passes the cache as a ``DynamicCache`` object (``cache=``); the wrapper below takes
flat tensors, fills a ``DynamicCache`` with them and returns the updated layers flat. The wrapper
holds the model under the same attribute as the plain export's, so the exporter scopes nodes by
the same module paths and ``quantkit.export.rename_by_module_path`` gives the same node names
(``/model/layers.3/mlp/down_proj/MatMul``) where the same module makes them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from quantkit.errors import QuantkitError

PAST_TEMPLATE = "past_key_values.{layer}.{kind}"
PRESENT_TEMPLATE = "present.{layer}.{kind}"
CACHE_LAYOUT = "batch, kv_heads, seq, head_dim"
BASE_INPUTS = ("input_ids", "attention_mask", "position_ids")
_KINDS = ("key", "value")


@dataclass(frozen=True)
class CacheLayout:
    """What a cache graph's past/present tensors are: recorded in the export and engine
    manifests so ``generate`` can make empty caches without looking into the graph."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str = "float32"
    layout: str = CACHE_LAYOUT

    @property
    def past_names(self) -> list[str]:
        return [PAST_TEMPLATE.format(layer=i, kind=k)
                for i in range(self.num_layers) for k in _KINDS]

    @property
    def present_names(self) -> list[str]:
        return [PRESENT_TEMPLATE.format(layer=i, kind=k)
                for i in range(self.num_layers) for k in _KINDS]

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        """Zero-length past tensors: the feeds of a prefill."""
        shape = (batch, self.num_kv_heads, 0, self.head_dim)
        return {name: np.zeros(shape, dtype=self.dtype) for name in self.past_names}

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "inputs": [*BASE_INPUTS, *self.past_names],
                "outputs": ["logits", *self.present_names], "position_ids": "input"}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CacheLayout:
        return cls(int(data["num_layers"]), int(data["num_kv_heads"]), int(data["head_dim"]),
                   str(data.get("dtype", "float32")), str(data.get("layout", CACHE_LAYOUT)))


def cache_layout(config: Any) -> CacheLayout:
    """The layout of a Llama- or GPT-2-family model's cache, from its config."""
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    if not (layers and heads and hidden):
        raise QuantkitError(f"cannot read the cache layout of a {type(config).__name__}",
                            "export with --with-cache supports the Llama and GPT-2 families")
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    layer_types = getattr(config, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        raise QuantkitError(f"{type(config).__name__} has layers of types "
                            f"{sorted(set(layer_types))}",
                            "export with --with-cache supports full-attention layers only")
    return CacheLayout(int(layers), int(kv_heads), int(head_dim))


def generation_defaults(model: Any) -> dict[str, Any]:
    """The end-of-text and padding token ids Hugging Face's ``generate`` uses for ``model`` (its
    generation config, else its config), for ``quantkit generate`` to stop where it stops."""
    config = getattr(model, "generation_config", None) or model.config
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    eos_ids = [int(e) for e in eos] if isinstance(eos, (list, tuple)) else (
        [] if eos is None else [int(eos)])
    pad = getattr(config, "pad_token_id", None)
    return {"eos_token_ids": eos_ids, "pad_token_id": None if pad is None else int(pad)}


def make_cache_wrapper(model: Any, attr: str) -> Any:
    """A torch module ``(input_ids, attention_mask, position_ids, *past) -> (logits, *present)``
    holding ``model`` as ``attr``. Torch is imported here, not at module import."""
    import torch
    from transformers import DynamicCache

    layout = cache_layout(model.config)

    class CausalLMWithCache(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            setattr(self, attr, model)

        def forward(self, input_ids: Any, attention_mask: Any, position_ids: Any,
                    *past: Any) -> Any:
            hf = getattr(self, attr)
            cache = DynamicCache(config=hf.config)
            for i in range(layout.num_layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            # logits of the last position only: generation reads nothing else, and the LM
            # head over a whole prompt is a fifth of a SmolLM2 prefill (576 x 49,152 per token)
            out = hf(input_ids=input_ids, attention_mask=attention_mask,
                     position_ids=position_ids, cache=cache, use_cache=True, logits_to_keep=1)
            flat: list[Any] = []
            for layer in out.cache.layers:
                flat += [layer.keys, layer.values]
            return (out.logits, *flat)

    return CausalLMWithCache().eval()


def export_cache_proto(model: Any, opset: int, attr: str) -> Any:
    """``torch.onnx.export(dynamo=True)`` of the cache wrapper; dynamic batch, new-token length
    and past length (traced with a past of 3 tokens: 0 and 1 would be specialised)."""
    import logging
    import warnings

    import torch

    layout = cache_layout(model.config)
    wrapper = make_cache_wrapper(model, attr)
    gen = torch.Generator().manual_seed(0)
    batch, seq, past_len = 2, 5, 3
    ids = torch.randint(0, int(model.config.vocab_size), (batch, seq), generator=gen)
    mask = torch.ones(batch, past_len + seq, dtype=torch.long)
    positions = torch.arange(past_len, past_len + seq).unsqueeze(0).repeat(batch, 1)
    past = tuple(torch.randn(batch, layout.num_kv_heads, past_len, layout.head_dim,
                             generator=gen) for _ in layout.past_names)
    dims = {0: "batch", 1: "seq"}
    dynamic = {"input_ids": dims, "attention_mask": {0: "batch", 1: "total_seq"},
               "position_ids": dims,
               "past": tuple({0: "batch", 2: "past_seq"} for _ in layout.past_names)}
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed"
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                wrapper, (ids, mask, positions, *past), dynamo=True, opset_version=opset,
                input_names=[*BASE_INPUTS, *layout.past_names],
                output_names=["logits", *layout.present_names],
                dynamic_shapes=dynamic, verbose=False,
            )
    except Exception as exc:  # the exporter raises many types; the user needs the reason
        raise QuantkitError(f"torch.onnx.export (with cache) failed: "
                            f"{str(exc).splitlines()[0]}") from exc
    if program is None:
        raise QuantkitError("torch.onnx.export returned no program")
    return program.model_proto


def hf_positions(mask: np.ndarray) -> np.ndarray:
    """Positions of a (left- or right-) padded prompt as Hugging Face's ``generate`` makes them:
    ``cumsum(mask) - 1``, 0 at padding."""
    positions = np.cumsum(mask, axis=-1) - 1
    return np.where(mask == 0, 0, positions).astype(np.int64)


def check_cache_against_torch(onnx_path: Any, model: Any, seed: int = 0,
                              decode_steps: int = 3) -> dict[str, Any]:
    """Compare ONNX Runtime with PyTorch: a right-padded prefill (past 0), a left-padded prefill,
    then ``decode_steps`` single-token steps that feed the ONNX graph its own present tensors
    while PyTorch keeps its own DynamicCache. Logits of the last position where it is a real
    token (the graph outputs no others); relative error is max|dlogits| / max|logits| over all
    of them. The presents carry every position, so the decode steps check those too."""
    import onnxruntime as ort
    import torch

    layout = cache_layout(model.config)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    vocab = int(model.config.vocab_size)
    batch, seq, pad = 2, 12, 5
    diffs: list[float] = []
    scales: list[float] = []

    def compare(onnx_logits: np.ndarray, ref: Any, valid: np.ndarray) -> None:
        """The graph's logits are the last position's: compare rows whose last token is real."""
        ref_np = ref.float().numpy()[:, -1]
        rows = valid[:, -1]
        diffs.append(float(np.max(np.abs(onnx_logits[:, -1][rows] - ref_np[rows]))))
        scales.append(float(np.max(np.abs(ref_np[rows]))))

    def run(ids: np.ndarray, mask: np.ndarray, positions: np.ndarray,
            past: dict[str, np.ndarray]) -> list[np.ndarray]:
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, **past}
        return list(session.run(["logits", *layout.present_names], feeds))

    ids = rng.integers(0, vocab, size=(batch, seq), dtype=np.int64)
    with torch.no_grad():
        # right padding, past 0: the plain export's check, through the cache graph
        mask = np.ones_like(ids)
        mask[1, seq - pad:] = 0
        out = run(ids, mask, hf_positions(mask), layout.empty_past(batch))
        ref = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                    position_ids=torch.from_numpy(hf_positions(mask)), use_cache=False).logits
        compare(out[0], ref, mask.astype(bool))
        # left padding, then decode steps reusing the cache
        mask = np.ones_like(ids)
        mask[1, :pad] = 0
        positions = hf_positions(mask)
        out = run(ids, mask, positions, layout.empty_past(batch))
        hf_out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                       position_ids=torch.from_numpy(positions), use_cache=True)
        compare(out[0], hf_out.logits, mask.astype(bool))
        cache, presents = hf_out.cache, out[1:]
        for _ in range(decode_steps):
            step = rng.integers(0, vocab, size=(batch, 1), dtype=np.int64)
            mask = np.concatenate([mask, np.ones((batch, 1), dtype=mask.dtype)], axis=1)
            positions = positions[:, -1:] + 1
            past = dict(zip(layout.past_names, presents, strict=True))
            out = run(step, mask, positions, past)
            hf_out = model(input_ids=torch.from_numpy(step),
                           attention_mask=torch.from_numpy(mask),
                           position_ids=torch.from_numpy(positions), cache=cache,
                           use_cache=True)
            compare(out[0], hf_out.logits, np.ones((batch, 1), dtype=bool))
            cache, presents = hf_out.cache, out[1:]
    diff, scale = max(diffs), max(scales)
    return {
        "batch": batch, "seq": seq, "padded_tokens": pad, "padding": ["right", "left"],
        "decode_steps": decode_steps, "max_abs_diff": diff, "max_abs_logit": scale,
        "relative_error": diff / scale if scale > 0 else diff,
    }
