"""The generative metric of the multiple-choice tasks (`fslm_<task>_gen`, `fslm eval --generative`).

The system answers freely (the whole stack, the baseline or the base model: lm-eval's generate_until) and the option
its answer names is read off the text with the same rule the distillation checks teacher answers with
(`fslm.answers.chosen_option`): the letter where the prompt letters the options (MMLU), else the one
option text the answer contains. An answer that names no option, or several, is wrong; `answered` is the share of
answers that named exactly one. Loaded by lm-eval from the task YAMLs (`!function generative.text_answer`).
"""

from __future__ import annotations

from typing import Any

from fslm.answers import chosen_option
from fslm.data import DatasetRecord


def _score(doc: dict[str, Any], results: list[str], answer_format: str) -> dict[str, float]:
    record = DatasetRecord(
        instruction="",
        input=None,
        reference=None,
        file="",
        index=0,
        line=0,
        choices=[str(c) for c in doc["choices"]],
        gold=int(doc["gold"]),
        answer_format=answer_format,
    )
    chosen = chosen_option(results[0] if results else "", record)
    return {"gen": float(chosen == record.gold), "answered": float(chosen is not None)}


def text_answer(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """ARC, OpenBookQA: the options are not in the prompt; the answer names one by its text."""
    return _score(doc, results, "text")


def letter_answer(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """MMLU: the prompt letters the options; the answer names one by its letter (or its text)."""
    return _score(doc, results, "letter")
