"""What sensitivity analysis and autotune share: their settings, and the loaded inputs (graph
groups, linear-layer MACs, ranges per calibration method, evaluation subsets, the probe)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from quantkit.errors import QuantkitError

DEFAULT_METHODS = ("entropy", "percentile", "mse", "minmax")


@dataclass(frozen=True)
class TuneSettings:
    """Inputs of ``quantkit sensitivity`` / ``quantkit autotune``.

    ``table`` is a ``quantkit calibrate`` table; ``stats.npz`` beside it (the histograms) lets
    autotune try other calibration methods per tensor. The evaluation text is cut into windows of
    ``max_length`` and three disjoint subsets are drawn with ``seed``: ``rank_windows`` for the
    per-group sensitivity (one model run per group, so kept small), ``search_windows`` for the
    budget checks of the search, ``holdout_windows`` to verify its result. The text must not
    share records with the table's calibration text unless ``allow_overlap``."""

    onnx: Path
    table: Path
    dataset: str = "wikitext"
    dataset_config: str | None = None
    split: str = "validation"
    text_column: str = "text"
    limit_tokens: int | None = None
    max_length: int = 256
    rank_windows: int = 2
    search_windows: int = 4
    holdout_windows: int = 4
    batch_size: int = 2
    seed: int = 0
    granularity: str = "group"
    per_channel: bool = True
    weight_layout: str = "auto"  # INT8 weights of the probe and the engines (quantkit.qdq)
    threads: int | None = None
    cache_dir: Path | None = None  # None: $QUANTKIT_CACHE/tune
    allow_overlap: bool = False  # tuning text may share records with the calibration text

    def check(self) -> None:
        for name in ("max_length", "rank_windows", "batch_size"):
            if getattr(self, name) < 1:
                raise QuantkitError(f"{name.replace('_', '-')} must be at least 1")
        if self.max_length < 2:
            raise QuantkitError("max-length must be at least 2")
        if self.search_windows < 0 or self.holdout_windows < 0:
            raise QuantkitError("search-windows and holdout-windows must not be negative")
        if self.weight_layout != "auto":
            from quantkit.weight_quant import check_weight_layout

            check_weight_layout(self.weight_layout)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("onnx", "table", "cache_dir"):
            out[key] = None if out[key] is None else str(out[key])
        return out


@dataclass
class TuneContext:
    settings: TuneSettings
    onnx_path: Path
    model_hash: str
    table: Any  # CalibrationTable
    tables: dict[str, dict[str, float]]  # method -> amax (the table's own method first)
    groups: list[Any]  # QuantGroup
    macs: dict[str, int]  # group -> linear-layer MACs at 1 x max_length
    total_macs: int
    subsets: dict[str, Any]
    data: dict[str, Any]
    vocab_size: int = 0
    probe: Any = None
    measurer: Any = None
    weight_layout: str = "s8"  # the layout settings.weight_layout resolved to on this machine
    notes: list[str] = field(default_factory=list)

    def coverage(self, int8_groups: Any) -> float:
        chosen = set(int8_groups)
        return sum(self.macs[g.name] for g in self.groups if g.name in chosen) / self.total_macs

    def close(self) -> None:
        if self.probe is not None:
            self.probe.close()
            self.probe = None


def method_tables(table: Any, table_path: Path, methods: tuple[str, ...]) -> tuple[
        dict[str, dict[str, float]], list[str]]:
    """Ranges per method from ``stats.npz`` beside the table (the table's own ranges first)."""
    from quantkit.calib.run import STATS_NAME
    from quantkit.calib.stats import ActivationStats, calibrate

    tables: dict[str, dict[str, float]] = {table.method: dict(table.amax)}
    notes: list[str] = []
    stats_path = Path(table_path).parent / STATS_NAME
    others = [m for m in methods if m != table.method]
    if not others:
        return tables, notes
    if not stats_path.is_file():
        notes.append(f"no {STATS_NAME} beside the table: calibration methods are not searched")
        return tables, notes
    stats = ActivationStats.load(stats_path)
    if stats.model_hash != table.model_hash:
        notes.append(f"{STATS_NAME} belongs to another model: methods are not searched")
        return tables, notes
    for method in others:
        other = calibrate(stats, method)
        tables[method] = {k: v for k, v in other.amax.items() if k in table.amax}
    return tables, notes


