"""Options shared by several commands, so they read the same everywhere."""

from __future__ import annotations

import shlex
import sys
from collections.abc import Callable
from typing import Any

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



def ray_option(work: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``--ray auto|local|ADDRESS`` (the value is ``ray.init``'s address); ``work`` says what
    becomes Ray tasks."""
    return click.option(
        "--ray", "ray_address", default=None, metavar="auto|local|ADDRESS",
        help=f"Run {work} as Ray tasks: 'auto' (the running Ray cluster, as Ray defines it), "
             "'local' (start Ray here) or a cluster address. Needs pip install "
             "'quantkit[ray]'.")


def max_retries_option(func: Callable[..., Any]) -> Callable[..., Any]:
    """``--max-retries N``: Ray's retries of a task whose worker or node died (with --ray)."""
    from quantkit.ray_tasks import DEFAULT_MAX_RETRIES

    return click.option(
        "--max-retries", default=DEFAULT_MAX_RETRIES, show_default=True,
        type=click.IntRange(min=0),
        help="With --ray: times Ray retries a task whose worker or node died (a task that "
             "raises is not retried).")(func)


def typed_command(ctx: click.Context) -> str:
    """The command as typed (``sys.argv``); when invoked in-process (tests, scripts), the
    equivalent command spelled out from the parsed arguments and options, defaults included."""
    argv = sys.argv[1:]
    if argv and argv[0] == ctx.info_name:
        return shlex.join(["quantkit", *argv])
    parts = ["quantkit", str(ctx.info_name)]
    for param in ctx.command.params:
        if param.name is None:
            continue
        value = ctx.params.get(param.name)
        if isinstance(param, click.Argument):
            items = value if isinstance(value, (tuple, list)) else [value]
            parts += [str(v) for v in items if v is not None]
            continue
        if not isinstance(param, click.Option) or value is None or value is False:
            continue
        flag = max(param.opts, key=len)
        if param.is_flag:
            parts.append(flag if value is True else f"--no-{flag.lstrip('-')}")
        elif param.multiple:
            for item in value:
                parts += [flag, str(item)]
        else:
            parts += [flag, str(value)]
    return shlex.join(parts)
