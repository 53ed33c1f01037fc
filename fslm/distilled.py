"""The distilled record: one JSON line of `fslm distill`'s output, read back by `fslm train` (docs/formats.md).

One type for both sides, so what distill writes and what train reads cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fslm.data import jsonl_rows
from fslm.errors import FslmError


@dataclass
class DistilledRecord:
    """An instruction with the text each stage should produce for it (`targets`: stage name -> text)."""

    id: str
    instruction: str
    input: str | None
    targets: dict[str, str]
    reference: str | None = None
    source: dict[str, Any] = field(default_factory=dict)  # where the instruction came from (file, index)
    extra: dict[str, Any] = field(default_factory=dict)  # further fields, kept as written (e.g. choices, gold)
    line: int = 0  # 1-based line in the file it was read from (0: not read from a file)

    KNOWN = ("id", "instruction", "input", "reference", "targets", "source")

    def to_row(self) -> dict[str, Any]:
        row: dict[str, Any] = {
            "id": self.id,
            "instruction": self.instruction,
            "input": self.input,
            "reference": self.reference,
            "targets": self.targets,
            "source": self.source,
        }
        row.update(self.extra)
        return row


@dataclass
class Problem:
    """A record that cannot be used, with its line (and, when known, what it was skipped for)."""

    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


def parse_row(obj: Any, line: int) -> DistilledRecord | Problem:
    """One decoded JSON line as a record, or the problem that makes it unusable."""
    if not isinstance(obj, dict):
        return Problem(line, f"expected a JSON object, got {type(obj).__name__}")
    instruction = obj.get("instruction")
    if not isinstance(instruction, str) or not instruction.strip():
        return Problem(line, "field 'instruction' is missing or empty")
    input = obj.get("input")
    if input is not None and not isinstance(input, str):
        return Problem(line, "field 'input' must be a string or null")
    targets = obj.get("targets")
    if not isinstance(targets, dict):
        return Problem(line, "field 'targets' is missing or not an object of stage name -> text")
    reference = obj.get("reference")
    source = obj.get("source")
    return DistilledRecord(
        id=str(obj.get("id") or f"line{line}"),
        instruction=instruction.strip(),
        input=(input or "").strip() or None,
        targets={k: v.strip() for k, v in targets.items() if isinstance(v, str)},
        reference=reference if isinstance(reference, str) else None,
        source=source if isinstance(source, dict) else {},
        extra={k: v for k, v in obj.items() if k not in DistilledRecord.KNOWN},
        line=line,
    )


def read_distilled(path: str | Path) -> tuple[list[DistilledRecord], list[Problem]]:
    """Parse a distilled JSONL file; malformed lines become problems with their line number, not exceptions."""
    path = Path(path)
    if not path.is_file():
        raise FslmError(f"{path}: no such data file (write one with `fslm distill`)")
    records: list[DistilledRecord] = []
    problems: list[Problem] = []
    seen: dict[str, int] = {}
    data = path.read_bytes().removeprefix(b"\xef\xbb\xbf")  # a BOM from Windows tools is not part of the JSON
    for n, obj in jsonl_rows(data, lambda line, why: problems.append(Problem(line, why))):
        parsed = parse_row(obj, n)
        if isinstance(parsed, Problem):
            problems.append(parsed)
            continue
        if parsed.id in seen:
            problems.append(Problem(n, f"duplicate id {parsed.id!r} (first on line {seen[parsed.id]})"))
            continue
        seen[parsed.id] = n
        records.append(parsed)
    return records, problems
