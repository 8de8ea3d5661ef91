"""Resumable steps of a multi-step command (``quantkit quantize``): each step has a key, the hash
of its own settings and of the artifacts it reads; ``steps.json`` in the work directory records,
per step, the key it was made with and the manifest hash of what it wrote. A step is reused only
when both still match, so a changed setting, or an artifact edited or replaced by hand, reruns
that step and everything after it. Every artifact is written atomically by its own command, so
Ctrl-C loses only the step in progress."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantkit.artifacts import MANIFEST_NAME, atomic_write_json, read_json, sha256_file, sha256_json
from quantkit.errors import QuantkitError

STEPS_SCHEMA = "quantkit.steps/1"


def artifact_hash(path: Path) -> str:
    """A directory artifact is identified by its manifest, a file by its content."""
    if path.is_dir():
        manifest = path / MANIFEST_NAME
        return sha256_file(manifest) if manifest.is_file() else ""
    return sha256_file(path) if path.is_file() else ""


@dataclass
class StepRecord:
    name: str
    path: Path
    reused: bool
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "path": str(self.path), "reused": self.reused,
                "seconds": round(self.seconds, 1)}


@dataclass
class Steps:
    """Runs or reuses named steps in ``workdir``; ``say`` reports each one as it starts/ends."""

    workdir: Path
    total: int
    say: Callable[[str], None] = print
    force: bool = False
    records: list[StepRecord] = field(default_factory=list)
    _state: dict[str, dict[str, str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir)
        self.path = self.workdir / "steps.json"
        if self.path.is_file():
            self._state = dict(read_json(self.path).get("steps", {}))

    def run(self, name: str, key_parts: Any, artifact: Path,
            make: Callable[[bool], None]) -> Path:
        """Reuse ``artifact`` if made with the same key, else ``make(replace)`` it."""
        key = sha256_json(key_parts)
        number = f"[{len(self.records) + 1}/{self.total}]"
        entry = self._state.get(name) or {}
        if (entry.get("key") == key and artifact.exists()
                and entry.get("artifact") == artifact_hash(artifact)):
            self.records.append(StepRecord(name, artifact, True, 0.0))
            self.say(f"{number} {name}: reused {artifact}")
            return artifact
        replace = artifact.exists()
        if replace and not (self.force or name in self._state):
            raise QuantkitError(f"{artifact} exists but was not made by this command",
                                "pass --force to replace it, or use another --out")
        self.say(f"{number} {name} ...")
        start = time.perf_counter()
        make(replace)
        seconds = time.perf_counter() - start
        self._state[name] = {"key": key, "artifact": artifact_hash(artifact)}
        self.workdir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.path, {"schema": STEPS_SCHEMA, "steps": self._state})
        self.records.append(StepRecord(name, artifact, False, seconds))
        self.say(f"{number} {name}: done in {seconds:.0f} s")
        return artifact


__all__ = ["Steps", "StepRecord", "artifact_hash"]
