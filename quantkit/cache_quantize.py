"""The steps of ``quantkit quantize --with-cache``: the verified plan as a KV-cache engine that
``quantkit generate`` runs, checked by greedy generation against an FP32 cache engine.

After the plan is verified on the plain graph: the cache graph of the same model (exported by
this command from ``--model``, or ``--cache-onnx``) gets the same transform (rotation with the
same seed, or the plain graph's SmoothQuant carried, ``quantkit.cache_transform``), then two
engines are built from it, FP32 and the quantized one (the verified engine's precision, plan,
tuned table with its GPTQ weights, and build options, the table carried node by node,
``quantkit.cache_tables``), and both greedy-decode a fixed prompt set
(``quantkit.generation_check``). Each is a resumable step of ``quantkit.steps``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from quantkit.errors import QuantkitError

CACHE_EXPORT_DIR = "cache-export"
GENERATION_NAME = "generation.json"
CACHE_FP32 = "cache-fp32"
CACHE_QUANTIZED = "cache-quantized"
def check_cache_settings(config: Any) -> None:
    """``--with-cache`` needs a cache export: exported from ``--model``, or ``--cache-onnx``."""
    if config.cache_onnx is not None and not config.with_cache:
        raise QuantkitError("--cache-onnx is for --with-cache", "add --with-cache, or drop it")
    if config.with_cache and config.model is None and config.cache_onnx is None:
        raise QuantkitError(
            "--with-cache with --onnx needs the KV-cache export of the same model",
            "pass --cache-onnx DIR (from 'quantkit export --with-cache'), or --model to export "
            "both")
    if int(config.generation_tokens) < 1:
        raise QuantkitError(f"generation-tokens must be at least 1, got "
                            f"{config.generation_tokens}")
    if config.with_cache and config.cache_onnx is not None:
        from quantkit.export import export_manifest, find_onnx

        onnx_path = find_onnx(Path(config.cache_onnx))
        if not (export_manifest(onnx_path) or {}).get("cache"):
            raise QuantkitError(f"{config.cache_onnx} is not a KV-cache export",
                                "export it with 'quantkit export --with-cache'")


def cache_step_count(config: Any, transform: str) -> int:
    """This module's steps: the cache export (from a model), a transform of the cache graph,
    two builds and the generation check."""
    return 3 + (transform != "none") + (config.cache_onnx is None)


def export_cache_step(config: Any, steps: Any, out: Path, transform: str) -> Path:
    """The cache export's directory: ``--cache-onnx``'s, or a step exporting ``--model`` (before
    the search, so a ``--time-budget`` counts it)."""
    from quantkit.export import find_onnx

    if config.cache_onnx is not None:
        return find_onnx(Path(config.cache_onnx)).parent
    directory = Path(out) / CACHE_EXPORT_DIR

    def make(replace_: bool) -> None:
        from quantkit.export import export_model
        from quantkit.models import load_model

        export_model(load_model(config.model, trust_remote_code=config.trust_remote_code),
                     directory, with_cache=True, force=replace_)

    steps.run("export cache", {"model": config.model}, directory, make)
    return directory


def cache_steps(config: Any, steps: Any, out: Path, *, cache_export: Path, transform: str,
                source_dir: Path, graph_dir: Path, tune_dir: Path) -> dict[str, Any]:
    """Transform the cache graph as the plain one was, build its FP32 and quantized engines,
    compare their greedy tokens; return ``generation.json``'s content, the cache graph and the
    quantized engine, and print the agreement.

    ``source_dir``: the plain export before the transform; ``graph_dir``: the plain graph the
    engines were built from (rotated or smoothed); ``tune_dir``: autotune's output."""
    from quantkit.artifacts import read_json
    from quantkit.export import find_onnx
    from quantkit.steps import artifact_hash

    out = Path(out)
    graph = _transform_step(config, steps, out, cache_export, transform, source_dir, graph_dir)
    engines = out / "engines"
    fp32 = engines / CACHE_FP32
    steps.run(f"build {CACHE_FP32}", {"onnx": artifact_hash(graph), "attention": "auto"}, fp32,
              _fp32_builder(fp32, graph))
    quantized = engines / CACHE_QUANTIZED
    steps.run(f"build {CACHE_QUANTIZED}", {"onnx": artifact_hash(graph),
                                           "autotune": artifact_hash(tune_dir),
                                           "attention": "auto"}, quantized,
              _quantized_builder(quantized, graph, tune_dir, find_onnx(graph_dir)))
    report = out / GENERATION_NAME

    def make_check(replace_: bool) -> None:
        from quantkit.artifacts import atomic_write_json
        from quantkit.generation_check import greedy_agreement

        atomic_write_json(report, greedy_agreement(
            fp32, quantized, config.generation_prompts, config.generation_tokens,
            threads=config.threads))

    steps.run("generation check", {"engines": [artifact_hash(fp32), artifact_hash(quantized)],
                                   "prompts": list(config.generation_prompts),
                                   "tokens": config.generation_tokens,
                                   "threads": config.threads}, report, make_check)
    agreement = read_json(report)
    from quantkit.generation_check import describe

    attention = attention_summary(read_json(quantized / "manifest.json"))
    steps.say(f"{CACHE_QUANTIZED}: {attention['line']}")
    steps.say(f"generation ({CACHE_QUANTIZED} against {CACHE_FP32}): {describe(agreement)}")
    return {**agreement, "cache_graph": str(graph), "cache_engine": str(quantized),
            "attention": {k: v for k, v in attention.items() if k != "line"}}


