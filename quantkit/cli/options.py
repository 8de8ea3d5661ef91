"""Options shared by several commands, so they read the same everywhere."""

from __future__ import annotations

import click

force_option = click.option(
    "--force", is_flag=True, help="Replace the output if it already exists."
)
model_option = click.option(
    "--model",
    "model",
    metavar="MODEL",
    help="Hub id, local HF directory, .gguf file, or the embedded default 'smollm2-135m'.",
)
trust_remote_code_option = click.option(
    "--trust-remote-code",
    is_flag=True,
    help="Allow the model's own code from the Hub (off by default).",
)
