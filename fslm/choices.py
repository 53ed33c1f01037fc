"""Multiple-choice datasets as distillation input: ARC (AI2 JSONL), OpenBookQA (TSV), SciQ (JSON), MMLU (CSV).

A record keeps its question, its options and the gold label. Its instruction is the question in exactly the form
the evaluation puts it to the model (the same `doc_to_text` as fslm's lm-eval tasks), and its reference is the gold
answer in exactly the form the evaluation scores it: the option text for ARC, OpenBookQA and SciQ (scored as a
continuation), the letter for MMLU. So a stack trained on these records answers at evaluation time in the form it
was trained on. The rows are parsed by the same readers the evaluation tasks use (`fslm.benchmark_files`).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fslm import benchmark_files as files

LETTERS = "ABCDEFGH"


@dataclass(frozen=True)
class ChoiceFormat:
    """How one benchmark's files become (instruction, options, gold, reference)."""

    name: str
    rows: Callable[[Path], list[dict[str, Any]]]
    text: Callable[[dict[str, Any]], str]
    answer: str  # "text": the gold option's text is the answer; "letter": its letter


FORMATS: dict[str, ChoiceFormat] = {
    "arc": ChoiceFormat("arc", files.arc_rows, files.arc_text, "text"),
    "openbookqa": ChoiceFormat("openbookqa", files.openbookqa_rows, lambda d: d["question_stem"], "text"),
    "sciq": ChoiceFormat("sciq", files.sciq_rows, files.arc_text, "text"),
    "mmlu": ChoiceFormat("mmlu", files.mmlu_rows, files.mmlu_text, "letter"),
}
CHOICE_FORMATS = tuple(FORMATS)


def detect(path: Path) -> str | None:
    """The multiple-choice format of a file from its first bytes, or None when it is not one of them."""
    suffix = path.suffix.lower()
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            head = f.read(4096)
    except OSError:
        return None
    if suffix == ".tsv" and head.startswith("ID\tQuestion Stem\tChoices"):
        return "openbookqa"
    if suffix == ".jsonl":
        first = head.split("\n", 1)[0]
        try:
            row = json.loads(first)
        except json.JSONDecodeError:
            return None
        if isinstance(row, dict) and isinstance(row.get("question"), dict) and "answerKey" in row:
            return "arc"
    if suffix == ".json" and '"distractor1"' in head and '"correct_answer"' in head:
        return "sciq"
    if suffix == ".csv" and path.stem.endswith(("_test", "_val", "_dev")):
        first_row = next(csv.reader(io.StringIO(head)), [])
        if len(first_row) == 6 and first_row[5].strip() in ("A", "B", "C", "D"):
            return "mmlu"
    return None


def read_choice_rows(path: Path, fmt: str) -> list[dict[str, Any]]:
    """(instruction, choices, gold, reference, answer_format) per question of one file."""
    spec = FORMATS[fmt]
    out = []
    for row in spec.rows(path):
        choices = [str(c) for c in row["choices"]]
        gold = int(row["gold"])
        reference = LETTERS[gold] if spec.answer == "letter" else choices[gold]
        out.append(
            {
                "instruction": spec.text(row),
                "choices": choices,
                "gold": gold,
                "reference": reference,
                "answer_format": spec.answer,
            }
        )
    return out
