"""``build_report``: results files (+ a calibration directory) -> report.md / .html / .json.

The numbers are computed once (``report_data``), the document is built once from them
(``report_blocks``), and the three files are rendered from those. The output directory is assembled
under a temporary name and renamed into place, so a reader never sees half a report.

``report.json`` (schema ``quantkit.report/1``; additive changes keep ``/1``)::

    {"schema", "created", "generator": {"quantkit", "commit", "command"},
     "definitions": {name: text},               # how Δ, speedup, coverage, shape, front are defined
     "dataset": {...},                           # of the first results file (all agree)
     "sources": [{"path", "sha256", "created", "environment", "settings", "commands",
                  "engines": [label]}],
     "reference_shape": {"batch", "seq"} | null,
     "engines": [{"label", "name", "source" (index into sources), "path", "backend", "precision",
                  "int8_coverage", "source_model_hash", "size_bytes", "perplexity", "nll_mean",
                  "num_scored_tokens", "peak_rss_bytes", "runner", "machine",
                  "reference": {"fp32": label | null, "fp16": label | null},
                  "delta_vs_fp32": {"abs", "pct"} | null, "delta_vs_fp16": ... | null,
                  "latency": [{<results row>, "speedup_vs_fp32", "speedup_vs_fp16"}],
                  "at_reference_shape": {"p50_ms", "p99_ms", "tokens_per_s", "speedup_vs_fp32",
                                         "speedup_vs_fp16"} | null,
                  "pareto": bool,
                  "generation": <results' generation entry> | null}],   # KV-cache engines
     "pareto": {"x", "y", "points": {label: {"p50_ms", "delta_pct"}}, "front": [label],
                "excluded": [{"engine", "reason"}]},
     "precision_maps": [{"engine", "map": {"rows", "columns", "grid", "linear_counts", "uniform",
                         "other_ops", "default"} | null, "note", "plan", "image"}],
     "calibration": {"directory", "method", "params", "num_samples", "num_tokens", "num_tensors",
                     "skipped", "largest_amax": [{"tensor", "amax"}],
                     "histogram": {"tensor", "amax", "image", "note", ...}} | null,
     "tuning": {"directory", "sensitivity": <quantkit.sensitivity/1>,
                "autotune": <quantkit.autotune/1> | null} | null,
     "sweep": {"axes": [path], "sources": [{"recipe", "axes": {path: value}}]} | null,
     "notes": [text]}
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from quantkit import __version__
from quantkit.artifacts import (
    atomic_output_dir,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    check_can_write,
    read_manifest,
)
from quantkit.environment import git_commit
from quantkit.errors import QuantkitError
from quantkit.report import fmt
from quantkit.report.calibration import read_table, summarise
from quantkit.report.document import (
    Block,
    Bullets,
    Code,
    Heading,
    Image,
    Para,
    Table,
    to_html,
    to_markdown,
)
from quantkit.report.generation import (
    GENERATION_PNG,
    generation_engines,
    generation_png,
    generation_section,
)
from quantkit.report.inputs import ResultsFile, check_comparable, read_results, resolve_engine_dir
from quantkit.report.layers import OUTSIDE_BLOCKS, precision_map
from quantkit.report.sweep import check_sweep, sweep_section
from quantkit.report.tables import build_tables
from quantkit.report.tuning import read_tuning, tuning_images, tuning_section

REPORT_SCHEMA = "quantkit.report/1"
REPORT_MD, REPORT_HTML, REPORT_JSON = "report.md", "report.html", "report.json"
PARETO_PNG = "pareto.png"
HISTOGRAM_PNG = "calibration-histogram.png"

DEFINITIONS = {
    "int8_coverage": "share of the linear layers' multiply-accumulates (MACs) that run in INT8, "
                     "as recorded by the engine build",
    "delta": "Δppl = ppl − ppl(ref) and 100 × Δppl / ppl(ref); the FP32 (FP16) reference is an "
             "engine of that precision built from the same source model, preferring one measured "
             "on the same machine with the same backend",
    "speedup": "p50(ref) / p50 at the same batch × seq shape, only against a reference measured "
               "on the same machine, backend and device (otherwise —)",
    "reference_shape": "the summary table and the Pareto plot use the batch × seq shape "
                       "measured by the most engines (ties: more tokens, then larger batch); "
                       "every shape is in the latency table",
    "pareto": "an engine is on the Pareto front when no other engine has both lower or equal p50 "
              "latency and lower or equal Δppl % against FP32, one of them strictly lower",
}


@dataclass(frozen=True)
class ReportOutput:
    directory: Path
    markdown: Path
    html: Path
    json: Path
    data: Mapping[str, Any]


def build_report(
    results: Sequence[Path],
    out: Path,
    *,
    calibration: Path | None = None,
    histogram_tensor: str | None = None,
    tuning: Path | None = None,
    force: bool = False,
    command: str | None = None,
    sweep: Mapping[str, Any] | None = None,
) -> ReportOutput:
    """Write report.md, report.html, report.json and the PNGs that report.md shows into ``out``.

    ``results`` are ``quantkit.results/1`` files; several are merged when their perplexities are
    comparable. ``calibration`` is a directory written by ``quantkit calibrate``; its histogram of
    ``histogram_tensor`` (default: the tensor with the largest amax) is drawn with the threshold.
    ``tuning`` is a ``quantkit autotune`` (or ``quantkit sensitivity``) output directory: its
    ranking and search path become a section of their own. ``sweep`` (``quantkit sweep``): each
    results file's recipe and axis values, a table of their own.
    """
    if not results:
        raise QuantkitError("no results files given", "pass at least one results.json")
    out = Path(out)
    check_can_write(out, force)  # fail before any work
    files = [read_results(Path(p)) for p in results]
    check_comparable(files)
    calib = _read_calibration(calibration) if calibration is not None else None
    tune = read_tuning(tuning) if tuning is not None else None
    data, images = report_data(files, calib, histogram_tensor, command, tune,
                               check_sweep(sweep, len(files)))
    blocks = report_blocks(data, images)
    with atomic_output_dir(out, force=force) as tmp:
        for name, png in images.items():
            atomic_write_bytes(tmp / name, png)
        atomic_write_text(tmp / REPORT_MD, to_markdown(blocks))
        atomic_write_text(tmp / REPORT_HTML, to_html(blocks, title=_title(data)))
        atomic_write_json(tmp / REPORT_JSON, data)
    return ReportOutput(out, out / REPORT_MD, out / REPORT_HTML, out / REPORT_JSON, data)


def _read_calibration(directory: Path) -> dict[str, Any]:
    directory = Path(directory)
    return {"directory": directory, "table": read_table(directory)}


# -- the numbers -----------------------------------------------------------------------------
def report_data(
    files: Sequence[ResultsFile],
    calib: Mapping[str, Any] | None = None,
    histogram_tensor: str | None = None,
    command: str | None = None,
    tuning: Mapping[str, Any] | None = None,
    sweep: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, bytes]]:
    """report.json's content, and the PNG images by file name."""
    from quantkit.report import plots

    tables = build_tables(files)
    notes: list[str] = []
    images: dict[str, bytes] = {}
    pareto = tables["pareto"]
    if pareto["points"]:
        images[PARETO_PNG] = plots.pareto_png(pareto, tables["engines"],
                                              fmt.shape(tables["reference_shape"]))
    else:
        notes.append("No engine has both a Δppl against FP32 and a latency at the reference "
                     "shape, so there is no Pareto plot.")
    if generation_engines(tables["engines"]):
        images[GENERATION_PNG] = generation_png(generation_engines(tables["engines"]))
    maps = []
    for entry in tables["engines"]:
        item = _precision_map_entry(entry, files[entry["source"]].path)
        if item is None:
            continue
        if item.get("map") is not None and item["map"]["uniform"] is None:
            name = f"precision-map-{_slug(entry['label'])}.png"
            while name in images:
                name = name[:-4] + "-x.png"
            images[name] = plots.precision_map_png(
                item["map"], f"{entry['label']}: precision per block and linear op")
            item["image"] = name
        maps.append(item)
    calibration = None
    if calib is not None:
        calibration = summarise(calib["table"], calib["directory"])
        calibration["histogram"] = _histogram(calib, histogram_tensor, images)
    sources = [
        {"path": str(f.path), "sha256": f.sha256, "created": f.data.get("created"),
         "environment": f.environment, "settings": f.data.get("settings"),
         "commands": f.commands,
         "engines": [e["label"] for e in tables["engines"] if e["source"] == i]}
        for i, f in enumerate(files)
    ]
    data = {
        "schema": REPORT_SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "generator": {"quantkit": __version__, "commit": git_commit(), "command": command},
        "definitions": DEFINITIONS,
        "dataset": {**files[0].dataset, "roles": _merged_roles(files)},
        "sources": sources,
        "reference_shape": tables["reference_shape"],
        "engines": tables["engines"],
        "pareto": pareto,
        "precision_maps": maps,
        "calibration": calibration,
        "tuning": tuning,
        "sweep": sweep,
        "notes": notes,
    }
    if tuning is not None:
        images.update(tuning_images(tuning))
    return data, images


