"""What the teacher is asked for each stage: the stage's own role and template, over the teacher's earlier outputs.

The teacher gets the stage's role as system message and the stage's template (from stack.yaml) rendered with the
instruction, the input and the earlier stages' teacher outputs. Under the reference policy `shown` the reference is
appended to earlier stages' prompts as guidance (`REFERENCE_NOTE`); under `hint-on-retry`, a chain whose answer was
checked wrong is written once more with the gold answer as a hint (`HINT_NOTE`), STaR's rationalisation. The final
stage is never shown either. `prompts_hash` identifies all of it, independent of data.

Two teacher modes: `stages` asks once per stage, as above; `joint` asks once per record for every stage in order, as
sections headed `### <Stage>` (`joint_messages`; each section described by the stage's `brief`, else its role), and
`split_sections` cuts the response back into per-stage targets (or says why it cannot). The student never sees a
multiple-choice question's options; the teacher may: `--options answer` shows them only in the request where it names
its final answer (the final stage's prompt, reading the earlier stages it wrote blind: `OPTIONS_NOTE`), `shown` in
every request (`JOINT_OPTIONS_NOTE` in joint mode). Earlier-stage targets must not point at them
(`fslm.steps.distill.checks.option_references`). With `--word-limits` every request also states the stage's length in
words (`word_limit`), so fewer targets exceed the budget the overlong filter holds them to.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

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


# Appended to the teacher's earlier-stage prompts (never the student's) under `--options shown`.
OPTIONS_NOTE = (
    "\n\nAnswer options (for you alone: whoever reads your notes never sees these options, so the notes must not "
    "mention, list, compare or number them; reason from the question itself):\n{options}"
)
# Appended to the prompt where the teacher names its final answer (`--options answer|shown`).
ANSWER_OPTIONS_NOTE = "\n\nAnswer options:\n{options}\n\nAnswer with the correct option, copied exactly."

# A stage's length in words (`--word-limits`), from its token budget: English runs ~1.35 student tokens a word, and a
# teacher overshoots a stated limit, so the limit is set at 0.6 words a token (64 tokens -> 38 words).
WORDS_PER_TOKEN = 0.6
WORD_LIMIT = " At most {words} words."  # joint mode: appended to each section's brief
WORD_LIMIT_NOTE = "\n\n(Write at most {words} words.)"  # stage mode: appended to each request


def word_limit(stage: StageConfig) -> int:
    """The words a stage's target may hold so that the overlong filter keeps it."""
    return max(4, int(stage.generation.max_new_tokens * WORDS_PER_TOKEN))


# The joint teacher's system message: one response, every stage as a section, in order.
JOINT_SYSTEM = (
    "You write the notes that lead to the answer of a request, in {n} sections, in this order. Start each section "
    "with its header on a line of its own, exactly as shown, then write what the line under it describes:\n\n"
    "{sections}\n\n"
    "Write every section exactly once, in plain sentences. Write nothing before the first header and nothing after "
    "the {last} section."
)
# What the final section holds for a multiple-choice question whose options the teacher sees.
JOINT_CHOICE_ANSWER = "The correct option, copied exactly."
# The end of the joint user message under `--options shown`: the options, then what may not be done with them.
JOINT_OPTIONS_NOTE = (
    "\n\nAnswer options:\n{options}\n\n"
    "Your notes are for a reader who will never see these options. In every section before {final}, reason from "
    "the question alone: never mention, list, compare or number the options. Under {final}, copy the correct option "
    "exactly."
)


def teacher_messages(
    stage: StageConfig,
    record: DatasetRecord,
    outputs: dict[str, str],
    note: str | None = None,
    word_limits: bool = False,
) -> tuple[str, str]:
    """(system, user) for the teacher: the stage's role and its template over the earlier teacher outputs, with an
    optional note appended (the shown reference, the retry's hint, the options), then the stage's word limit."""
    user = render_user_message(stage.template, stage_variables(record.instruction, record.input, outputs, stage.reads))
    limit = WORD_LIMIT_NOTE.format(words=word_limit(stage)) if word_limits else ""
    return stage.role, user + (note or "") + limit


def header(stage: StageConfig) -> str:
    """A stage's section header in a joint response: `### Intent`."""
    return "### " + stage.name.replace("_", " ").capitalize()


