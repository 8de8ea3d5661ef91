"""HF causal LM -> FP32 ONNX (``input_ids``, ``attention_mask`` -> ``logits`` [, ``nll``]), or
with ``with_cache`` the KV-cache decoder graph of ``quantkit.export_cache``.

Uses ``torch.onnx.export(dynamo=True)`` at opset 18, then renames nodes after the module that made
them (``/model/layers.3/mlp/down_proj/MatMul``) and intermediate tensors after their node
(``<node>_output_<i>``), the names TensorRT caches and per-layer rules address. The export is
checked against PyTorch on a padded random batch before anything is written.
"""

from __future__ import annotations

import ast
import hashlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from quantkit.artifacts import atomic_output_dir, make_manifest, read_manifest, write_manifest
from quantkit.errors import QuantkitError

ONNX_NAME = "model.onnx"
TOKENIZER_DIR = "tokenizer"
EXPORT_KIND = "onnx-export"
DEFAULT_OPSET = 18
CHECK_TOLERANCE = 1e-4
_WRAPPER_ATTR = "hf"


@dataclass(frozen=True)
class ExportResult:
    directory: Path
    onnx_path: Path
    manifest: dict[str, Any]


def export_model(
    loaded: Any,
    out: Path,
    *,
    opset: int = DEFAULT_OPSET,
    with_nll: bool = False,
    with_cache: bool = False,
    force: bool = False,
    check_tolerance: float = CHECK_TOLERANCE,
    on_phase: Callable[[str], None] | None = None,
    external_data: bool = False,
) -> ExportResult:
    """Export ``loaded`` (a ``quantkit.models.LoadedModel``) into the directory ``out``.

    ``on_phase`` is told each phase as it starts (the export takes minutes on a real model).
    ``with_cache`` exports the KV-cache graph (``quantkit.export_cache``) instead; it does not
    combine with ``with_nll``: perplexity runs on the plain graph over whole windows, while the
    cache graph serves generation, where a log-softmax over every new token is wasted work."""
    import onnx

    phase = on_phase or (lambda _: None)

    if opset < 18:
        raise QuantkitError(
            f"opset {opset} is not supported",
            "the dynamo exporter emits opset 18; at 17 it leaves a Split node the checker rejects",
        )
    if with_cache and with_nll:
        raise QuantkitError(
            "--with-cache and --with-nll do not combine",
            "export twice: --with-nll for calibration and perplexity, --with-cache for "
            "'quantkit generate'; their node names match, so plans apply to both",
        )
    layout = None
    if with_cache:
        from quantkit.export_cache import cache_layout

        layout = cache_layout(loaded.model.config)  # an unsupported model fails before export
    out = Path(out)
    if loaded.tokenizer is not None:  # an empty tokenizer saved beside the export poisons it
        from quantkit.models import check_tokenizer

        check_tokenizer(loaded.tokenizer)
    with atomic_output_dir(out, force=force) as tmp:
        onnx_path = tmp / ONNX_NAME
        phase("exporting to ONNX (torch.onnx.export, dynamo)")
        if with_cache:
            from quantkit.export_cache import export_cache_proto

            proto = export_cache_proto(loaded.model, opset, _WRAPPER_ATTR)
        else:
            proto = _export_proto(loaded.model, opset, with_nll)
        phase("naming nodes and saving the ONNX graph")
        rename_by_module_path(proto, prefix=f"{_WRAPPER_ATTR}.")
        from quantkit.attention_mask import drop_softmax_nan_guards
        from quantkit.rms_norm import divide_by_root

        guards_removed = drop_softmax_nan_guards(proto.graph)
        rms_divisions = divide_by_root(proto.graph)
        _save(proto, onnx_path, external=external_data)
        phase("checking the ONNX graph")
        onnx.checker.check_model(str(onnx_path), full_check=True)
        if with_cache:
            from quantkit.export_cache import check_cache_against_torch

            phase("comparing ONNX Runtime with PyTorch: padded prefills and cached decode steps")
            check = check_cache_against_torch(onnx_path, loaded.model)
            check["tolerance"] = check_tolerance
        else:
            phase("comparing ONNX Runtime with PyTorch on a padded batch")
            check = check_against_torch(onnx_path, loaded.model)
        if check["relative_error"] > check_tolerance:
            raise QuantkitError(
                f"the exported ONNX differs from PyTorch: max|dlogits|/max|logits| = "
                f"{check['relative_error']:.2e} > {check_tolerance:.0e}",
                "this model is not exported faithfully; report it with the model id",
            )
        inputs = {"model": loaded.source, "opset": opset, "with_nll": with_nll}
        if external_data:  # exports without it keep the inputs (and hash) they always had
            inputs["external_data"] = True
        cache_fields: dict[str, Any] = {}
        if layout is not None:  # plain exports keep the manifest they always had
            inputs["with_cache"] = True
            from quantkit.export_cache import generation_defaults

            cache_fields["cache"] = {**layout.to_dict(),
                                     "generation": generation_defaults(loaded.model)}
        manifest = make_manifest(
            EXPORT_KIND,
            inputs,
            model_hash=onnx_model_hash(onnx_path),
            onnx=ONNX_NAME,
            exporter="torch.onnx.export(dynamo=True)",
            outputs=[o.name for o in proto.graph.output],
            num_nodes=len(proto.graph.node),
            vocab_size=int(loaded.model.config.vocab_size),
            max_positions=_max_positions(loaded.model.config),
            check=check,
            softmax_nan_guards_removed=guards_removed,
            rms_norm_divisions=rms_divisions,
            tokenizer=TOKENIZER_DIR if loaded.tokenizer is not None else None,
            **cache_fields,
        )
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(str(tmp / TOKENIZER_DIR))
        write_manifest(tmp, manifest)
    return ExportResult(out, out / ONNX_NAME, read_manifest(out, EXPORT_KIND))