def _precision_map_entry(entry: Mapping[str, Any], results_path: Path) -> dict[str, Any] | None:
    """The per-layer map of one engine, or a note saying why there is none."""
    label, precision = entry["label"], entry["precision"]
    directory = resolve_engine_dir(entry.get("path"), results_path)
    if directory is None:
        if precision in ("fp32", "fp16"):
            return None  # nothing to map: every layer runs in the engine's precision
        return {"engine": label, "map": None,
                "note": f"engine directory {entry.get('path')!r} is not here (looked beside "
                        f"{results_path} and in the working directory); no per-layer map"}
    try:
        manifest = read_manifest(directory, kind="engine")
    except QuantkitError as exc:
        return {"engine": label, "map": None, "note": f"{exc}; no per-layer map"}
    # The plan the backend realised (ONNX Runtime records it when ops fell back to fp32), else
    # the plan the engine was built from.
    plan_source = "plan_as_built" if manifest.get("plan_as_built") else "inputs.plan"
    plan = manifest.get("plan_as_built") or (manifest.get("inputs") or {}).get("plan")
    if not plan or not plan.get("decisions"):
        if precision in ("fp32", "fp16"):
            return None
        return {"engine": label, "map": None,
                "note": f"{directory} records no per-node precision plan; no per-layer map"}
    pmap = precision_map(plan)
    if not pmap["columns"]:
        return {"engine": label, "map": None,
                "note": "its plan has no linear (MatMul/Gemm) ops; no per-layer map"}
    if pmap["uniform"] is not None and precision in ("fp32", "fp16"):
        return None
    return {"engine": label, "directory": str(directory), "plan": plan_source, "map": pmap,
            "note": None}


