"""Instruction datasets in, uniform records out: Alpaca JSON/JSONL, CSV, Parquet, Self-Instruct seeds, GSM8K.

A bad row (no instruction, non-UTF-8 bytes or a lone surrogate, a broken JSON line, JSON nested too deeply, an
integer of thousands of digits, a CSV field over the csv module's size limit) is reported with its file and line and
skipped, so one bad row never costs a long distillation run; `strict=True` makes it fatal instead. What cannot be
skipped safely (a broken element of a JSON list, a CSV quote never closed) is fatal, with file and line. Sampling with `limit` and
`seed` is reproducible: the same file, limit and seed always give the same records in the same (file) order.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import random
import re
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fslm.choices import CHOICE_FORMATS, detect, read_choice_rows
from fslm.errors import FslmError
from fslm.files import sha256_file

# Instruction formats, then the multiple-choice benchmark formats (fslm.choices).
FORMATS = ("auto", "alpaca", "self-instruct", "gsm8k", *CHOICE_FORMATS)
SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".tsv")
# Any surrogate: a byte that was not UTF-8 (decoded with surrogateescape: U+DC80..U+DCFF) or a lone surrogate
# escape in JSON ("\ud800"), which json accepts but which cannot be written back as UTF-8.
_SURROGATE = re.compile("[\ud800-\udfff]")
_BOM = b"\xef\xbb\xbf"
_NON_WORD = re.compile(r"[^\w]+")
# Strings (with escapes) and the tokens that delimit JSON values: enough to find where a list element ends.
_JSON_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{},]', re.S)


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
    return " ".join(_NON_WORD.sub(" ", text).split())


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

    chosen = format
    if chosen == "auto":
        chosen = detect(files[0]) or "auto"
    rows = _read_rows(files, chosen, report, current)
    total = len(rows) + len(bad)  # rows that could not even be decoded count as rows too
    if chosen == "auto":
        chosen = _detect(next((r for _, _, r in rows if isinstance(r, dict)), {}))
    fields = BUILTIN.get(chosen, BUILTIN["alpaca"])
    fields = FieldMap(
        instruction_field or fields.instruction,
        input_field if input_field is not None else fields.input,
        output_field if output_field is not None else fields.output,
    )
    records, duplicates = _records(rows, chosen, fields, report, current)
    bad.sort(key=lambda b: (b.file, b.line))
    if not records:
        raise FslmError(f"{path}: no usable records ({total} rows, {len(bad)} bad)")
    if limit is not None and limit < len(records):
        keep = sorted(random.Random(seed).sample(range(len(records)), limit))
        records = [records[i] for i in keep]
    return Dataset(path, files_sha256(files), chosen, fields, total, records, bad, duplicates, limit, seed)


def _read_rows(
    files: list[Path], chosen: str, report: Callable[[int, str], None], current: list[str]
) -> list[tuple[str, int, Any]]:
    """(file, line, row) of every file in order: a multiple-choice format's questions, else the raw JSON/CSV rows
    (`current[0]` names the file being read, for `report`)."""
    rows: list[tuple[str, int, Any]] = []
    for f in files:
        current[0] = str(f)
        if chosen in CHOICE_FORMATS:
            rows += [(str(f), n, row) for n, row in enumerate(read_choice_rows(f, chosen), 1)]
        else:
            rows += [(str(f), line, row) for line, row in _raw_rows(f, report)]
    return rows


def _records(
    rows: list[tuple[str, int, Any]],
    chosen: str,
    fields: FieldMap,
    report: Callable[[int, str], None],
    current: list[str],
) -> tuple[list[DatasetRecord], int]:
    """The rows as records, the first of each instruction kept; and how many duplicates were skipped."""
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
        rid = rec.id  # computed once: normalising is most of the time a large file takes
        if rid in seen:
            duplicates += 1
            continue
        seen.add(rid)
        records.append(rec)
    return records, duplicates


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
    if m := _SURROGATE.search(value):
        raise UnicodeError(f"U+{ord(m.group()):04X} at character {m.start() + 1}")
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
    except UnicodeError as e:
        report(line, f"not valid UTF-8 text ({e}: a byte that is not UTF-8 or a lone surrogate escape like \\ud800)")
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
        yield from _csv_rows(path, data, report)
        return
    data = data.removeprefix(_BOM)  # what Windows tools put first; not part of the JSON
    head = data.lstrip()[:1]
    if suffix == ".json" and head == b"[":
        yield from _json_list_rows(path, data, report)
    else:
        yield from jsonl_rows(data, report)


def jsonl_rows(data: bytes, report: Callable[[int, str], None]) -> Iterator[tuple[int, Any]]:
    """(line, decoded JSON) of each non-blank line; a line that is not UTF-8 or not JSON is reported and skipped.
    The one rule for JSON lines: distill's input here, train's distilled records in fslm.distilled.

    The bytes are split, not the text (not splitlines(): U+2028 may sit in a string), and each line decoded alone."""
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
        except (RecursionError, ValueError) as e:
            report(n, _undecodable(e))


def _undecodable(e: BaseException) -> str:
    """Why valid-looking JSON could not be decoded: nesting past Python's recursion limit, or a huge integer."""
    if isinstance(e, RecursionError):
        return "JSON nested too deeply"
    return f"JSON value cannot be read: {str(e).split(';')[0]}"  # e.g. an integer of more than 4,300 digits


