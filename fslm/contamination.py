"""Contamination guard: does a training instruction appear in a benchmark's test split?

Each test item's question text is normalised (`fslm.data.normalise`: NFKC, case-folded, punctuation and runs of
whitespace collapsed) and hashed; a training record matches when its instruction, its input, or both joined,
hash the same. Exact-after-normalisation matching finds copied items, not paraphrases.

The splits are the small table `TEST_SPLITS` below, with paths relative to the directory given by `--data-dir`
(the layout of the shared data README). `fslm distill` warns (with --strict: refuses); `fslm check-contamination`
prints counts per split; `fslm eval` reuses `BenchmarkIndex`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fslm.data import normalise
from fslm.errors import FslmError
from fslm.files import sha256_file


def _jsonl(path: Path, get: Callable[[dict[str, Any]], Any]) -> Iterator[str]:
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            yield get(json.loads(line))


def _json_list(path: Path, get: Callable[[dict[str, Any]], Any]) -> Iterator[str]:
    for item in json.loads(path.read_text(encoding="utf-8")):
        yield get(item)


def _csv(path: Path, column: int | str, delimiter: str = ",", header: bool = True) -> Iterator[str]:
    text = path.read_text(encoding="utf-8-sig")
    if header:
        for row in csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter):
            yield row[column]  # type: ignore[index]
    else:
        for row in csv.reader(io.StringIO(text, newline=""), delimiter=delimiter):
            if row:
                yield row[int(column)]


@dataclass(frozen=True)
class Split:
    """One benchmark test split: a glob under --data-dir and how to get each item's question text."""

    name: str
    pattern: str
    read: Callable[[Path], Iterator[str]]


# The declarative table of test splits checked. Add a row to guard another benchmark.
TEST_SPLITS: tuple[Split, ...] = (
    Split("arc_easy", "arc/ARC-Easy-Test.jsonl", lambda p: _jsonl(p, lambda r: r["question"]["stem"])),
    Split("arc_challenge", "arc/ARC-Challenge-Test.jsonl", lambda p: _jsonl(p, lambda r: r["question"]["stem"])),
    Split("mmlu", "mmlu/test/*_test.csv", lambda p: _csv(p, 0, header=False)),
    Split("gsm8k", "gsm8k/test.jsonl", lambda p: _jsonl(p, lambda r: r["question"])),
    Split("truthfulqa", "truthfulqa/TruthfulQA.csv", lambda p: _csv(p, "Question")),
    Split("truthfulqa_mc", "truthfulqa/mc_task.json", lambda p: _json_list(p, lambda r: r["question"])),
    Split("truthfulqa_mc_v0", "truthfulqa/v0/mc_task.json", lambda p: _json_list(p, lambda r: r["question"])),
    Split("openbookqa", "openbookqa/test.tsv", lambda p: _csv(p, "Question Stem", delimiter="\t")),
)


# lm-eval's cloze prompt around a question ("Question: ...\nAnswer:"), which the test splits' stems do not carry.
_QUESTION_FRAME = re.compile(r"^\s*Question:\s*|\s*Answer:\s*$")


def text_hash(text: str) -> str:
    return hashlib.sha256(normalise(text).encode("utf-8")).hexdigest()[:20]


@dataclass
class BenchmarkIndex:
    """Hashes of every test item found under a data directory, and which split each came from."""

    data_dir: Path
    hashes: dict[str, set[str]] = field(default_factory=dict)  # hash -> split names
    sizes: dict[str, int] = field(default_factory=dict)  # split -> items
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256
    missing: list[str] = field(default_factory=list)  # splits with no file under data_dir

    @classmethod
    def load(cls, data_dir: str | Path, splits: Iterable[Split] = TEST_SPLITS) -> BenchmarkIndex:
        data_dir = Path(data_dir)
        if not data_dir.is_dir():
            raise FslmError(f"{data_dir}: --data-dir is not a directory")
        index = cls(data_dir)
        for split in splits:
            paths = sorted(data_dir.glob(split.pattern))
            if not paths:
                index.missing.append(split.name)
                continue
            n = 0
            for path in paths:
                try:
                    texts = list(split.read(path))
                except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
                    raise FslmError(f"{path}: cannot read the {split.name} test split: {e}") from None
                for text in texts:
                    if isinstance(text, str) and normalise(text):
                        index.hashes.setdefault(text_hash(text), set()).add(split.name)
                        n += 1
                index.files[str(path.relative_to(data_dir))] = sha256_file(path)
            index.sizes[split.name] = n
        if not index.sizes:
            raise FslmError(
                f"{data_dir}: no benchmark test split found (looked for {', '.join(s.pattern for s in splits)})"
            )
        return index

    def match(self, instruction: str, input: str | None = None) -> set[str]:
        """The splits that hold this instruction (alone, its input alone, or both joined; also without the
        `Question: ... Answer:` frame a multiple-choice record's instruction carries, the evaluation's prompt form)."""
        found: set[str] = set()
        bare = _QUESTION_FRAME.sub("", instruction)
        for text in (instruction, input or "", f"{instruction} {input or ''}", bare):
            if normalise(text):
                found |= self.hashes.get(text_hash(text), set())
        return found

    def check(self, items: Iterable[tuple[str, str, str | None]]) -> ContaminationReport:
        """items: (id, instruction, input). Counts matching training records per split."""
        report = ContaminationReport({name: 0 for name in self.sizes}, dict(self.sizes), list(self.missing))
        for item_id, instruction, input in items:
            report.checked += 1
            splits = self.match(instruction, input)
            if splits:
                report.matched[item_id] = sorted(splits)
                for s in splits:
                    report.per_split[s] += 1
        return report


@dataclass
class ContaminationReport:
    per_split: dict[str, int]  # split -> training records that match it
    split_sizes: dict[str, int]
    missing: list[str]
    checked: int = 0
    matched: dict[str, list[str]] = field(default_factory=dict)  # record id -> splits

    @property
    def total(self) -> int:
        return len(self.matched)

    def summary(self) -> str:
        hits = ", ".join(f"{n} in {s}" for s, n in self.per_split.items() if n)
        return f"{self.total} of {self.checked} training instructions appear in a benchmark test split ({hits})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "records_checked": self.checked,
            "contaminated": self.total,
            "per_split": self.per_split,
            "split_sizes": self.split_sizes,
            "splits_not_found": self.missing,
            "ids": sorted(self.matched),
        }
