"""Write type stubs of the TensorRT 10.13 Python API into a directory, for ``make typecheck``.

Usage: ``python tools/prepare_tensorrt_stubs.py DIR`` (``make typecheck`` runs it with the
virtual environment's python, into ``.stubs``; pyproject.toml's ``[tool.mypy]`` reads it through
``mypy_path``).

Why a script and not ``pip install tensorrt-stubs``: the stubs wheel depends on ``tensorrt``
itself, whose native libraries need an NVIDIA setup, so it is downloaded with ``--no-deps``; its
packages have no ``py.typed``, so mypy reads them from ``mypy_path`` rather than site-packages;
and the generated ``.pyi`` files are not all valid Python, which mypy rejects:

* parameters named after Python keywords (``in``), renamed with a trailing underscore;
* ``IScaleLayer``'s ``add_scale_nd`` has a parameter without a default after defaulted ones,
  given ``= ...``.

Every file is checked to parse after patching, so a new stubs release with other errors fails
here, by name, instead of confusing mypy. The stubs are assembled in a temporary directory and
moved into ``DIR`` only when complete: an interrupted run leaves nothing that ``make`` would take
for finished.
"""

from __future__ import annotations

import ast
import keyword
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REQUIREMENT = "tensorrt-stubs==10.13.0.35.1"
PACKAGES = ("tensorrt", "tensorrt_bindings")

# `(in: int` or `, in: int` -> `in_: int`: any keyword used as a parameter name (a colon right
# after the name, then a space: docstring prose such as `or :class:` does not match)
_KEYWORD_PARAM = re.compile(
    r"(?P<lead>[(,]\s*)(?P<name>" + "|".join(sorted(keyword.kwlist, key=len, reverse=True))
    + r")(?P<colon>: )"
)
# the one parameter left without a default after defaulted ones (add_scale_nd)
_MISSING_DEFAULT = re.compile(r"(power: Weights = None, channel_axis: int)\)")


def patch(text: str) -> str:
    """The stub text with keyword parameter names renamed and the missing default added."""
    text = _KEYWORD_PARAM.sub(lambda m: f"{m['lead']}{m['name']}_{m['colon']}", text)
    return _MISSING_DEFAULT.sub(r"\1 = ...)", text)


def download(into: Path) -> Path:
    """Fetch the stubs wheel (no dependencies) with this interpreter's pip; return its path."""
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
           "--only-binary", ":all:", "--dest", str(into), REQUIREMENT]
    if subprocess.run(cmd).returncode != 0:
        sys.exit(f"prepare_tensorrt_stubs: could not download {REQUIREMENT} from the package "
                 "index (is it reachable?)")
    wheels = sorted(into.glob("tensorrt_stubs-*.whl"))
    if not wheels:
        sys.exit(f"prepare_tensorrt_stubs: pip downloaded no wheel for {REQUIREMENT}")
    return wheels[0]


def extract(wheel: Path, dest: Path) -> int:
    """Write the patched ``.pyi`` files of ``PACKAGES`` from ``wheel`` under ``dest``."""
    count = 0
    with zipfile.ZipFile(wheel) as archive:
        for name in archive.namelist():
            if not (name.endswith(".pyi") and name.split("/", 1)[0] in PACKAGES):
                continue
            text = patch(archive.read(name).decode("utf-8"))
            try:
                ast.parse(text, filename=name)
            except SyntaxError as exc:
                sys.exit(f"prepare_tensorrt_stubs: {name} line {exc.lineno} is still not valid "
                         f"Python after patching ({exc.msg}); {REQUIREMENT} changed?")
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text, encoding="utf-8")
            count += 1
    if count == 0:
        sys.exit(f"prepare_tensorrt_stubs: {wheel.name} holds no .pyi under {PACKAGES}")
    return count


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        sys.exit("usage: python tools/prepare_tensorrt_stubs.py DIR")
    dest = Path(argv[0])
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".stubs-", dir=dest) as tmp:
        wheel = download(Path(tmp) / "wheel")
        staged = Path(tmp) / "staged"
        count = extract(wheel, staged)
        # whole packages replace old copies; `tensorrt` (what make checks for) goes in last
        for package in sorted(PACKAGES, key=lambda p: p == "tensorrt"):
            shutil.rmtree(dest / package, ignore_errors=True)
            (staged / package).rename(dest / package)
    print(f"TensorRT 10.13 stubs ({count} files, {REQUIREMENT}) ready in {dest}")


if __name__ == "__main__":
    main(sys.argv[1:])
