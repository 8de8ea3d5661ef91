"""TensorRT's log, captured, and turned into errors a user can act on.

A custom ``trt.ILogger`` (:func:`make_logger`) keeps every message TensorRT emits; when a build
returns nothing, :func:`diagnose_build_failure` reads them: GPU out of memory, a layer with no
implementation under OBEY precision constraints (named, with PREFER suggested), or TensorRT's own
errors verbatim. Parser errors are listed by :func:`parser_error`. All of it is plain Python over
:class:`LogRecord`, so it is unit-tested with real TensorRT message texts.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from quantkit.errors import QuantkitError

if TYPE_CHECKING:
    import tensorrt as trt

LOG = logging.getLogger("quantkit.tensorrt")

SEVERITIES = ("INTERNAL_ERROR", "ERROR", "WARNING", "INFO", "VERBOSE")
_PY_LEVEL = {"INTERNAL_ERROR": logging.ERROR, "ERROR": logging.ERROR, "WARNING": logging.WARNING,
             "INFO": logging.INFO, "VERBOSE": logging.DEBUG}
MAX_RECORDS = 50_000


@dataclass(frozen=True)
class LogRecord:
    severity: str  # ILogger.Severity name
    message: str

    @property
    def is_error(self) -> bool:
        return self.severity in ("INTERNAL_ERROR", "ERROR")

    def __str__(self) -> str:
        return f"[{self.severity}] {self.message}"


class LogBook:
    """The messages of one TensorRT object's life (builder or runtime), newest last."""

    def __init__(self, limit: int = MAX_RECORDS) -> None:
        self.records: list[LogRecord] = []
        self.limit = limit
        self.dropped = 0

    def add(self, severity: str, message: str) -> None:
        self.records.append(LogRecord(severity, message))
        if len(self.records) > self.limit:
            del self.records[0]
            self.dropped += 1
        LOG.log(_PY_LEVEL.get(severity, logging.INFO), "TensorRT: %s", message)

    def errors(self) -> list[LogRecord]:
        return [r for r in self.records if r.is_error]

    def warnings(self) -> list[LogRecord]:
        return [r for r in self.records if r.severity == "WARNING"]

    def text(self, min_severity: str = "WARNING") -> str:
        keep = SEVERITIES[: SEVERITIES.index(min_severity) + 1]
        return "".join(f"{r}\n" for r in self.records if r.severity in keep)


def make_logger(book: LogBook, min_severity: str = "INFO") -> trt.ILogger:
    """A ``trt.ILogger`` that writes into ``book`` (it must outlive what it is given to)."""
    import tensorrt as trt

    keep = frozenset(SEVERITIES[: SEVERITIES.index(min_severity) + 1])

    class CapturingLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity: trt.ILogger.Severity, msg: str) -> None:
            name = severity.name
            if name in keep:
                book.add(name, msg)

    return CapturingLogger()


# -- reading a failed build's log -----------------------------------------------------------------

_OOM_PATTERNS = (
    re.compile(r"out ?of ?memory", re.I),
    re.compile(r"could not be allocated", re.I),
    re.compile(r"insufficient (?:device |GPU )?memory", re.I),
    re.compile(r"cudaErrorMemoryAllocation|CUDA_ERROR_OUT_OF_MEMORY"),
)
_NO_IMPL_RE = re.compile(
    r"Could not find any implementation for node (?P<layer>.+?)"
    r"(?P<workspace> due to insufficient workspace[^.]*)?\.(?:\)|\s*$|\s)"
)
_NO_CONFORMING_RE = re.compile(
    r"No implementation of layer (?P<layer>.+?) obeys the requested constraints"
)
_LAYER_SPLIT_RE = re.compile(r"[\s+(),{}\[\]]+")


def _is_oom(message: str) -> bool:
    return any(p.search(message) for p in _OOM_PATTERNS)


def layers_named(records: Iterable[LogRecord]) -> list[str]:
    """Engine-layer names TensorRT blames: 'no implementation' messages, in order, unique."""
    names: list[str] = []
    for record in records:
        for regex in (_NO_IMPL_RE, _NO_CONFORMING_RE):
            match = regex.search(record.message)
            if match and match.group("layer") not in names:
                names.append(match.group("layer").strip())
    return names