def load_context(settings: TuneSettings, methods: tuple[str, ...] = (),
                 subsets: Mapping[str, int] | None = None,
                 say: Any = None) -> TuneContext:
    """Load and check everything, then build the probe session (the slow part, last)."""
    import onnx

    from quantkit.artifacts import sha256_json
    from quantkit.backends.onnxruntime import check_table, resolve_weight_layout
    from quantkit.calib.gptq import weights_digest
    from quantkit.calib.table import CalibrationTable
    from quantkit.data import resolve_text_source
    from quantkit.eval.perplexity import tokenize_text
    from quantkit.eval.text import load_evaluation_text
    from quantkit.export import export_manifest, find_onnx, onnx_model_hash, tokenizer_beside
    from quantkit.graph_stats import linear_layer_macs
    from quantkit.models import cache_dir
    from quantkit.text_roles import check_roles_disjoint, role_text
    from quantkit.tune.groups import groups_of_model
    from quantkit.tune.measure import Measurer, choose_windows
    from quantkit.tune.probe import ProbeSession

    settings.check()
    onnx_path = find_onnx(Path(settings.onnx))
    table = CalibrationTable.load(Path(settings.table))
    graph = onnx.load(str(onnx_path), load_external_data=False)
    check_table(table, onnx_path, graph)
    groups = groups_of_model(graph, settings.granularity)
    del graph
    manifest = export_manifest(onnx_path) or {}
    model_hash = str(manifest.get("model_hash") or onnx_model_hash(onnx_path))
    tokenizer = tokenizer_beside(onnx_path)
    source = resolve_text_source(settings.dataset, settings.dataset_config, settings.split,
                                 settings.text_column)
    text = load_evaluation_text(source)
    overlaps = check_roles_disjoint(
        [role_text("calibration", table.data), role_text("tuning", text.describe())],
        settings.allow_overlap)
    tokens = tokenize_text(tokenizer, text.text, settings.limit_tokens, text.num_documents)
    counts = dict(subsets) if subsets is not None else {
        "rank": settings.rank_windows, "search": settings.search_windows,
        "holdout": settings.holdout_windows}
    counts = {k: v for k, v in counts.items() if v > 0}
    chosen = choose_windows(tokens.ids, settings.max_length, counts, settings.seed)
    tables, notes = method_tables(table, Path(settings.table), methods)
    node_macs = linear_layer_macs(onnx_path, settings.max_length)
    macs = {g.name: sum(node_macs.get(n, 0) for n in g.nodes) for g in groups}
    data = {**text.describe(), "tokens_sha256": tokens.tokens_sha256,
            "num_tokens": tokens.num_tokens, "max_length": settings.max_length,
            "windows": counts, "seed": settings.seed}
    notes += [f"text overlap allowed: {clash}" for clash in overlaps]
    context = TuneContext(settings, onnx_path, model_hash, table, tables, groups, macs,
                          max(1, sum(node_macs.values())), chosen, data,
                          vocab_size=len(tokenizer), notes=notes)
    if say is not None:
        say(f"Building the probe graph ({len(groups)} groups) ...")
    context.weight_layout = resolve_weight_layout(
        {"weight_layout": settings.weight_layout}, "CPUExecutionProvider")[0]
    context.probe = ProbeSession(onnx_path, groups, table.amax, per_channel=settings.per_channel,
                                 threads=settings.threads, weights=table.weights,
                                 weight_layout=context.weight_layout)
    key_inputs = {
        "model_hash": model_hash,
        "tables": sha256_json(tables),
        "groups": [g.to_dict() for g in groups],
        "per_channel": settings.per_channel,
        "max_length": settings.max_length,
    }
    if context.weight_layout == "s7":  # s8 and u8 hold the same values: their keys stay
        key_inputs["weight_bits"] = 7
    digest = weights_digest(table.weights)
    if digest is not None:  # GPTQ weights (keys without stay as they were: caches still hit)
        key_inputs["weights"] = digest
    cache_root = Path(settings.cache_dir) if settings.cache_dir else cache_dir() / "tune"
    cache_path = cache_root / f"{sha256_json(key_inputs)[:32]}.json"
    context.measurer = Measurer(context.probe, chosen, settings.max_length, settings.batch_size,
                                tables, cache_path, key_inputs)
    return context
