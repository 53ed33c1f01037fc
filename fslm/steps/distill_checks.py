"""Checks on what the teacher wrote: is its answer right, and does an earlier stage give the reference away?

- `answer_correct`: multiple-choice records (fslm.choices) are checked by the option the teacher's answer names
  (its letter where the options are lettered, else the option text it contains), GSM8K-style references by their
  final number. Free-text references cannot be checked (None): keeping only rationales whose answer is checked
  correct needs a checkable answer (Fine-tune-CoT, arXiv 2212.10071; Magister et al., arXiv 2212.08410).
- `leaks`: an intermediate target that contains the reference answer. For multiple choice: the gold option (text or
  letter) stated *as the answer*, or a mention of the hint itself; for free text: the normalised reference, or any
  8-word stretch of a long one, copied into the target.
- `option_references`: an intermediate target of a multiple-choice record that points at the options, which the
  student never sees: by letter ("option B", "(C)"), by position ("the first choice"), as a set ("none of the
  options"), or by naming two or more of the wrong options' texts (walking through the list).
"""

from __future__ import annotations

import re

from fslm.data import DatasetRecord, normalise

LETTERS = "ABCDEFGH"
_ANSWER_WORDS = r"(?:answer|option|choice|correct one|right one)"
_HINT_WORDS = re.compile(r"\b(?:hint|reference answer|given answer|provided answer|we were told|i was told)\b")
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
        explicit = re.search(rf"\b{_ANSWER_WORDS}\b\W{{0,12}}(?:is\W{{0,4}})?\(?([{letters}])\)?(?![\w])", text, re.I)
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
    """Whether the teacher's answer is the gold one; None when the record has no checkable answer."""
    if record.choices is not None and record.gold is not None:
        return chosen_option(text, record) == record.gold
    gold = gsm8k_answer(record.reference)
    if gold is None:
        return None
    numbers = [n.replace(",", "") for n in _NUMBER.findall(text)]
    return bool(numbers) and numbers[-1] == gold


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
            rf"\b{_ANSWER_WORDS}\b(?: \w+){{0,3}} (?:is|would be|will be|should be) (?:option |choice )?(?:{gold}|{letter})\b",
            rf"\b{_ANSWER_WORDS} (?:{gold}|{letter})\b",
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