def _histogram(calib: Mapping[str, Any], tensor: str | None,
               images: dict[str, bytes]) -> dict[str, Any]:
    """Which tensor's histogram is drawn; the histograms themselves come from the stats file."""
    from quantkit.report.calibration import load_histogram

    amax = calib["table"].amax
    if tensor is None:
        tensor = max(amax, key=lambda t: (amax[t], t))
    elif tensor not in amax:
        raise QuantkitError(f"tensor '{tensor}' is not in the calibration table",
                            "pick one listed in its table.json")
    hist, note = load_histogram(Path(calib["directory"]), tensor)
    if hist is None:
        return {"tensor": tensor, "amax": float(amax[tensor]), "image": None, "note": note}
    from quantkit.report import plots

    images[HISTOGRAM_PNG] = plots.histogram_png(hist, tensor, float(amax[tensor]),
                                                calib["table"].method)
    return {"tensor": tensor, "amax": float(amax[tensor]), "image": HISTOGRAM_PNG, "note": None,
            "stats_file": hist["source"], "bins": len(hist["counts"]),
            "largest_abs_seen": hist["amax"], "values": hist["total"]}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "engine"


def _title(data: Mapping[str, Any]) -> str:
    return f"quantkit report: {len(data['engines'])} engines"


# -- the document ----------------------------------------------------------------------------
def report_blocks(data: Mapping[str, Any], images: Mapping[str, bytes]) -> list[Block]:
    engines = data["engines"]
    shape = fmt.shape(data["reference_shape"])
    blocks: list[Block] = [
        Heading(1, "quantkit report"),
        Para(f"Generated {data['created']} by quantkit {data['generator']['quantkit']}"
             f" (commit {data['generator']['commit'] or 'unknown'}) from "
             f"{len(data['sources'])} results file(s) and {len(engines)} engine(s).", muted=True),
    ]
    front = data["pareto"]["front"]
    if front:
        blocks.append(Para(f"Pareto front (fastest first): {', '.join(front)}."))
    blocks += _engine_section(engines, shape)
    blocks += sweep_section(data.get("sweep"), engines)
    blocks += _pareto_section(data, images)
    blocks += _latency_section(engines)
    blocks += generation_section(engines, images)
    blocks += _maps_section(data["precision_maps"], images)
    blocks += _calibration_section(data["calibration"], images)
    blocks += tuning_section(data.get("tuning"), images)
    blocks += _dataset_section(data["dataset"])
    blocks += _environment_section(data["sources"], data["generator"])
    if data["notes"]:
        blocks += [Heading(2, "Notes"), Bullets(list(data["notes"]))]
    return blocks


