"""Instruction datasets in, uniform records out: Alpaca JSON/JSONL, CSV, Parquet, Self-Instruct seeds, GSM8K.

A bad row (no instruction, non-UTF-8 bytes, a broken JSON line) is reported with its file and line and skipped, so
one bad row never costs a long distillation run; `strict=True` makes it fatal instead. Sampling with `limit` and
`seed` is reproducible: the same file, limit and seed always give the same records in the same (file) order.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
import re
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fslm.errors import FslmError
from fslm.files import sha256_file

# Instruction formats, then the multiple-choice benchmark formats (fslm.choices).
FORMATS = ("auto", "alpaca", "self-instruct", "gsm8k", "arc", "openbookqa", "sciq", "mmlu")
SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".tsv")
_SURROGATE = re.compile("[\udc80-\udcff]")


@dataclass(frozen=True)
class FieldMap:
    """Which fields of a row hold the instruction, its optional input and the reference output."""

    instruction: str = "instruction"
    input: str | None = "input"
    output: str | None = "output"


# Built-in mappings. Self-Instruct seeds keep input/output in `instances[0]`; see `_self_instruct`.
BUILTIN: dict[str, FieldMap] = {
    "alpaca": FieldMap("instruction", "input", "output"),
    "gsm8k": FieldMap("question", None, "answer"),
}


@dataclass
class DatasetRecord:
    """One instruction of a dataset, with where it came from (file and 0-based row index, 1-based line)."""

    instruction: str
    input: str | None
    reference: str | None
    file: str
    index: int
    line: int
    # Multiple-choice records (fslm.choices): the options, the gold option's index, and whether the reference is
    # the gold option's text or its letter.
    choices: list[str] | None = None
    gold: int | None = None
    answer_format: str | None = None

    @property
    def id(self) -> str:
        if self.choices:  # the same question with other options is another item
            return record_id(self.instruction, "\x1e".join([self.input or "", *self.choices]))
        return record_id(self.instruction, self.input)


@dataclass
class BadRow:
    file: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}"


@dataclass
class Dataset:
    """What a read produced: the records (after dedup and sampling), the rows skipped and why, and provenance."""

    path: Path
    sha256: str
    format: str
    fields: FieldMap
    rows: int  # rows in the file (good and bad)
    records: list[DatasetRecord]
    bad: list[BadRow] = field(default_factory=list)
    duplicates: int = 0  # rows whose (instruction, input) repeats an earlier row; the first one is kept
    limit: int | None = None
    seed: int = 0

    def describe(self) -> dict[str, Any]:
        """Provenance for manifests."""
        return {
            "file": str(self.path),
            "sha256": self.sha256,
            "format": self.format,
            "fields": {
                "instruction": self.fields.instruction,
                "input": self.fields.input,
                "output": self.fields.output,
            },
            "rows": self.rows,
            "bad_rows": len(self.bad),
            "duplicates": self.duplicates,
            "limit": self.limit,
            "seed": self.seed,
            "selected": len(self.records),
        }


def normalise(text: str) -> str:
    """Case-, accent-width- and punctuation-insensitive form used for ids and contamination hashes."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(re.sub(r"[^\w]+", " ", text).split())


def record_id(instruction: str, input: str | None) -> str:
    """First 16 hex digits of sha256 over the normalised instruction and input (docs/formats.md)."""
    key = normalise(instruction) + "\x1f" + normalise(input or "")
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]


# --- reading -------------------------------------------------------------------------------------


