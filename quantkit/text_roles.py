"""Which text each role read (calibration, tuning, evaluation), and a check that no two roles
read the same records without the user saying so.

A role's text is known from the description its artifact recorded: the calibration table's
``data`` (``TokenBlocks.describe()``), the engine manifest's ``calibration_text``, the autotune
windows' ``data`` and the evaluation's ``dataset``. Each holds the ``TextSource`` description and,
since the record ranges were recorded, what was actually read (``read.records``). Descriptions
written before that are resolved again from the source's slice.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantkit.data import RecordRange, TextSource, record_range
from quantkit.errors import QuantkitError

ROLES = ("calibration", "tuning", "evaluation")
ALLOW_FLAG = "--allow-overlap"


@dataclass(frozen=True)
class RoleText:
    """One role's text: where it came from and which records of it were read (local text)."""

    role: str  # one of ROLES
    source: TextSource
    records: RecordRange | None
    owner: str | None = None  # whose role it is (an engine's name), for messages

    def label(self) -> str:
        """``calibration: wiki.test.raw records 0-1155 of 2891 (train[:40%])``."""
        who = f"{self.role} of {self.owner}" if self.owner else self.role
        where = Path(self.source.name).name if self.source.kind == "local" else self.source.name
        if self.source.kind == "hub":
            config = f"/{self.source.config}" if self.source.config else ""
            return f"{who}: Hub dataset {where}{config}, split {self.source.split} (whole)"
        if self.records is None:
            return f"{who}: {where}"
        return (f"{who}: {where} {self.records.text()} of {self.records.total} "
                f"({_slice_text(self.source)})")

    def overlaps(self, other: RoleText) -> bool:
        a, b = self.source, other.source
        if a.kind != b.kind or a.name != b.name or a.column != b.column:
            return False
        if a.kind == "hub":
            return (a.config, a.split) == (b.config, b.split)
        if self.records is None or other.records is None:
            return True
        return self.records.intersects(other.records)

    def describe(self) -> dict[str, Any]:
        return {"role": self.role, "owner": self.owner, "source": self.source.describe(),
                "records": self.records.describe() if self.records else None,
                "label": self.label()}


def _slice_text(source: TextSource) -> str:
    lo, hi = source.part
    if (lo, hi) == (0.0, 100.0):
        return f"split {source.split}, whole"
    blocks = f"/{source.blocks}" if source.blocks > 1 else ""
    return f"{source.split}[{_pct(lo) if lo else ''}:{_pct(hi) if hi < 100 else ''}]{blocks}"


def _pct(value: float) -> str:
    return f"{value:g}%"


def role_text(role: str, description: Mapping[str, Any] | None) -> RoleText | None:
    """A role's text from a recorded description (a ``TokenBlocks.describe()``, an
    ``EvaluationText.describe()`` or a results ``dataset``); None where nothing was recorded."""
    if not description:
        return None
    source_fields = description.get("source")
    if not isinstance(source_fields, Mapping):  # EvaluationText.describe() is flat
        source_fields = description
    if "kind" not in source_fields or "name" not in source_fields:
        return None
    part = source_fields.get("part_percent") or (0.0, 100.0)
    source = TextSource(str(source_fields["kind"]), str(source_fields["name"]),
                        source_fields.get("config"), source_fields.get("split"),
                        str(source_fields.get("column") or "text"),
                        (float(part[0]), float(part[1])), int(source_fields.get("blocks") or 1))
    read = description.get("read") or {}
    recorded = read.get("records") if isinstance(read, Mapping) else None
    if recorded:
        spans = recorded.get("spans") or [[recorded["first"], recorded["last"]]]
        records: RecordRange | None = RecordRange.of_spans(
            [(int(first), int(last) + 1) for first, last in spans], int(recorded["total"]))
    else:  # recorded before ranges were: resolve the slice again
        return role_of_source(role, source)
    return RoleText(role, source, records)


def role_of_source(role: str, source: TextSource) -> RoleText:
    """A role's text before it is read (a recipe's settings): the slice resolved to records."""
    local = source.kind == "local" and Path(source.name).exists()
    return RoleText(role, source, record_range(source) if local else None)


def check_roles_disjoint(roles: Iterable[RoleText | None], allow_overlap: bool = False,
                         focus: str | None = None, allow_with: str | None = ALLOW_FLAG
                         ) -> list[str]:
    """Refuse two roles that read the same records (one clear error naming both ranges), unless
    ``allow_overlap``; then return the overlaps as warnings for the results to carry. With
    ``focus``, only pairs that include that role are checked (evaluation checks its own text
    against each engine's calibration and tuning text, not those against each other).
    ``allow_with`` names how the user allows an overlap (None: it cannot be allowed)."""
    known = [r for r in roles if r is not None]
    clashes = []
    for i, a in enumerate(known):
        for b in known[i + 1:]:
            if focus is not None and focus not in (a.role, b.role):
                continue
            if a.role != b.role and a.overlaps(b):
                clashes.append(f"{a.label()} overlaps {b.label()}")
    if clashes and not allow_overlap:
        raise QuantkitError(
            "the text of two roles overlaps: " + "; ".join(dict.fromkeys(clashes)),
            "give each role its own part, e.g. --split 'train[:40%]' for calibration, "
            "'train[40%:50%]' for tuning and 'test[50%:]' for evaluation"
            + (f", or pass {allow_with} if you mean it" if allow_with else ""),
        )
    return list(dict.fromkeys(clashes))


__all__ = ["ALLOW_FLAG", "ROLES", "RoleText", "check_roles_disjoint", "role_of_source",
           "role_text"]