def _engine_section(engines: Sequence[Mapping[str, Any]], shape: str) -> list[Block]:
    headers = ["engine", "backend", "precision", "INT8 coverage", "perplexity", "Δ vs FP32",
               "Δ vs FP16", "p50 ms", "p99 ms", "tokens/s", "speedup vs FP32",
               "speedup vs FP16", "size", "Pareto"]
    rows = []
    for e in engines:
        at = e["at_reference_shape"] or {}
        rows.append([
            e["label"], e["backend"], e["precision"], fmt.percent(e["int8_coverage"]),
            fmt.ppl(e["perplexity"]), fmt.delta(e["delta_vs_fp32"]), fmt.delta(e["delta_vs_fp16"]),
            "accuracy only" if e.get("accuracy_only") else fmt.ms(at.get("p50_ms")),
            fmt.ms(at.get("p99_ms")), fmt.rate(at.get("tokens_per_s")),
            fmt.speedup(at.get("speedup_vs_fp32")), fmt.speedup(at.get("speedup_vs_fp16")),
            fmt.size(e["size_bytes"]), "yes" if e["pareto"] else "",
        ])
    refs = []
    for p in ("fp32", "fp16"):
        users: dict[str, list[str]] = {}
        for e in engines:
            ref = e["reference"][p]
            if ref is not None and ref != e["label"]:
                users.setdefault(ref, []).append(e["label"])
        refs += [f"{p.upper()} reference {ref} for: {', '.join(labels)}"
                 for ref, labels in users.items()]
    return [
        Heading(2, "Engines", anchor="engines"),
        Para(f"Latency, tokens/s and speedups at the reference shape: {shape}. "
             "Rows in bold are on the Pareto front."),
        Table(headers, rows, align="lllrrrrrrrrrrl", highlight=[e["pareto"] for e in engines]),
        Bullets([
            *(f"{e['label']}: {e['accuracy_only']}; no latency is measured." for e in engines
              if e.get("accuracy_only")),
            f"INT8 coverage: {DEFINITIONS['int8_coverage']}.",
            f"Δ: {DEFINITIONS['delta']}.",
            f"Speedup: {DEFINITIONS['speedup']}.",
            f"Reference shape: {DEFINITIONS['reference_shape']}.",
        ]),
        *([Bullets(refs)] if refs else []),
    ]


def _pareto_section(data: Mapping[str, Any], images: Mapping[str, bytes]) -> list[Block]:
    pareto = data["pareto"]
    blocks: list[Block] = [Heading(2, "Accuracy against speed", anchor="pareto")]
    if PARETO_PNG in images:
        blocks.append(Image(
            PARETO_PNG, "Pareto plot: Δ perplexity against p50 latency", images[PARETO_PNG],
            caption=f"Each point is an engine, at {fmt.shape(data['reference_shape'])}. "
                    f"{DEFINITIONS['pareto'][0].upper()}{DEFINITIONS['pareto'][1:]}; the dashed "
                    "staircase joins the front. Lower-left is better."))
    blocks.append(Para(f"On the front: {', '.join(pareto['front']) or 'none'}."))
    if pareto["excluded"]:
        blocks.append(Bullets([f"{x['engine']} is not plotted: {x['reason']}."
                               for x in pareto["excluded"]]))
    return blocks