def joint_messages(
    config: StackConfig,
    record: DatasetRecord,
    note: str | None = None,
    options_shown: bool = False,
    word_limits: bool = False,
) -> tuple[str, str]:
    """(system, user) asking for every stage of the stack in one response, one `### Stage` section each (each
    section's brief followed by its word limit, with `word_limits`)."""
    briefs = []
    for stage in config.stages:
        brief = (stage.brief or stage.role).strip()
        if stage is config.final_stage and options_shown and record.choices:
            brief = JOINT_CHOICE_ANSWER
        elif word_limits:
            brief += WORD_LIMIT.format(words=word_limit(stage))
        briefs.append(f"{header(stage)}\n{brief}")
    system = JOINT_SYSTEM.format(n=len(config.stages), sections="\n\n".join(briefs), last=config.final_stage.name)
    user = "Request: " + teacher_view(record.instruction)
    if record.input and record.input.strip():
        user += "\nInput: " + record.input.strip()
    user += note or ""
    if options_shown and record.choices:
        options = "\n".join(f"- {c}" for c in record.choices)
        user += JOINT_OPTIONS_NOTE.format(options=options, final=header(config.final_stage))
    return system, user


def teacher_view(instruction: str) -> str:
    """The instruction as the joint teacher reads it: without the trailing `Answer:` cue of a cloze-style question
    (lm-eval's ARC prompt), which asks a chat model to answer at once instead of writing its notes."""
    text = instruction.strip()
    if text.endswith("\nAnswer:"):
        text = text.removesuffix("Answer:").strip()
    return text


def options_note(record: DatasetRecord, final: bool = False) -> str | None:
    """The options as a note for the teacher: for an earlier stage (with what not to do with them) or for the final
    answer; None for a record without options."""
    if not record.choices:
        return None
    note = ANSWER_OPTIONS_NOTE if final else OPTIONS_NOTE
    return note.format(options="\n".join(f"- {c}" for c in record.choices))


def join_notes(*notes: str | None) -> str | None:
    joined = "".join(n for n in notes if n)
    return joined or None


_HEADER = re.compile(r"^[ \t]*\**[ \t]*#{1,6}[ \t]*\**[ \t]*([A-Za-z][\w ]*?)[ \t]*\**[ \t]*:?[ \t]*\**[ \t]*$", re.M)


@dataclass
class Sections:
    """A joint response cut into stage targets, or why it cannot be (`problem`, and the stage it concerns)."""

    targets: dict[str, str]
    problem: str | None = None
    stage: str | None = None


def split_sections(text: str, config: StackConfig) -> Sections:
    """Cut a joint response at its `### Stage` headers. Refused: text before the first header, a header that names no
    stage, a stage missing, repeated or out of order, an empty section."""
    names = {s.name.replace("_", " ").casefold(): s.name for s in config.stages}
    marks = list(_HEADER.finditer(text))
    if not marks:
        return Sections({}, "no section headers", config.stages[0].name)
    if text[: marks[0].start()].strip():
        return Sections({}, "text before the first section", config.stages[0].name)
    targets: dict[str, str] = {}
    for i, m in enumerate(marks):
        name = names.get(" ".join(m.group(1).split()).casefold())
        if name is None:
            return Sections(targets, f"unknown section {m.group(1).strip()!r}", None)
        if name in targets:
            return Sections(targets, f"section {name!r} repeated", name)
        end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
        targets[name] = text[m.end() : end].strip()
    order = [s.name for s in config.stages]
    for name in order:
        if name not in targets:
            return Sections(targets, f"section {name!r} missing", name)
    if list(targets) != order:
        return Sections(targets, "sections out of order", None)
    for name in order:
        if not targets[name]:
            return Sections(targets, f"section {name!r} empty", name)
    return Sections(targets)


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


def prompts_hash(config: StackConfig, mode: str = "stages", options: str = "hidden", word_limits: bool = False) -> str:
    """What the teacher is asked, independent of data: roles, templates, reads, budgets, the notes. The defaults
    (per-stage mode, options hidden, no word limits) hash exactly as before these existed, so old manifests still
    match."""
    stages = []
    for stage in config.stages:
        dumped = stage.model_dump(mode="json", include={"name", "role", "template", "reads", "generation", "brief"})
        if dumped.get("brief") is None:
            dumped.pop("brief", None)
        stages.append(dumped)
    notes = {"reference_note": REFERENCE_NOTE, "hint_note": HINT_NOTE}
    if mode == "joint":
        notes.update(joint_system=JOINT_SYSTEM, joint_choice_answer=JOINT_CHOICE_ANSWER)
    if options != "hidden":
        notes["answer_options_note"] = ANSWER_OPTIONS_NOTE
    if options == "shown":
        notes["options_note"] = JOINT_OPTIONS_NOTE if mode == "joint" else OPTIONS_NOTE
    if word_limits:
        notes.update(words_per_token=WORDS_PER_TOKEN, word_limit=WORD_LIMIT if mode == "joint" else WORD_LIMIT_NOTE)
    blob = json.dumps({"stages": stages, **notes}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()
