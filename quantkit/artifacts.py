"""Atomic outputs and their JSON sidecars.

Every artifact quantkit writes (ONNX models, calibration tables, caches, engines, results) goes
through here: files are written to a temporary name and renamed into place, output directories are
assembled under a temporary name and renamed when complete, and each output records the inputs that
made it in a ``manifest.json`` so later steps can check and resume.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from quantkit.environment import environment_info
from quantkit.errors import QuantkitError

MANIFEST_NAME = "manifest.json"


UNWRITABLE_HINT = "choose an output path in a directory you can write to"


def unwritable(path: Path, exc: OSError) -> QuantkitError:
    """The one-line error for an output that cannot be created (permission, read-only or
    virtual file system, a file where a directory should be, disk full)."""
    return QuantkitError(f"cannot write {path}: {exc.strerror or exc}", UNWRITABLE_HINT)


def check_writable(path: Path) -> None:
    """Fail now, before any work, if ``path`` could not be created.

    The nearest existing ancestor must be a directory in which an entry can be made. That is
    tried (a temporary directory, removed at once) rather than judged from permission bits,
    which say nothing when running as root, or on /proc and read-only mounts."""
    path = Path(path).absolute()
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise QuantkitError(f"cannot write {path}: {ancestor} is not a directory",
                            UNWRITABLE_HINT)
    try:
        probe = tempfile.mkdtemp(prefix=".quantkit-probe-", dir=ancestor)
    except OSError as exc:
        raise QuantkitError(f"cannot write {path}: nothing can be created in {ancestor} "
                            f"({exc.strerror or exc})", UNWRITABLE_HINT) from None
    os.rmdir(probe)


def make_dirs(directory: Path) -> None:
    """``mkdir -p`` whose failure is one clear QuantkitError instead of a traceback."""
    try:
        Path(directory).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise unwritable(Path(directory), exc) from None


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same directory and a rename."""
    path = Path(path)
    make_dirs(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise unwritable(path, exc) from None
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError):  # disk full, a directory in the way: one line, exit 2
            raise unwritable(path, exc) from None
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def to_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n"


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, to_json(obj))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):  # numpy scalars and arrays
        return obj.tolist()
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    raise TypeError(f"cannot serialise {type(obj).__name__} to JSON")


def read_json(path: Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise QuantkitError(f"{path} does not exist") from None
    except json.JSONDecodeError as exc:
        raise QuantkitError(f"{path} is not valid JSON: {exc}") from None


def check_can_write(path: Path, force: bool) -> None:
    """Refuse to replace an existing output unless ``force`` is set, and refuse an output that
    could not be created at all (every command calls this before its work)."""
    path = Path(path)
    if path.exists() and not force:
        raise QuantkitError(f"{path} already exists", "pass --force to replace it")
    check_writable(path)


@contextlib.contextmanager
def atomic_output_dir(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``out`` only when the block finishes.

    On any error (Ctrl-C included) the temporary directory is removed and an existing ``out`` is
    left untouched, so a reader never sees a half-written output.
    """
    out = Path(out)
    check_can_write(out, force)
    make_dirs(out.parent)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    except OSError as exc:
        raise unwritable(out, exc) from None
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; outputs should not be
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old / "replaced") if out.is_dir() else os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_json(obj: Any) -> str:
    """Stable hash of a JSON-serialisable object (keys sorted)."""
    text = json.dumps(obj, sort_keys=True, default=_json_default)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def make_manifest(kind: str, inputs: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """The sidecar record of an artifact: what it is, what made it, and with which versions."""
    return {
        "kind": kind,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "inputs": inputs,
        "inputs_hash": sha256_json(inputs),
        **fields,
        "environment": environment_info(),
    }


def write_manifest(directory: Path, manifest: dict[str, Any]) -> Path:
    path = Path(directory) / MANIFEST_NAME
    atomic_write_json(path, manifest)
    return path


def read_manifest(directory: Path, kind: str | None = None) -> dict[str, Any]:
    """Read an artifact directory's manifest, checking that it is of the expected kind."""
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise QuantkitError(
            f"{directory} is not a quantkit artifact directory (no {MANIFEST_NAME})",
            "point at a directory written by a quantkit command",
        )
    manifest = read_json(path)
    if kind is not None and manifest.get("kind") != kind:
        raise QuantkitError(
            f"{directory} holds a '{manifest.get('kind')}' artifact, not a '{kind}' one"
        )
    return manifest