def _latency_section(engines: Sequence[Mapping[str, Any]]) -> list[Block]:
    headers = ["engine", "batch", "seq", "p50 ms", "p90 ms", "p99 ms", "mean ms", "tokens/s",
               "speedup vs FP32", "speedup vs FP16", "iterations (warm-up)"]
    rows = []
    for e in engines:
        for r in sorted(e["latency"], key=lambda r: (int(r["batch"]), int(r["seq"]))):
            rows.append([
                e["label"], str(r["batch"]), str(r["seq"]), fmt.ms(r["p50_ms"]),
                fmt.ms(r.get("p90_ms")), fmt.ms(r["p99_ms"]), fmt.ms(r.get("mean_ms")),
                fmt.rate(r["tokens_per_s"]), fmt.speedup(r["speedup_vs_fp32"]),
                fmt.speedup(r["speedup_vs_fp16"]),
                f"{r.get('iterations', fmt.DASH)} ({r.get('warmup', fmt.DASH)})",
            ])
    blocks: list[Block] = [Heading(2, "Latency at every measured shape", anchor="latency")]
    if rows:
        blocks.append(Table(headers, rows, align="lrrrrrrrrrr"))
        rss = [f"{e['label']}: {fmt.size(e['peak_rss_bytes'])}" for e in engines
               if e.get("peak_rss_bytes") is not None]
        if rss:
            blocks.append(Para("Peak resident memory during evaluation: " + "; ".join(rss) + "."))
    elif any(e.get("generation") for e in engines):
        blocks.append(Para("No full-pass latency was measured: KV-cache engines are timed in "
                           "the generation section.", muted=True))
    else:
        blocks.append(Para("No latency was measured.", muted=True))
    return blocks


def _maps_section(maps: Sequence[Mapping[str, Any]], images: Mapping[str, bytes]) -> list[Block]:
    blocks: list[Block] = [Heading(2, "Per-layer precision", anchor="precision")]
    if not maps:
        blocks.append(Para("No INT8 or mixed engine in these results.", muted=True))
        return blocks
    for item in maps:
        blocks.append(Heading(3, item["engine"]))
        pmap = item.get("map")
        if pmap is None:
            blocks.append(Para(f"Not shown: {item['note']}.", muted=True))
            continue
        counts = ", ".join(f"{n} {p}" for p, n in sorted(pmap["linear_counts"].items()))
        if pmap["uniform"] is not None:
            blocks.append(Para(f"Every linear op runs in {pmap['uniform']} ({counts})."))
        else:
            blocks.append(Image(
                item["image"], f"Precision map of {item['engine']}", images[item["image"]],
                caption=f"Rows: transformer blocks ('{OUTSIDE_BLOCKS}' = linear ops outside the "
                        f"blocks, e.g. lm_head); columns: linear ops. Linear ops: {counts}."))
            blocks.append(Table(
                ["column", "node path within the block", "op"],
                [[c["name"], c["path"], c["op_type"]] for c in pmap["columns"]]))
        if pmap["other_ops"]:
            by_precision: dict[str, list[str]] = {}
            for op, counts_by in pmap["other_ops"].items():
                for p, n in counts_by.items():
                    by_precision.setdefault(p, []).append(f"{op} {n}")
            blocks.append(Table(["other ops in", "op type and node count"],
                                [[p, ", ".join(ops)] for p, ops in sorted(by_precision.items())]))
    return blocks


def _calibration_section(calib: Mapping[str, Any] | None,
                         images: Mapping[str, bytes]) -> list[Block]:
    blocks: list[Block] = [Heading(2, "Calibration", anchor="calibration")]
    if calib is None:
        blocks.append(Para("No calibration directory was given (--calibration DIR).", muted=True))
        return blocks
    params = ", ".join(f"{k}={v}" for k, v in calib["params"].items()) or "none"
    skipped = calib["skipped"]
    skipped_text = str(len(skipped))
    if skipped:
        reasons: dict[str, int] = {}
        for reason in skipped.values():
            reasons[reason] = reasons.get(reason, 0) + 1
        skipped_text += " (" + "; ".join(f"{n}: {r}" for r, n in sorted(reasons.items())) + ")"
    blocks.append(Table(["field", "value"], [
        ["directory", calib["directory"]],
        ["method", calib["method"]],
        ["parameters", params],
        ["samples", fmt.count(calib["num_samples"])],
        ["tokens", fmt.count(calib["num_tokens"])],
        ["tensors with amax", fmt.count(calib["num_tensors"])],
        ["skipped tensors", skipped_text],
    ]))
    blocks.append(Heading(3, f"The {len(calib['largest_amax'])} largest amax values"))
    blocks.append(Table(["tensor", "amax"],
                        [[t["tensor"], fmt.amax(t["amax"])] for t in calib["largest_amax"]],
                        align="lr"))
    hist = calib["histogram"]
    blocks.append(Heading(3, "Histogram"))
    if hist["image"] is not None:
        blocks.append(Image(
            hist["image"], f"Histogram of |x| for {hist['tensor']}", images[hist["image"]],
            caption=f"{hist['tensor']}: {calib['method']} threshold amax = "
                    f"{fmt.amax(hist['amax'])} (red)."))
    else:
        blocks.append(Para(f"No histogram for {hist['tensor']}: {hist['note']}.", muted=True))
    return blocks


