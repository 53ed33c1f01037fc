"""Quality filters for distilled targets: a target the student could never learn from is dropped, with the reason.

- empty: the teacher wrote nothing;
- overlong: the teacher stopped at its token limit mid-thought, or the target is longer (student tokens) than the
  stage may generate, so the stage could never produce it;
- repetition: a degenerate loop ("the the the");
- leak: an earlier stage's target, written while the teacher saw the reference (or a hint), gives the reference
  away (fslm.steps.distill.checks.leaks);
- options: an earlier stage's target of a multiple-choice record points at the options, which the student never
  sees (fslm.steps.distill.checks.option_references).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

from fslm.config import StageConfig

FILTERS = ("empty", "overlong", "repetition", "leak", "options")


def is_degenerate(text: str, n: int = 4, min_tokens: int = 16, min_distinct: float = 0.5) -> bool:
    """Degenerate repetition: under half of the text's word 4-grams are distinct (a loop like "the the the")."""
    tokens = re.findall(r"\w+|[^\w\s]", text.casefold())
    if len(tokens) < min_tokens:
        return False
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) < min_distinct


_SENTENCE_END = re.compile(r"(?<!\d)[.!?](?:[\"')\]]*)(?=\s|$)|\n")


def trim_to_sentence(text: str, keep: float = 1 / 3) -> str | None:
    """`text` up to its last complete sentence or line; None when that would keep less than `keep` of it.

    For teacher outputs cut at the token limit: a plan cut inside step 4 becomes a plan of three steps.
    A period after a digit ("1.") is a list marker, not a sentence end.
    """
    text = text.strip()
    ends = [m.end() for m in _SENTENCE_END.finditer(text)]
    if not ends:
        return None
    trimmed = text[: ends[-1]].strip()
    return trimmed if trimmed and len(trimmed) >= keep * len(text) else None


def fit_to_budget(text: str, budget: float, count_tokens: Callable[[str], int], keep: float = 1 / 3) -> str | None:
    """`text` up to its last complete sentence or line that holds at most `budget` tokens; None when none does or
    that would keep less than `keep` of it.

    For a finished target longer than the stage may generate: a plan of five steps whose budget holds three becomes
    those three, which is what the stage could have written.
    """
    text = text.strip()
    for end in reversed([m.end() for m in _SENTENCE_END.finditer(text)]):
        fitted = text[:end].strip()
        if len(fitted) < keep * len(text):
            return None
        if fitted and count_tokens(fitted) <= budget:
            return fitted
    return None


def check_target(
    text: str,
    stage: StageConfig,
    filters: Iterable[str],
    count_tokens: Callable[[str], int],
    factor: float,
    cut: bool = False,
) -> str | None:
    """The first filter a stage target fails, or None.

    overlong: the teacher stopped at its token limit (`cut`: the text ends mid-thought), or the target has more
    tokens (student tokenizer) than `factor` x the stage's max_new_tokens, so the stage could never produce it.
    """
    filters = set(filters)
    if "empty" in filters and not text.strip():
        return "empty"
    if "overlong" in filters and factor > 0 and (cut or count_tokens(text) > factor * stage.generation.max_new_tokens):
        return "overlong"
    if "repetition" in filters and is_degenerate(text):
        return "repetition"
    return None
