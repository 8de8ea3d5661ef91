"""``quantkit demo``: the main job (``configs/demo.yaml``) on the embedded default model."""

from __future__ import annotations

from pathlib import Path

import click

from quantkit.cli.options import force_option

DEMO_RECIPE = Path("configs") / "demo.yaml"


def find_demo_recipe() -> Path:
    """configs/demo.yaml in the working directory, else beside the quantkit checkout."""
    from quantkit.errors import QuantkitError

    for base in (Path.cwd(), Path(__file__).resolve().parents[2]):
        if (base / DEMO_RECIPE).is_file():
            return base / DEMO_RECIPE
    raise QuantkitError(f"{DEMO_RECIPE} not found", "run the demo from the quantkit checkout")


@click.command("demo")
@click.option("--workdir", type=click.Path(path_type=Path),
              help="Where artifacts go (default: out/demo).")
@force_option
def command(workdir: Path | None, force: bool) -> None:
    """SmolLM2-135M (embedded, offline): export, calibrate, build FP32/FP16/INT8/mixed engines,
    measure perplexity and latency, and write an HTML report."""
    from quantkit.cli.run import run_and_print

    run_and_print(find_demo_recipe(), workdir, force, "quantkit demo")
