"""``quantkit rotate``: an FP32 export with its outliers rotated away (QuaRot-style), no data."""

from __future__ import annotations

from pathlib import Path

import click

from quantkit.cli.options import force_option


@click.command("rotate")
@click.option("--onnx", required=True, type=click.Path(path_type=Path),
              help="A Llama-family FP32 export directory (or its model.onnx).")
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Output export directory (calibrate, build and evaluate it like any export).")
@click.option("--seed", default=0, show_default=True, type=int,
              help="Seed of the random orthogonal matrix and the Hadamard signs.")
@click.option("--down-block", default=512, show_default=True, type=int,
              help="Channels per online Hadamard block before each down_proj (a power of 2; "
                   "0: none). Larger spreads outliers further, at 8 FP32 multiply-adds per "
                   "channel for each factor of 8 (24 for 512).")
@force_option
def command(onnx: Path, out: Path, seed: int, down_block: int, force: bool) -> None:
    """Rotate the residual stream, the attention values and the down_proj inputs of an FP32
    export by orthogonal matrices (exact in FP32, checked), so per-tensor INT8 loses less."""
    from quantkit.artifacts import check_can_write
    from quantkit.export import export_manifest, find_onnx
    from quantkit.rotation import rotate_export

    check_can_write(out, force)
    target = rotate_export(find_onnx(onnx), out, seed=seed, down_block=down_block, force=force)
    manifest = export_manifest(target) or {}
    summary, check = manifest.get("rotation", {}), manifest.get("check", {})
    residual, heads, down = summary["residual"], summary["heads"], summary["down"]
    click.echo(
        f"Wrote {target}: residual stream (d={summary['hidden_size']}) rotated through "
        f"{residual['norms']} norms, {residual['readers']} readers and {residual['writers']} "
        f"writers; {heads['layers']} attention layers' values (head size {heads['head_dim']}); "
        f"{down['layers']} down_proj inputs online (block {down.get('block', 0)}). "
        f"FP32 check: max|dlogits|/max|logits| = {check.get('relative_error', float('nan')):.2e}"
    )