def _max_positions(config: Any) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


class _Wrapper:
    """Builds the torch module lazily so importing this file does not import torch."""

    @staticmethod
    def make(model: Any, with_nll: bool) -> Any:
        import torch

        class CausalLMForExport(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                setattr(self, _WRAPPER_ATTR, model)

            def forward(self, input_ids: Any, attention_mask: Any) -> Any:
                hf = getattr(self, _WRAPPER_ATTR)
                out = hf(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
                logits = out.logits
                if not with_nll:
                    return logits
                logprobs = torch.log_softmax(logits[:, :-1, :].float(), dim=-1)
                target = input_ids[:, 1:].unsqueeze(-1)
                nll = -torch.gather(logprobs, -1, target).squeeze(-1)
                return logits, nll

        return CausalLMForExport().eval()


def _export_proto(model: Any, opset: int, with_nll: bool) -> Any:
    import torch

    wrapper = _Wrapper.make(model, with_nll)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, int(model.config.vocab_size), (2, 16), generator=gen)
    mask = torch.ones_like(ids)
    dims = {0: "batch", 1: "seq"}
    outputs = ["logits", "nll"] if with_nll else ["logits"]
    import logging
    import warnings

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed"
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # exporter deprecation chatter, not the user's concern
            program = torch.onnx.export(
                wrapper,
                (ids, mask),
                dynamo=True,
                opset_version=opset,
                input_names=["input_ids", "attention_mask"],
                output_names=outputs,
                dynamic_shapes={"input_ids": dims, "attention_mask": dims},
                verbose=False,
            )
    except Exception as exc:  # the exporter raises many types; the user needs the reason
        raise QuantkitError(f"torch.onnx.export failed: {str(exc).splitlines()[0]}") from exc
    if program is None:
        raise QuantkitError("torch.onnx.export returned no program")
    return program.model_proto


def _module_path(node: Any, prefix: str) -> str:
    """The dotted module path that produced ``node`` ('' for graph-level ops)."""
    meta = {p.key: p.value for p in node.metadata_props}
    scopes_text = meta.get("pkg.torch.onnx.name_scopes")
    if not scopes_text:
        return ""
    try:
        scopes = ast.literal_eval(scopes_text)
    except (ValueError, SyntaxError):
        return ""
    if len(scopes) < 2:
        return ""
    path = str(scopes[-2])
    if path == prefix.rstrip("."):
        return ""
    return path[len(prefix):] if path.startswith(prefix) else ""


def _slash_path(dotted: str) -> str:
    """``model.layers.3.mlp`` -> ``model/layers.3/mlp``: numeric parts stay with their parent."""
    parts: list[str] = []
    for part in dotted.split(".") if dotted else []:
        if part.isdigit() and parts:
            parts[-1] = f"{parts[-1]}.{part}"
        else:
            parts.append(part)
    return "/".join(parts)


def rename_by_module_path(proto: Any, prefix: str) -> None:
    """Rename nodes ``/<module path>/<OpType>[_k]`` and their outputs ``<node>_output_<i>``."""
    graph = proto.graph
    keep = {v.name for v in graph.input} | {v.name for v in graph.output}
    keep |= {t.name for t in graph.initializer}
    used: Counter[str] = Counter()
    tensor_names: dict[str, str] = {}
    for node in graph.node:
        path = _slash_path(_module_path(node, prefix))
        base = f"/{path}/{node.op_type}" if path else f"/{node.op_type}"
        count = used[base]
        used[base] += 1
        original = node.name
        node.name = base if count == 0 else f"{base}_{count}"
        entry = node.metadata_props.add()
        entry.key, entry.value = "quantkit.exported_name", original
        for i, out in enumerate(node.output):
            if out and out not in keep:
                tensor_names[out] = f"{node.name}_output_{i}"
    for init in graph.initializer:
        if init.name.startswith(prefix):
            tensor_names[init.name] = init.name[len(prefix):]
    _rename_tensors(graph, tensor_names)


def _rename_tensors(graph: Any, mapping: dict[str, str]) -> None:
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in mapping:
                node.input[i] = mapping[name]
        for i, name in enumerate(node.output):
            if name in mapping:
                node.output[i] = mapping[name]
    for init in graph.initializer:
        init.name = mapping.get(init.name, init.name)
    for info in graph.value_info:
        info.name = mapping.get(info.name, info.name)


def _save(proto: Any, path: Path, external: bool = False) -> None:
    """``model.onnx``, with ``model.onnx.data`` beside it past the 2 GB protobuf limit (or when
    ``external`` asks for it)."""
    from quantkit.onnx_io import save_with_external_data

    save_with_external_data(proto, path, external=external)


def onnx_model_hash(onnx_path: Path) -> str:
    """sha256 over the ONNX file and its external data file, if any."""
    digest = hashlib.sha256()
    for path in (Path(onnx_path), Path(f"{onnx_path}.data")):
        if path.is_file():
            with open(path, "rb") as fh:
                while block := fh.read(1 << 20):
                    digest.update(block)
    return digest.hexdigest()


def check_against_torch(onnx_path: Path, model: Any, seed: int = 0) -> dict[str, Any]:
    """Run ONNX Runtime and PyTorch on a right-padded random batch; compare valid positions."""
    import onnxruntime as ort
    import torch

    rng = np.random.default_rng(seed)
    batch, seq, pad = 2, 24, 5
    ids = rng.integers(0, int(model.config.vocab_size), size=(batch, seq), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[1, seq - pad :] = 0
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    ort_logits = session.run(["logits"], {"input_ids": ids, "attention_mask": mask})[0]
    with torch.no_grad():
        ref = model(
            input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), use_cache=False
        ).logits.float().numpy()
    valid = mask.astype(bool)
    diff = float(np.max(np.abs(ort_logits[valid] - ref[valid])))
    scale = float(np.max(np.abs(ref[valid])))
    return {
        "batch": batch,
        "seq": seq,
        "padded_tokens": pad,
        "max_abs_diff": diff,
        "max_abs_logit": scale,
        "relative_error": diff / scale if scale > 0 else diff,
        "tolerance": CHECK_TOLERANCE,
    }


def find_onnx(path: Path) -> Path:
    """Accept an export directory or an .onnx file; return the .onnx path."""
    path = Path(path)
    if path.is_dir():
        candidate = path / ONNX_NAME
        if candidate.is_file():
            return candidate
        raise QuantkitError(f"{path} holds no {ONNX_NAME}", "run 'quantkit export' first")
    if not path.is_file():
        raise QuantkitError(f"ONNX model {path} not found")
    return path


def tokenizer_beside(onnx_path: Path) -> Any:
    """The tokenizer saved beside an export's ONNX file (``tokenizer/``), loaded offline."""
    from quantkit.models import load_tokenizer

    directory = Path(onnx_path).parent / TOKENIZER_DIR
    if not directory.is_dir():
        raise QuantkitError(
            f"no tokenizer beside {onnx_path} (looked for {directory})",
            "use an export directory written by 'quantkit export', or pass --model",
        )
    return load_tokenizer(directory)


def export_manifest(onnx_path: Path) -> dict[str, Any] | None:
    """The export manifest beside an ONNX file, if it was written by ``export_model``."""
    directory = Path(onnx_path).parent
    try:
        return read_manifest(directory, EXPORT_KIND)
    except QuantkitError:
        return None


def write_derived_export(model: Any, source_onnx: Path, out: Path, *, exporter: str,
                         inputs: dict[str, Any], force: bool = False,
                         check: dict[str, Any] | None = None,
                         verify: Callable[[Path], dict[str, Any]] | None = None,
                         **fields: Any) -> Path:
    """Write ``model`` (a rewrite of the export at ``source_onnx``: SmoothQuant, rotation) as a
    new export directory with the source's tokenizer and a manifest of its own (its own model
    hash), atomically; return the new ONNX path. Weights the model left in the source's
    external-data file are copied from there (``quantkit.onnx_io``). ``verify`` is run on the
    written ONNX file before the manifest (raise to write nothing) and its result is the
    manifest's ``check``; ``check`` otherwise, else the source's. A KV-cache export's ``cache``
    layout is kept (the rewrites keep its inputs and outputs)."""
    import shutil

    import onnx

    from quantkit.onnx_io import save_with_external_data

    source = export_manifest(source_onnx) or {}
    with atomic_output_dir(Path(out), force=force) as tmp:
        target = tmp / ONNX_NAME
        save_with_external_data(model, target, base_dir=Path(source_onnx).parent)
        onnx.checker.check_model(str(target), full_check=True)
        if verify is not None:
            check = verify(target)
        tokenizer = Path(source_onnx).parent / TOKENIZER_DIR
        if tokenizer.is_dir():
            shutil.copytree(tokenizer, tmp / TOKENIZER_DIR)
        manifest = make_manifest(
            EXPORT_KIND,
            {"source_onnx": str(source_onnx), "source_model_hash": onnx_model_hash(source_onnx),
             **inputs},
            model_hash=onnx_model_hash(target), onnx=ONNX_NAME, exporter=exporter,
            outputs=[o.name for o in model.graph.output], num_nodes=len(model.graph.node),
            vocab_size=source.get("vocab_size"), max_positions=source.get("max_positions"),
            check=check if check is not None else source.get("check"),
            tokenizer=TOKENIZER_DIR if tokenizer.is_dir() else None,
            **({"cache": source["cache"]} if source.get("cache") else {}), **fields,
        )
        write_manifest(tmp, manifest)
    return Path(out) / ONNX_NAME
