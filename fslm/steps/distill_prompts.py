"""What the teacher is asked for each stage: the stage's own role and template, over the teacher's earlier outputs.

The teacher gets the stage's role as system message and the stage's template (from stack.yaml) rendered with the
instruction, the input and the earlier stages' teacher outputs. Under the reference policy `shown` the reference is
appended to earlier stages' prompts as guidance (`REFERENCE_NOTE`); under `hint-on-retry`, a chain whose answer was
checked wrong is written once more with the gold answer as a hint (`HINT_NOTE`), STaR's rationalisation. The final
stage is never shown either. `prompts_hash` identifies all of it, independent of data.
"""

from __future__ import annotations

import hashlib
import json

from fslm.config import StackConfig, StageConfig
from fslm.data import DatasetRecord
from fslm.prompts import render_user_message, stage_variables

# Appended to earlier stages' teacher prompts when the reference is shown. Part of the prompts hash.
REFERENCE_NOTE = (
    "\n\nFor your guidance only, a reference answer to the instruction (write only what this step asks for; "
    "do not copy the reference):\n{reference}"
)


# Appended to earlier stages' prompts when a chain is written again after a wrong answer (hint-on-retry).
HINT_NOTE = (
    "\n\n(Hint for you alone: the correct answer is {answer}. Write only what this step asks for, reasoning as if "
    "you had worked it out yourself; never mention the hint and never state the final answer outright.)"
)


def teacher_messages(
    stage: StageConfig, record: DatasetRecord, outputs: dict[str, str], note: str | None = None
) -> tuple[str, str]:
    """(system, user) for the teacher: the stage's role and its template over the earlier teacher outputs, with an
    optional note appended (the shown reference, or the retry's hint)."""
    user = render_user_message(stage.template, stage_variables(record.instruction, record.input, outputs, stage.reads))
    return stage.role, user + (note or "")


def reference_note(record: DatasetRecord) -> str | None:
    return REFERENCE_NOTE.format(reference=record.reference) if record.reference else None


def hint_note(record: DatasetRecord) -> str | None:
    return HINT_NOTE.format(answer=gold_text(record)) if record.reference else None


def gold_text(record: DatasetRecord) -> str:
    """The gold answer as a person would say it: `(B) photosynthesis` for lettered options, else the text."""
    if record.choices is not None and record.gold is not None:
        text = record.choices[record.gold]
        return f"({'ABCDEFGH'[record.gold]}) {text}" if record.answer_format == "letter" else text
    return record.reference or ""


def prompts_hash(config: StackConfig) -> str:
    """What the teacher is asked, independent of data: roles, templates, reads, budgets, the reference note."""
    stages = [
        s.model_dump(mode="json", include={"name", "role", "template", "reads", "generation"}) for s in config.stages
    ]
    blob = json.dumps({"stages": stages, "reference_note": REFERENCE_NOTE, "hint_note": HINT_NOTE}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()