def read_dataset(
    path: str | Path,
    *,
    format: str = "auto",
    instruction_field: str | None = None,
    input_field: str | None = None,
    output_field: str | None = None,
    limit: int | None = None,
    seed: int = 0,
    strict: bool = False,
    on_bad: Callable[[BadRow], None] | None = None,
) -> Dataset:
    """Read a dataset (a file, a directory of files, or a glob such as `shards/*.json`) into records.

    format: auto (detected from the first file), an instruction format (alpaca, self-instruct, gsm8k; explicit
    field flags override the mapping) or a multiple-choice benchmark (arc, openbookqa, sciq, mmlu). Bad rows go to
    `on_bad` and are skipped; with strict=True the first one raises FslmError. Several files are one dataset, read
    in name order; duplicates across files count as duplicates.
    """
    path = Path(path)
    if format not in FORMATS:
        raise FslmError(f"unknown dataset format {format!r} (known: {', '.join(FORMATS)})")
    files = dataset_files(path)
    if limit is not None and limit < 1:
        raise FslmError(f"--limit must be at least 1, got {limit}")
    bad: list[BadRow] = []
    current = [str(files[0])]

    def report(line: int, reason: str) -> None:
        row = BadRow(current[0], line, reason)
        if strict:
            raise FslmError(f"{row} (bad row; without --strict it would be skipped)")
        bad.append(row)
        if on_bad is not None:
            on_bad(row)

    from fslm.choices import CHOICE_FORMATS, detect, read_choice_rows

    chosen = format
    if chosen == "auto":
        chosen = detect(files[0]) or "auto"
    rows: list[tuple[str, int, Any]] = []  # (file, line, row)
    for f in files:
        current[0] = str(f)
        if chosen in CHOICE_FORMATS:
            rows += [(str(f), n, row) for n, row in enumerate(read_choice_rows(f, chosen), 1)]
        else:
            rows += [(str(f), line, row) for line, row in _raw_rows(f, report)]
    total = len(rows) + len(bad)  # rows that could not even be decoded count as rows too
    if chosen == "auto":
        chosen = _detect(next((r for _, _, r in rows if isinstance(r, dict)), {}))
    fields = BUILTIN.get(chosen, BUILTIN["alpaca"])
    fields = FieldMap(
        instruction_field or fields.instruction,
        input_field if input_field is not None else fields.input,
        output_field if output_field is not None else fields.output,
    )
    records: list[DatasetRecord] = []
    seen: set[str] = set()
    duplicates = 0
    for index, (file, line, row) in enumerate(rows):
        current[0] = file
        if chosen in CHOICE_FORMATS:
            rec: DatasetRecord | None = DatasetRecord(
                row["instruction"], None, row["reference"], file, index, line, row["choices"], row["gold"],
                row["answer_format"],
            )  # fmt: skip
        else:
            rec = _to_record(row, fields, chosen, file, index, line, report)
        if rec is None:
            continue
        if rec.id in seen:
            duplicates += 1
            continue
        seen.add(rec.id)
        records.append(rec)
    bad.sort(key=lambda b: (b.file, b.line))
    if not records:
        raise FslmError(f"{path}: no usable records ({total} rows, {len(bad)} bad)")
    if limit is not None and limit < len(records):
        keep = sorted(random.Random(seed).sample(range(len(records)), limit))
        records = [records[i] for i in keep]
    return Dataset(path, files_sha256(files), chosen, fields, total, records, bad, duplicates, limit, seed)


def dataset_files(path: Path) -> list[Path]:
    """The files of a dataset: the file itself, the dataset files of a directory, or a glob's matches; sorted."""
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES)
        if not files:
            raise FslmError(f"{path}: a directory without dataset files ({', '.join(SUFFIXES)})")
    elif any(c in str(path) for c in "*?["):
        files = sorted(
            p for p in Path(path.anchor or ".").glob(str(path.relative_to(path.anchor or "."))) if p.is_file()
        )
        if not files:
            raise FslmError(f"{path}: no file matches")
    else:
        raise FslmError(f"{path}: no such file")
    for f in files:
        if f.suffix.lower() not in SUFFIXES:
            raise FslmError(f"{f}: unsupported dataset file type {f.suffix!r} (known: {', '.join(SUFFIXES)})")
    return files


def files_sha256(files: list[Path]) -> str:
    """sha256 of one file; of several, sha256 over their names and hashes (in read order)."""
    if len(files) == 1:
        return sha256_file(files[0])
    lines = "".join(f"{f.name}:{sha256_file(f)}\n" for f in files)
    return hashlib.sha256(lines.encode()).hexdigest()


