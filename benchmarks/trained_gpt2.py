"""A GPT-2-architecture model trained briefly on text, saved as a local model directory that
``quantkit quantize --model DIR`` takes. No GPT-2 weights are reachable here; a model with random
weights predicts almost uniformly, so no quantization error makes it consistently worse and a
perplexity budget says nothing. A short training run gives it learned token statistics (and the
LayerNorm/GELU structure of GPT-2), enough for ``quantize``'s LayerNorm path (SmoothQuant) to be
measured end to end; it is not GPT-2 124M's trained outliers.

    python benchmarks/trained_gpt2.py --text ../shared/data/wikitext-2-raw/wiki.test.raw \\
        --tokenizer ../shared/tokenizers/gpt2 --out out/gpt2-trained

The training text is ``--split`` of ``--text`` (default ``calibration[:40%]``, the part that
``quantize --dataset`` of the same file calibrates on), so the tuning and evaluation parts stay
unseen. The tokenizer is the real GPT-2 vocabulary (``vocab.json`` + ``merges.txt``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SHAPE = dict(n_layer=6, n_embd=384, n_head=6, n_inner=1536, n_positions=1024)


def gpt2_tokenizer(directory: Path):
    """The GPT-2 BPE from its two files. ``GPT2TokenizerFast(vocab_file=..., merges_file=...)``
    builds an empty tokenizer under transformers 5.25; passing the loaded vocabulary and merges
    does not."""
    from transformers import GPT2TokenizerFast

    vocab = json.loads((directory / "vocab.json").read_text(encoding="utf-8"))
    lines = (directory / "merges.txt").read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split()) for line in lines[1:] if line.strip()]
    tokenizer = GPT2TokenizerFast(vocab=vocab, merges=merges)
    ids = tokenizer("Hello world")["input_ids"]
    if ids != [15496, 995]:
        from quantkit.errors import QuantkitError

        raise QuantkitError(f"the GPT-2 tokenizer from {directory} gives {ids} for "
                            "'Hello world', not GPT-2's [15496, 995]",
                            "point --tokenizer at GPT-2's vocab.json and merges.txt")
    return tokenizer


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--text", required=True, help="a local text file (or folder)")
    p.add_argument("--split", default="calibration[:40%]", help="the part trained on")
    p.add_argument("--tokenizer", type=Path, required=True,
                   help="folder with GPT-2's vocab.json and merges.txt")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if args.out.exists():
        print(f"--out {args.out} exists; give a new folder", file=sys.stderr)
        return 2
    from quantkit.errors import QuantkitError

    try:
        return train(args)
    except QuantkitError as error:
        print(f"Error: {error.message}" + (f"\n  {error.hint}" if error.hint else ""),
              file=sys.stderr)
        return 2


def train(args: argparse.Namespace) -> int:
    """Train and save into ``args.out`` (written beside it, then renamed: no half-written
    model folder if the run stops)."""
    import shutil

    import numpy as np
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from quantkit.data import iter_texts, resolve_text_source
    from quantkit.errors import QuantkitError

    for name in ("vocab.json", "merges.txt"):
        if not (args.tokenizer / name).is_file():
            raise QuantkitError(f"{args.tokenizer / name} not found",
                                "point --tokenizer at the folder with GPT-2's vocab.json and "
                                "merges.txt (../shared/tokenizers/gpt2)")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tokenizer = gpt2_tokenizer(args.tokenizer)
    source = resolve_text_source(args.text, split=args.split)
    ids = np.concatenate([np.asarray(tokenizer(t)["input_ids"], dtype=np.int64)
                          for t in iter_texts(source)])
    config = GPT2Config(vocab_size=len(tokenizer), **SHAPE, bos_token_id=50256,
                        eos_token_id=50256)
    model = GPT2LMHeadModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr,
                                                   total_steps=args.steps, pct_start=0.1)
    rng = np.random.default_rng(args.seed)
    model.train()
    started = time.perf_counter()
    for step in range(1, args.steps + 1):
        starts = rng.integers(0, len(ids) - args.seq_len - 1, args.batch)
        batch = torch.from_numpy(np.stack([ids[s: s + args.seq_len] for s in starts]))
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 25 == 0 or step == args.steps:
            print(f"step {step}/{args.steps}: loss {loss.item():.3f} "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)
    model.eval()
    partial = args.out.with_name(args.out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(str(partial))
    tokenizer.save_pretrained(str(partial))
    partial.rename(args.out)
    params = sum(t.numel() for t in model.parameters())
    print(f"Wrote {args.out}: GPT-2 architecture {SHAPE}, {params / 1e6:.1f} M parameters, "
          f"{args.steps} steps of {args.batch} x {args.seq_len} tokens on {source.name} "
          f"{args.split} ({len(ids):,} tokens)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