def attention_summary(manifest: dict[str, Any]) -> dict[str, Any]:
    """What a cache engine's build did to its attention, and one line saying so."""
    record = manifest.get("attention") or {}
    coverage = manifest.get("int8_coverage")
    share = f"; {100 * coverage:.1f} % of MACs INT8" if isinstance(coverage, float) else ""
    if not record.get("fused"):
        reason = record.get("reason") or "not recorded"
        return {"fused": False, "reason": reason,
                "line": f"attention as exported ({reason}){share}"}
    moved = len(record.get("planned_int8_now_float") or [])
    return {"fused": True, "layers": record["layers"], "planned_int8_now_float": moved,
            "line": f"attention fused in {record['layers']} layers ({record['op']}): {moved} "
                    f"attention MatMuls the plan has in INT8 run in float there{share}"}


def _transform_step(config: Any, steps: Any, out: Path, cache_export: Path, transform: str,
                    source_dir: Path, graph_dir: Path) -> Path:
    from quantkit.export import find_onnx
    from quantkit.steps import artifact_hash

    if transform == "rotate":
        rotated = out / "cache-rotated"

        def make_rotation(replace_: bool) -> None:
            from quantkit.rotation import rotate_export

            rotate_export(find_onnx(cache_export), rotated, seed=config.seed, force=replace_)

        steps.run("rotate cache", {"onnx": artifact_hash(cache_export), "seed": config.seed},
                  rotated, make_rotation)
        return rotated
    if transform == "smoothquant":
        smoothed = out / "cache-smoothed"

        def make_smoothing(replace_: bool) -> None:
            from quantkit.cache_transform import smooth_cache_export

            smooth_cache_export(find_onnx(cache_export), find_onnx(source_dir),
                                find_onnx(graph_dir), smoothed, force=replace_)

        steps.run("smooth cache", {"onnx": artifact_hash(cache_export),
                                   "plain": artifact_hash(source_dir),
                                   "smoothed": artifact_hash(graph_dir)}, smoothed,
                  make_smoothing)
        return smoothed
    return Path(cache_export)


def _fp32_builder(path: Path, graph: Path) -> Any:
    def make(replace_: bool) -> None:
        from quantkit.build import build_engine

        path.parent.mkdir(parents=True, exist_ok=True)
        build_engine(path, precision="fp32", onnx=graph, force=replace_)

    return make


def _quantized_builder(path: Path, graph: Path, tune_dir: Path, table_onnx: Path) -> Any:
    def make(replace_: bool) -> None:
        build_quantized_cache_engine(path, graph, tune_dir, table_onnx, force=replace_)

    return make


def build_quantized_cache_engine(path: Path, graph: Path, tune_dir: Path, table_onnx: Path, *,
                                 force: bool = False, attention: str = "auto") -> Any:
    """The verified engine's build on the cache graph: its precision and options, the plan and
    the tuned table (ranges of the per-tensor methods, GPTQ weights) autotune wrote.
    ``attention``: the ONNX Runtime build option (``quantkit.attention_fusion``); ``graph``
    gives the verified engine's function exactly, ``auto`` fuses attention (float)."""
    from quantkit.artifacts import read_json
    from quantkit.build import build_engine
    from quantkit.tune.budget import ENGINE_DIR, PLAN_NAME, TABLE_NAME

    verified = tune_dir / ENGINE_DIR / "manifest.json"
    if not verified.is_file():
        raise QuantkitError(f"{tune_dir} has no verified engine to build for the cache graph",
                            "rerun quantize: its autotune step builds one")
    manifest = read_json(verified)
    precision = str(manifest["precision"])
    options = dict((manifest.get("inputs") or {}).get("options") or {})
    if manifest.get("backend", "onnxruntime") == "onnxruntime":
        options["attention"] = attention
    path.parent.mkdir(parents=True, exist_ok=True)
    return build_engine(path, precision=precision, onnx=graph, force=force, options=options,
                        plan=tune_dir / PLAN_NAME if precision == "mixed" else None,
                        table=None if precision == "fp32" else tune_dir / TABLE_NAME,
                        table_onnx=table_onnx)


__all__ = ["CACHE_EXPORT_DIR", "CACHE_FP32", "CACHE_QUANTIZED", "GENERATION_NAME", "cache_steps",
           "check_cache_settings", "export_cache_step"]
