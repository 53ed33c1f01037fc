"""Checks on the earlier stages' targets the teacher wrote: does one give the reference away, or point at the options?

(Whether the teacher's own answer is right is `fslm.answers.answer_correct`.)

- `leaks`: an intermediate target that contains the reference answer. For multiple choice: the gold option (text or
  letter) stated *as the answer*, or a mention of the hint itself; for free text: the normalised reference, or any
  8-word stretch of a long one, copied into the target.
- `option_references`: an intermediate target of a multiple-choice record that points at the options, which the
  student never sees: by letter ("option B", "(C)"), by position ("the first choice"), as a set ("none of the
  options"), or by naming two or more of the wrong options' texts (walking through the list).
"""

from __future__ import annotations

import re

from fslm.answers import ANSWER_WORDS
from fslm.choices import LETTERS
from fslm.data import DatasetRecord, normalise

_HINT_WORDS = re.compile(r"\b(?:hint|reference answer|given answer|provided answer|we were told|i was told)\b")


def leaks(text: str, record: DatasetRecord) -> bool:
    """An intermediate target that gives the reference answer away (see the module docstring)."""
    said = normalise(text)
    if not said:
        return False
    if _HINT_WORDS.search(said):
        return True
    if record.choices is not None and record.gold is not None:
        gold = re.escape(normalise(record.choices[record.gold]))
        letter = LETTERS[record.gold].lower()
        stated = [
            rf"\b{ANSWER_WORDS}\b(?: \w+){{0,3}} (?:is|would be|will be|should be) (?:option |choice )?(?:{gold}|{letter})\b",
            rf"\b{ANSWER_WORDS} (?:{gold}|{letter})\b",
            rf"\b(?:{gold}|option {letter}|choice {letter}) (?:is|would be) (?:the )?(?:correct|right|best) ",
        ]
        return any(re.search(p, said) for p in stated)
    reference = normalise(record.reference or "")
    words = reference.split()
    if len(words) < 3:
        return False  # "yes", "Paris": containment says nothing about copying
    if len(words) < 8:
        return f" {reference} " in f" {said} "
    target = f" {said} "
    return any(f" {' '.join(words[i : i + 8])} " in target for i in range(len(words) - 7))


_ORDINALS = r"(?:first|second|third|fourth|fifth|last|other|remaining)"
_OPTION_WORDS = r"(?:options?|choices?|alternatives?|answers?)"
_POINTERS = [
    re.compile(r"\b(?i:option|choice|answer)\s*\(?[A-H]\)?(?![\w'])"),  # "option B", "choice (C)"
    re.compile(r"(?<![\w(])\(([A-H])\)(?!\w)"),  # "(B)"
    re.compile(r"^\s*[-*]?\s*[A-H][.)]\s", re.M),  # a line "B) ..." / "C. ..."
    re.compile(rf"\b(?:the\s+)?{_ORDINALS}\s+{_OPTION_WORDS}\b", re.I),  # "the first choice"
    re.compile(
        r"\b(?:the|these|those|all|none|each|any|one|both|neither|either|given|listed|provided|following|other|answer)"
        r"\s+(?:of\s+the\s+)?(?:given\s+|listed\s+|provided\s+|following\s+|other\s+|answer\s+)?(?:options|choices)\b",
        re.I,
    ),  # "the options", "none of the choices"
]


def option_references(text: str, record: DatasetRecord) -> str | None:
    """What in an intermediate target points at the options (the matched words), or None; see the module docstring."""
    if not record.choices:
        return None
    for pattern in _POINTERS:
        match = pattern.search(text)
        if match:
            return match.group(0).strip()
    said = " " + normalise(text) + " "
    named = [
        c
        for i, c in enumerate(record.choices)
        if i != record.gold and len(normalise(c)) >= 3 and f" {normalise(c)} " in said
    ]
    return "names " + " / ".join(named) if len(named) >= 2 else None