def onnx_nodes_in(layer_name: str, known_nodes: Iterable[str]) -> list[str]:
    """ONNX node names that appear as whole tokens in a (possibly fused) engine layer name,
    e.g. ``/l.0/fc/MatMul + PWN(/l.0/act/Relu)``."""
    known = set(known_nodes)
    out = []
    for token in _LAYER_SPLIT_RE.split(layer_name):
        if token in known and token not in out:
            out.append(token)
    return out


def diagnose_build_failure(
    records: Sequence[LogRecord],
    *,
    constraints: str | None,
    known_nodes: Iterable[str] = (),
    workspace_mib: int | None = None,
) -> QuantkitError:
    """The error to raise when ``build_serialized_network`` returned nothing.

    ``constraints`` is ``obey``/``prefer`` on the implicit path with per-layer precisions, None
    otherwise.
    """
    errors = [r for r in records if r.is_error]
    blamed = layers_named(errors) or layers_named(records)
    oom_errors = [r for r in errors if _is_oom(r.message)]
    oom_any = [r for r in records if _is_oom(r.message)]
    workspace_short = any(
        (m := _NO_IMPL_RE.search(r.message)) and m.group("workspace") for r in errors
    )
    if oom_errors or (blamed and oom_any and not workspace_short):
        detail = (oom_errors or oom_any)[-1].message
        return QuantkitError(
            f"the GPU ran out of memory while TensorRT built the engine ({detail.strip()})",
            "free GPU memory (other processes), lower the profile's max batch/seq, set a smaller "
            "workspace_mib, or build on a GPU with more memory",
        )
    if workspace_short:
        limit = f" (now {workspace_mib} MiB)" if workspace_mib else ""
        return QuantkitError(
            f"TensorRT found no implementation for layer '{blamed[0]}' within the workspace "
            f"limit{limit}",
            "raise workspace_mib, or remove it to let TensorRT use the device's memory",
        )
    if blamed and constraints == "obey":
        layer = blamed[0]
        nodes = onnx_nodes_in(layer, known_nodes)
        node_text = f" (ONNX node(s): {', '.join(nodes)})" if nodes else ""
        more = f"; also: {', '.join(blamed[1:4])}" if len(blamed) > 1 else ""
        return QuantkitError(
            f"TensorRT has no implementation of layer '{layer}'{node_text} in the precision the "
            f"plan asks for, and precision constraints are OBEY{more}",
            "rebuild with constraints 'prefer' (quantkit build --constraints prefer; TensorRT "
            "then falls back to another precision for that layer, with a warning), or give that "
            "node fp16/fp32 in the plan",
        )
    if blamed:
        return QuantkitError(
            f"TensorRT found no implementation for layer '{blamed[0]}'",
            _tail(errors) or "run with logging at INFO to see TensorRT's messages",
        )
    if errors:
        return QuantkitError("TensorRT failed to build the engine: " + _tail(errors))
    return QuantkitError(
        "TensorRT failed to build the engine and logged no error",
        "run with logging at DEBUG to see TensorRT's verbose messages",
    )


def _tail(records: Sequence[LogRecord], count: int = 3) -> str:
    return " | ".join(r.message.strip() for r in records[-count:])


@dataclass(frozen=True)
class ParserIssue:
    node: str | None
    operator: str | None
    description: str
    code: str | None = None

    def __str__(self) -> str:
        where = ""
        if self.node or self.operator:
            where = f"node '{self.node or '?'}' ({self.operator or '?'}): "
        return f"{where}{self.description}"


def parser_error(path: str, issues: Sequence[ParserIssue]) -> QuantkitError:
    listed = "; ".join(str(i) for i in issues[:10])
    more = f" (and {len(issues) - 10} more)" if len(issues) > 10 else ""
    return QuantkitError(
        f"TensorRT's ONNX parser rejected {path}: {len(issues)} error(s): {listed}{more}",
        "check the ONNX with onnx.checker; unsupported operators need a newer TensorRT or a "
        "different export",
    )