def _detect(row: dict[str, Any]) -> str:
    if isinstance(row.get("instances"), list) and "instruction" in row:
        return "self-instruct"
    if "question" in row and "answer" in row and "instruction" not in row:
        return "gsm8k"
    return "alpaca"


def _text(value: Any) -> str | None:
    """A field as text: None/'' stay None, numbers become text, anything else is not text."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise TypeError(type(value).__name__)
    value = str(value)
    if _SURROGATE.search(value):  # a byte that was not UTF-8 (decoded with surrogateescape)
        raise UnicodeError
    return value.strip() or None


def _to_record(
    row: Any, fields: FieldMap, fmt: str, file: str, index: int, line: int, report: Callable[[int, str], None]
) -> DatasetRecord | None:
    if not isinstance(row, dict):
        report(line, f"expected an object with fields, got {type(row).__name__}")
        return None
    values = dict(row)
    if fmt == "self-instruct" and fields.input == "input" and fields.output == "output":
        inst = row.get("instances")
        first = inst[0] if isinstance(inst, list) and inst and isinstance(inst[0], dict) else {}
        values.update(input=first.get("input"), output=first.get("output"))
    try:
        instruction = _text(values.get(fields.instruction))
        input = _text(values.get(fields.input)) if fields.input else None
        reference = _text(values.get(fields.output)) if fields.output else None
    except UnicodeError:
        report(line, "not valid UTF-8 text")
        return None
    except TypeError as e:
        report(line, f"a field holds a {e} where text was expected")
        return None
    if instruction is None:
        report(line, f"missing instruction (field {fields.instruction!r} is absent or empty)")
        return None
    return DatasetRecord(instruction, input, reference, file, index, line)


def _raw_rows(path: Path, report: Callable[[int, str], None]) -> Iterator[tuple[int, Any]]:
    """(line, row) pairs of a file; rows that cannot be decoded at all are reported here."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        yield from _parquet_rows(path)
        return
    data = path.read_bytes()
    if suffix == ".csv":
        yield from _csv_rows(data, report)
        return
    head = data.lstrip()[:1]
    if suffix == ".json" and head == b"[":
        yield from _json_list_rows(path, data, report)
    else:
        yield from _jsonl_rows(data, report)


def _jsonl_rows(data: bytes, report: Callable[[int, str], None]) -> Iterator[tuple[int, Any]]:
    for n, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            report(n, f"not valid UTF-8 (byte {e.start + 1} of the line)")
            continue
        try:
            yield n, json.loads(text)
        except json.JSONDecodeError as e:
            report(n, f"broken JSON line: {e.msg} at column {e.colno}")


def _json_list_rows(path: Path, data: bytes, report: Callable[[int, str], None]) -> Iterator[tuple[int, Any]]:
    """Elements of a top-level JSON list, each with the line it starts on; non-UTF-8 rows are reported alone."""
    text = data.decode("utf-8", errors="surrogateescape")
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    ws = re.compile(r"[\s,]*")
    while True:
        pos = ws.match(text, pos).end()
        if pos >= len(text) or text[pos] == "]":
            return
        line = text.count("\n", 0, pos) + 1
        try:
            value, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            # One broken element leaves no reliable way to find where the next one starts: fatal for the file.
            raise FslmError(f"{path}:{e.lineno}:{e.colno}: broken JSON: {e.msg}") from None
        yield line, value


def _csv_rows(data: bytes, report: Callable[[int, str], None]) -> Iterator[tuple[int, Any]]:
    text = data.decode("utf-8-sig" if data.startswith(b"\xef\xbb\xbf") else "utf-8", errors="surrogateescape")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    start = 2
    for row in reader:
        line = start
        start = reader.line_num + 1
        if None in row:  # more cells than header columns
            report(line, f"{len(row) - 1 + len(row[None])} cells but the header has {len(row) - 1} columns")
            continue
        yield line, row


def _parquet_rows(path: Path) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several unrelated types for a damaged file
        raise FslmError(f"{path}: cannot read as Parquet: {str(e).splitlines()[0]}") from None
    for i, row in enumerate(table.to_pylist()):
        yield i + 1, row  # "line" = 1-based row number
