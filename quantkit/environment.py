"""What a result was measured on: machine, instruction set, library versions and the quantkit
commit; and which INT8 weight layout ONNX Runtime engines should use on that instruction set."""

from __future__ import annotations

import functools
import os
import platform
import subprocess
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

LIBRARIES = ("quantkit", "numpy", "onnx", "onnxruntime", "torch", "transformers", "tensorrt")


def library_versions() -> dict[str, str | None]:
    """Installed versions, read from package metadata so nothing heavy is imported."""
    versions: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


@functools.cache
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# -- instruction set ----------------------------------------------------------------------------
# x86 integer-GEMM classes, best first, by the /proc/cpuinfo flag that defines each
_X86_CLASSES = (
    ("avx512_vnni", ("avx512_vnni",)),
    ("avx_vnni", ("avx_vnni",)),
    ("avx512", ("avx512bw",)),
    ("avx2", ("avx2",)),
)
X86_MACHINES = frozenset({"x86_64", "amd64", "i386", "i686", "x86"})
ARM_MACHINES = frozenset({"aarch64", "arm64"})
# ONNX Runtime (MLAS) u8 x s8 GEMM kernels on these classes multiply with VPMADDUBSW, which adds
# pairs of u8 x s8 products into int16 with saturation (255 * 127 * 2 > 32767)
SATURATING_U8S8 = frozenset({"avx2", "avx512"})


@dataclass(frozen=True)
class CpuIsa:
    """The instruction-set class of a CPU as far as INT8 matrix products care.

    ``name``: ``avx512_vnni`` | ``avx_vnni`` | ``avx512`` (AVX-512BW, no VNNI) | ``avx2`` |
    ``x86`` (older x86) | ``arm64_dotprod`` | ``arm64`` | ``unknown``; ``flags``: the flags
    that decided it, as /proc/cpuinfo names them."""

    arch: str  # x86_64 | aarch64 | the platform's machine name
    name: str
    flags: tuple[str, ...] = ()
    source: str = "/proc/cpuinfo"

    @property
    def u8s8_saturates(self) -> bool:
        """Whether ONNX Runtime's u8 x s8 integer kernels can saturate on this CPU."""
        return self.name in SATURATING_U8S8

    def describe(self) -> str:
        """One phrase: ``avx2 (x86_64; no VNNI: u8 x s8 kernels saturate)``."""
        notes = {
            "avx512_vnni": "VNNI: exact u8 x s8 dot products",
            "avx_vnni": "AVX-VNNI: exact u8 x s8 dot products",
            "avx512": "AVX-512 without VNNI: u8 x s8 kernels saturate",
            "avx2": "no VNNI: u8 x s8 kernels saturate",
            "x86": "no AVX2: SSE integer kernels",
            "arm64_dotprod": "dot-product instructions (asimddp)",
            "arm64": "no dot-product instructions: widening integer kernels",
        }
        note = notes.get(self.name, "instruction set not detected")
        return f"{self.name} ({self.arch}; {note})"

    def to_dict(self) -> dict[str, Any]:
        return {"arch": self.arch, "name": self.name, "flags": list(self.flags),
                "u8s8_saturates": self.u8s8_saturates, "source": self.source}


def parse_cpu_isa(cpuinfo: str, machine: str) -> CpuIsa:
    """The instruction-set class from the text of /proc/cpuinfo and ``platform.machine()``."""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):  # x86 | ARM
            flags.update(value.split())
            break  # every core lists the same flags
    machine = machine.lower()
    is_x86 = machine in X86_MACHINES or (not machine and "sse2" in flags)
    is_arm = machine in ARM_MACHINES or (not machine and "asimd" in flags)
    arch = "x86_64" if is_x86 else "aarch64" if is_arm else (machine or "unknown")
    if not flags:
        return CpuIsa(arch, "unknown", (), "none")
    if is_x86:
        for name, needed in _X86_CLASSES:
            if all(f in flags for f in needed):
                return CpuIsa(arch, name, needed)
        return CpuIsa(arch, "x86", ())
    if is_arm:
        return CpuIsa(arch, "arm64_dotprod", ("asimddp",)) if "asimddp" in flags else \
            CpuIsa(arch, "arm64", ())
    return CpuIsa(arch, "unknown", ())


@functools.cache
def cpu_isa() -> CpuIsa:
    """This machine's instruction-set class, read once from /proc/cpuinfo (``unknown`` where
    there is none, e.g. macOS or Windows)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    return parse_cpu_isa(text, platform.machine())


# -- INT8 weight layout of ONNX Runtime engines --------------------------------------------------
# s8: symmetric int8 weights (zero point 0), ONNX Runtime's u8 x s8 kernels; what TensorRT reads
# u8: the same values as uint8 with zero point 128: u8 x u8 kernels, which widen to int16 first
# s7: 7-bit symmetric weights in [-63, 63] (ONNX Runtime's reduce_range): cannot saturate
WEIGHT_LAYOUTS = ("s8", "u8", "s7")


def weight_layout_for(isa: CpuIsa) -> tuple[str, str]:
    """The INT8 weight layout quantkit builds ONNX Runtime engines with on ``isa``, and why."""
    if isa.u8s8_saturates:
        return "u8", (f"{isa.name} without VNNI: ONNX Runtime's u8 x s8 kernels saturate int16 "
                      "pair sums; uint8 weights (zero point 128, the same values) run on its "
                      "u8 x u8 kernels, which do not")
    if isa.name in ("avx512_vnni", "avx_vnni"):
        return "s8", f"{isa.name}: u8 x s8 dot products are exact and fastest"
    if isa.arch == "x86_64":  # older or undetected x86: u8 x u8 is exact on every x86 kernel
        return "u8", (f"{isa.name} x86 without VNNI: uint8 weights (zero point 128, the same "
                      "values) run on ONNX Runtime's u8 x u8 kernels, exact on every x86 CPU")
    return "s8", f"{isa.name}: ONNX Runtime's integer kernels here do not saturate"


@functools.cache
def available_memory_bytes(meminfo: str | None = None) -> int | None:
    """Memory the kernel can give a new job without swapping (``MemAvailable`` of
    /proc/meminfo), in bytes; None where it cannot be read."""
    try:
        text = meminfo if meminfo is not None else Path("/proc/meminfo").read_text()
        for line in text.splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def git_commit() -> str | None:
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=5, check=True,
        )
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5, check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def environment_info() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "isa": cpu_isa().to_dict(),
        "cpu_count": os.cpu_count(),
        "libraries": library_versions(),
        "commit": git_commit(),
    }
