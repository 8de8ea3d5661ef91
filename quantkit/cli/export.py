"""``quantkit export``: HF model -> FP32 ONNX checked against PyTorch."""

from __future__ import annotations

from pathlib import Path

import click

from quantkit.cli.options import force_option, trust_remote_code_option


@click.command("export")
@click.option("--model", required=True, metavar="MODEL",
              help="Hub id, local HF directory, .gguf file, or 'smollm2-135m' (embedded).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output directory.")
@click.option("--opset", default=18, show_default=True, type=int, help="ONNX opset (18 or newer).")
@click.option("--with-nll", is_flag=True,
              help="Add an 'nll' output: per-token negative log-likelihood computed in FP32.")
@trust_remote_code_option
@force_option
def command(model: str, out: Path, opset: int, with_nll: bool, trust_remote_code: bool,
            force: bool) -> None:
    """Export MODEL to FP32 ONNX (dynamic batch and sequence) and check it against PyTorch."""
    from quantkit.artifacts import check_can_write
    from quantkit.export import export_model
    from quantkit.models import load_model

    check_can_write(out, force)
    loaded = load_model(model, trust_remote_code=trust_remote_code)
    result = export_model(loaded, out, opset=opset, with_nll=with_nll, force=force)
    check = result.manifest["check"]
    click.echo(
        f"Wrote {result.onnx_path} ({result.manifest['num_nodes']} nodes, opset {opset}); "
        f"ONNX Runtime vs PyTorch: max|dlogits|/max|logits| = {check['relative_error']:.2e}"
    )
