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
@click.option("--with-cache", is_flag=True,
              help="Export the KV-cache decoder graph for 'quantkit generate' (past key/value "
                   "inputs, present outputs, position_ids; prefill and decode in one graph). "
                   "Not with --with-nll.")
@click.option("--external-data", is_flag=True,
              help="Keep the weights in model.onnx.data beside model.onnx whatever their size "
                   "(past the 2 GB protobuf limit they always are there).")
@trust_remote_code_option
@force_option
def command(model: str, out: Path, opset: int, with_nll: bool, with_cache: bool,
            external_data: bool, trust_remote_code: bool, force: bool) -> None:
    """Export MODEL to FP32 ONNX (dynamic batch and sequence) and check it against PyTorch."""
    from quantkit.artifacts import check_can_write
    from quantkit.export import export_model
    from quantkit.models import load_model

    check_can_write(out, force)
    if with_cache and with_nll:  # refuse before the model is loaded
        export_model(None, out, with_nll=True, with_cache=True)
    loaded = load_model(model, trust_remote_code=trust_remote_code)
    result = export_model(loaded, out, opset=opset, with_nll=with_nll,
                          with_cache=with_cache, force=force, external_data=external_data)
    check = result.manifest["check"]
    click.echo(
        f"Wrote {result.onnx_path} ({result.manifest['num_nodes']} nodes, opset {opset}); "
        f"ONNX Runtime vs PyTorch: max|dlogits|/max|logits| = {check['relative_error']:.2e}"
    )
    cache = result.manifest.get("cache")
    if cache:
        click.echo(f"KV cache: {cache['num_layers']} layers x {cache['num_kv_heads']} kv heads x "
                   f"head dim {cache['head_dim']} ({cache['dtype']}, {cache['layout']}); checked "
                   f"on padded prefills and {check['decode_steps']} cached decode steps")