def _json_list_rows(path: Path, data: bytes, report: Callable[[int, str], None]) -> Iterator[tuple[int, Any]]:
    """Elements of a top-level JSON list, each with the line it starts on; non-UTF-8 rows are reported alone.

    Linear in the file size: line numbers are counted from the previous element on, not from the start.
    """
    text = data.decode("utf-8", errors="surrogateescape")
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    ws = re.compile(r"[\s,]*")
    line, counted = 1, 0  # `line` is the line number at offset `counted`
    while True:
        pos = ws.match(text, pos).end()
        if pos >= len(text) or text[pos] == "]":
            return
        line += text.count("\n", counted, pos)
        counted = pos
        try:
            value, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            # One broken element leaves no reliable way to find where the next one starts: fatal for the file.
            raise FslmError(f"{path}:{e.lineno}:{e.colno}: broken JSON: {e.msg}") from None
        except (RecursionError, ValueError) as e:  # well-formed but undecodable: skip just this element
            report(line, _undecodable(e))
            pos = _end_of_value(text, pos)
            continue
        yield line, value


def _end_of_value(text: str, pos: int) -> int:
    """Where the JSON value starting at `pos` ends (syntax already checked by the decoder), without recursion."""
    depth = 0
    for m in _JSON_TOKENS.finditer(text, pos):
        token = m.group()
        if token in ("[", "{"):
            depth += 1
        elif token in ("]", "}"):
            depth -= 1
            if depth <= 0:
                return m.end() if depth == 0 else m.start()
        elif token == "," and depth == 0:
            return m.start()
    return len(text)


def _csv_rows(path: Path, data: bytes, report: Callable[[int, str], None]) -> Iterator[tuple[int, Any]]:
    """Rows as dicts keyed by the header, each with the line it starts on.

    Parsed strictly and without the csv module's field size limit (a field over it is reported, and parsing goes on
    in step with the file); a quote that is never closed is fatal: the rest of the file would be one field.
    """
    text = data.decode("utf-8-sig" if data.startswith(_BOM) else "utf-8", errors="surrogateescape")
    limit = csv.field_size_limit()
    lines = _Counted(io.StringIO(text, newline=""))
    reader = csv.reader(lines, strict=True)
    header: list[str] | None = None
    csv.field_size_limit(max(limit, len(text) + 1))
    try:
        while True:
            start = lines.count + 1  # the row starts on the line after the last one the reader took
            try:
                cells = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                if lines.at_end and "unexpected end of data" in str(e):
                    raise FslmError(
                        f'{path}:{start}: a quoted field opened on this line is never closed (a missing "); '
                        "the rest of the file would be read as one field"
                    ) from None
                report(start, f"malformed CSV: {e}")
                continue
            if not cells:  # a blank line
                continue
            if header is None:
                header = cells
                continue
            if len(cells) > len(header):
                report(start, f"{len(cells)} cells but the header has {len(header)} columns")
                continue
            longest = max(len(c) for c in cells)
            if longest > limit:
                report(start, f"a field of {longest:,} characters is larger than the csv module's limit ({limit:,})")
                continue
            yield start, dict(itertools.zip_longest(header, cells))
    finally:
        csv.field_size_limit(limit)


class _Counted:
    """A line iterator that counts the lines handed out, so a CSV row's first line is known even for multi-line rows."""

    def __init__(self, lines: Iterator[str]) -> None:
        self.lines = lines
        self.count = 0
        self.at_end = False

    def __iter__(self) -> _Counted:
        return self

    def __next__(self) -> str:
        try:
            line = next(self.lines)
        except StopIteration:
            self.at_end = True
            raise
        self.count += 1
        return line


def _parquet_rows(path: Path) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several unrelated types for a damaged file
        raise FslmError(f"{path}: cannot read as Parquet: {str(e).splitlines()[0]}") from None
    for i, row in enumerate(table.to_pylist()):
        yield i + 1, row  # "line" = 1-based row number