def _merged_roles(files: Sequence[Any]) -> list[dict[str, Any]]:
    """Every results file's text roles (evaluation, each engine's calibration and tuning text),
    each label once."""
    roles: dict[str, dict[str, Any]] = {}
    for f in files:
        for role in f.dataset.get("roles") or []:
            roles.setdefault(str(role.get("label")), dict(role))
    return list(roles.values())


def _dataset_section(dataset: Mapping[str, Any]) -> list[Block]:
    source = dataset.get("source") or {}
    source_text = str(source.get("name", fmt.DASH))
    if source.get("config"):
        source_text += f" ({source['config']})"
    if source.get("kind"):
        source_text = f"{source['kind']}: {source_text}"
    rows = [["text", source_text]]
    for key in ("split", "num_tokens", "max_length", "stride", "num_windows", "num_scored_tokens",
                "text_sha256", "tokens_sha256"):
        if key in dataset:
            value = dataset[key]
            rows.append([key, fmt.count(value) if isinstance(value, int) else str(value)])
    blocks: list[Block] = [
        Heading(2, "Dataset", anchor="dataset"),
        Para("Perplexity is measured on this text with sliding windows of max_length tokens "
             "starting every stride tokens; every engine scored the same tokens."),
        Table(["field", "value"], rows)]
    roles = dataset.get("roles") or []
    if roles:
        blocks += [Para("The text each role read (records are lines of a text file or rows of "
                        "a JSONL/Parquet file, counted from 0 over all its files). Evaluation "
                        "text that calibration or tuning read is refused unless allowed."),
                   Table(["role", "text"], [[str(r["label"]).split(": ", 1)[0],
                                            str(r["label"]).split(": ", 1)[-1]] for r in roles])]
    for clash in dataset.get("overlaps") or []:
        blocks.append(Para(f"Overlap allowed by the user: {clash}.", muted=True))
    return blocks


def _environment_section(sources: Sequence[Mapping[str, Any]],
                         generator: Mapping[str, Any]) -> list[Block]:
    blocks: list[Block] = [Heading(2, "Environment and commands", anchor="environment")]
    for source in sources:
        env = source["environment"]
        blocks.append(Heading(3, f"{source['path']} ({', '.join(source['engines'])})"))
        rows = [
            ["machine", f"{env.get('cpu')} ({env.get('cpu_count')} cores)"],
            ["instruction set", _isa_text(env.get("isa"))],
            ["GPU", _gpu_text(env.get("gpu"))],
            ["platform", str(env.get("platform"))],
            ["python", str(env.get("python"))],
            ["quantkit commit", str(env.get("commit"))],
        ]
        libs = env.get("libraries") or {}
        rows += [[name, str(version)] for name, version in libs.items() if version]
        settings = source.get("settings") or {}
        if settings:
            rows.append(["eval settings", ", ".join(f"{k}={_setting(v)}"
                                                    for k, v in settings.items())])
        rows.append(["results sha256", source["sha256"]])
        blocks.append(Table(["field", "value"], rows))
        blocks.append(Para("Commands that produced these results:"))
        blocks.append(Code("\n".join(source["commands"]) or "(none recorded)"))
    if generator.get("command"):
        blocks.append(Para("This report:"))
        blocks.append(Code(str(generator["command"])))
    return blocks


def _setting(value: Any) -> str:
    if value is None:
        return "default"
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value)
    return str(value)


def _isa_text(isa: Any) -> str:
    """``avx2 (x86_64; ONNX Runtime's u8 x s8 kernels saturate here)``; results written before
    quantkit recorded the instruction set say so."""
    if not isinstance(isa, Mapping):
        return "not recorded"
    note = "; ONNX Runtime's u8 x s8 kernels saturate here" if isa.get("u8s8_saturates") else ""
    return f"{isa.get('name')} ({isa.get('arch')}{note})"


def _gpu_text(gpu: Any) -> str:
    if not gpu:
        return "none"
    if isinstance(gpu, list):
        return "; ".join(
            ", ".join(str(v) for v in (g.get("name"), g.get("memory_total_mib") and
                                       f"{g['memory_total_mib']} MiB", g.get("driver") and
                                       f"driver {g['driver']}") if v)
            if isinstance(g, Mapping) else str(g) for g in gpu)
    return str(gpu)
