"""A Llama model of a known shape with random weights, saved as a local model directory that
``quantkit export --model DIR`` takes: right for measuring time and memory (every kernel's cost
depends on shapes, not values), meaningless for quality. No download: the tokenizer is a
byte-level BPE trained on the bundled sample.

    python benchmarks/random_model.py --like smollm2-135m --out out/random-smollm2
    python benchmarks/random_model.py --like tinyllama-1.1b --out out/random-tinyllama
    python benchmarks/random_model.py --like smollm2-135m --layers 6 --out out/random-smol6

Shapes are the published configs' (hidden size, MLP width, layers, heads, KV heads, vocabulary,
positions, RoPE base, tied embeddings); ``--layers`` keeps the widths with fewer blocks (a
smaller model of the same per-layer cost, e.g. to fit several processes in memory).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SHAPES = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                         max_position_embeddings=8192, rope_theta=100000.0,
                         tie_word_embeddings=True),
    "tinyllama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                           num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                           max_position_embeddings=2048, rope_theta=10000.0,
                           tie_word_embeddings=False),
}
TOKENIZER_VOCAB = 4096  # trained on the bundled sample; every id is a valid model id


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--like", choices=sorted(SHAPES), required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layers", type=int, default=None,
                   help="blocks (default: the published shape's)")
    args = p.parse_args(argv)
    if args.out.exists():
        print(f"--out {args.out} exists; give a new folder", file=sys.stderr)
        return 2
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from quantkit.doctor import sample_tokenizer

    if args.layers is not None and args.layers < 1:
        print("--layers must be at least 1", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    shape = dict(SHAPES[args.like])
    if args.layers is not None:
        shape["num_hidden_layers"] = args.layers
    config = LlamaConfig(**shape, rms_norm_eps=1e-5, bos_token_id=0,
                         eos_token_id=0, pad_token_id=None)
    model = LlamaForCausalLM(config).eval()
    tokenizer = sample_tokenizer(TOKENIZER_VOCAB)
    model.save_pretrained(str(args.out))
    tokenizer.save_pretrained(str(args.out))
    params = sum(t.numel() for t in model.parameters())
    blocks = f", {shape['num_hidden_layers']} blocks" if args.layers is not None else ""
    print(f"Wrote {args.out}: {args.like} shape{blocks}, {params / 1e6:.1f} M parameters "
          f"({4 * params / 2**30:.2f} GiB in FP32), random weights (seed {args.seed})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
