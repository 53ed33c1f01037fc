"""Reading an answer: which option a free-text answer names, and whether it is the gold one.

Multiple-choice records (fslm.choices) are checked by the option the answer names (its letter where the options are
lettered, else the option text it contains), GSM8K-style references by their final number. Free-text references
cannot be checked (None). Distillation keeps only rationales whose answer checks out (Fine-tune-CoT, arXiv
2212.10071; Magister et al., arXiv 2212.08410), and the evaluation's generative metric reads the systems' answers
with the same rule (fslm/steps/evaluate/tasks/generative.py).
"""

from __future__ import annotations

import re

from fslm.choices import LETTERS
from fslm.data import DatasetRecord, normalise

# Words that announce an answer ("the answer is", "option", ...): shared with distillation's leak check.
ANSWER_WORDS = r"(?:answer|option|choice|correct one|right one)"
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def checkable(record: DatasetRecord) -> bool:
    return (record.choices is not None and record.gold is not None) or gsm8k_answer(record.reference) is not None


def gsm8k_answer(reference: str | None) -> str | None:
    """The number after GSM8K's `####`, normalised (no commas)."""
    if not reference or "####" not in reference:
        return None
    match = _NUMBER.search(reference.rsplit("####", 1)[1])
    return match.group(0).replace(",", "") if match else None


def chosen_option(text: str, record: DatasetRecord) -> int | None:
    """The option an answer names, or None when it names none or several."""
    choices = record.choices or []
    if record.answer_format == "letter":
        letters = LETTERS[: len(choices)]
        explicit = re.search(rf"\b{ANSWER_WORDS}\b\W{{0,12}}(?:is\W{{0,4}})?\(?([{letters}])\)?(?![\w])", text, re.I)
        bare = re.match(rf"^\W*\(?([{letters}])\)?(?:[.):]|$)", text.strip())  # "B", "(B)", "B." (not "A plant")
        for match in (bare, explicit):
            if match:
                return letters.index(match.group(1).upper())
    said = " " + normalise(text) + " "
    hits = [i for i, c in enumerate(choices) if normalise(c) and f" {normalise(c)} " in said]
    if len(hits) > 1:  # "dioxide" inside "carbon dioxide": keep the options no other found option contains
        hits = [i for i in hits if not any(i != j and normalise(choices[i]) in normalise(choices[j]) for j in hits)]
    return hits[0] if len(hits) == 1 else None


def answer_correct(text: str, record: DatasetRecord) -> bool | None:
    """Whether the answer is the gold one; None when the record has no checkable answer."""
    if record.choices is not None and record.gold is not None:
        return chosen_option(text, record) == record.gold
    gold = gsm8k_answer(record.reference)
    if gold is None:
        return None
    numbers = [n.replace(",", "") for n in _NUMBER.findall(text)]
    return bool(numbers) and numbers[-1] == gold
