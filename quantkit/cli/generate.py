"""``quantkit generate``: greedy text from a KV-cache engine, with time to first token and time per
output token."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("generate")
@click.option("--engine", "engine_path", required=True, type=click.Path(path_type=Path),
              help="Engine directory built from 'quantkit export --with-cache'.")
@click.option("--prompt", "prompts", multiple=True, required=True, metavar="TEXT",
              help="Prompt (repeatable: several prompts run as one left-padded batch).")
@click.option("--max-new-tokens", default=64, show_default=True, type=int,
              help="Tokens to generate after each prompt (fewer where end-of-text comes first).")
@click.option("--threads", type=int, default=None,
              help="ONNX Runtime intra-op threads [default: every core].")
def command(engine_path: Path, prompts: tuple[str, ...], max_new_tokens: int,
            threads: int | None) -> None:
    """Greedy-decode after each PROMPT on ENGINE; one prompt streams its text as it comes.

    \b
    quantkit export --model smollm2-135m --with-cache --out out/smollm2-cache
    quantkit build --onnx out/smollm2-cache --precision fp32 --out out/gen-fp32
    quantkit generate --engine out/gen-fp32 --prompt "The capital of France is"
    """
    from quantkit.generate import check_request, generate

    check_request(list(prompts), max_new_tokens)  # bad input fails before the engine loads
    stream = len(prompts) == 1
    if stream:
        click.echo(prompts[0], nl=False)
    result = generate(engine_path, list(prompts), max_new_tokens=max_new_tokens, threads=threads,
                      on_text=(lambda text: click.echo(text, nl=False)) if stream else None)
    if stream:
        click.echo()
    else:
        for i, (prompt, text) in enumerate(zip(result.prompts, result.texts, strict=True)):
            click.echo(f"[{i}] {prompt}{text}")
    t = result.timing
    p50 = t.per_token_p50_s
    per_token = f"{1000 * p50:.1f} ms" if p50 is not None else "n/a (one token)"
    click.echo(
        f"batch {t.batch}, prompt {t.prompt_tokens} tokens, {t.new_tokens} new tokens: "
        f"time to first token {1000 * t.ttft_s:.1f} ms, time per output token (p50 of "
        f"{len(t.decode_steps_s)} decode steps) {per_token}, {t.tokens_per_s:.1f} tokens/s",
        err=True)
