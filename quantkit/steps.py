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


class StepState:
    """The step record file (``run-state.json`` of ``quantkit run``, ``steps.json`` of
    ``quantkit quantize``): step name -> {key, artifact (manifest or file hash)}, or {key,
    skipped: why} for an optional step that could not be done here."""

    def __init__(self, path: Path, schema: str) -> None:
        self.path = Path(path)
        self.schema = schema
        self.steps: dict[str, dict[str, str]] = {}
        if self.path.is_file():
            self.steps = dict(read_json(self.path).get("steps", {}))

    def matches(self, step: str, key: str, artifact: Path) -> bool:
        entry = self.steps.get(step)
        return bool(entry) and entry.get("key") == key and artifact.exists() \
            and entry.get("artifact") == artifact_hash(artifact)

    def owns(self, step: str) -> bool:
        return step in self.steps and "skipped" not in self.steps[step]

    def record(self, step: str, key: str, artifact: Path) -> None:
        self.steps[step] = {"key": key, "artifact": artifact_hash(artifact)}
        self._save()

    def skipped(self, step: str, key: str) -> str | None:
        """Why an optional step was skipped by an earlier run with the same key, if it was."""
        entry = self.steps.get(step) or {}
        return entry.get("skipped") if entry.get("key") == key else None

    def record_skip(self, step: str, key: str, reason: str) -> None:
        self.steps[step] = {"key": key, "skipped": reason}
        self._save()

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.path, {"schema": self.schema, "steps": self.steps})


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
    """Runs or reuses named steps in ``workdir``; ``say`` reports each one as it starts and
    ends, and a long step's progress (``quantkit.progress.StepProgress``) while it runs."""

    workdir: Path
    total: int
    say: Callable[[str], None] = print
    force: bool = False
    tty: bool = False
    records: list[StepRecord] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir)
        self.state = StepState(self.workdir / "steps.json", STEPS_SCHEMA)

    def run(self, name: str, key_parts: Any, artifact: Path,
            make: Callable[[bool], None]) -> Path:
        """Reuse ``artifact`` if made with the same key, else ``make(replace)`` it."""
        from quantkit.progress import StepProgress

        key = sha256_json(key_parts)
        number = f"[{len(self.records) + 1}/{self.total}]"
        if self.state.matches(name, key, artifact):
            self.records.append(StepRecord(name, artifact, True, 0.0))
            self.say(f"{number} {name}: reused {artifact}")
            return artifact
        replace = artifact.exists()
        if replace and not (self.force or self.state.owns(name)):
            raise QuantkitError(f"{artifact} exists but was not made by this command",
                                "pass --force to replace it, or use another --out")
        self.say(f"{number} {name} ...")
        start = time.perf_counter()
        with StepProgress(f"{number} {name}", self.say, tty=self.tty):
            make(replace)
        seconds = time.perf_counter() - start
        self.state.record(name, key, artifact)
        self.records.append(StepRecord(name, artifact, False, seconds))
        self.say(f"{number} {name}: done in {seconds:.0f} s")
        return artifact


__all__ = ["StepRecord", "StepState", "Steps", "artifact_hash"]
