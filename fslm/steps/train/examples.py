"""Training examples for `fslm train`: distilled records -> tokenised, prompt-masked examples per stage.

Each example is the stage prompt exactly as `Stack.render_prompt` renders it at inference (earlier stages' outputs replaced
by their distilled targets), in the prompt form being trained (full or compact, recorded with the adapter so inference
renders the same), followed by the stage's target text and EOS. Only the target tokens carry a loss.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fslm.distilled import DistilledRecord, Problem
from fslm.errors import FslmError
from fslm.stackdir import BASELINES, MULTITASK, SINGLE

log = logging.getLogger("fslm")
IGNORE_INDEX = -100  # label of prompt and padding tokens: no loss


@dataclass
class Examples:
    """Tokenised examples of one stage (or of the single baseline)."""

    name: str
    train: list[dict[str, list[int]]] = field(default_factory=list)
    val: list[dict[str, list[int]]] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @property
    def target_tokens(self) -> int:
        return sum(sum(1 for t in e["labels"] if t != IGNORE_INDEX) for e in self.train)


def split_validation(
    records: list[DistilledRecord], fraction: float, seed: int
) -> tuple[list[DistilledRecord], list[DistilledRecord]]:
    """Hold out the same records (by id, seeded) for every stage, so no stage validates on its training data.

    Sampled chains of one record (`group`) stay on the same side: validating on a sibling of a training chain would
    measure memory, not generalisation."""

    def group(r: DistilledRecord) -> str:
        return str(r.extra.get("group") or r.id)

    groups = sorted({group(r) for r in records})
    if fraction <= 0 or len(groups) < 2:
        return list(records), []
    n_val = min(len(groups) - 1, max(1, round(len(groups) * fraction)))
    random.Random(seed).shuffle(groups)
    held = set(groups[:n_val])
    return [r for r in records if group(r) not in held], [r for r in records if group(r) in held]


def _needed(stack: Any, name: str) -> list[str]:
    """The targets an example of `name` needs: its own and those of the stages it reads."""
    if name in BASELINES:
        return [stack.config.final_stage.name]
    return [*stack.config.stage(name).reads, name]


def build_examples(
    stack: Any,
    records: list[DistilledRecord],
    val_records: list[DistilledRecord],
    name: str,
    max_length: int | None = None,
    inputs: dict[str, dict[str, str]] | None = None,
    mix: bool = False,
    form: str = "full",
) -> Examples:
    """Tokenise the examples of one stage or baseline: prompt ids (label -100) + target ids + EOS.

    - a stage: its prompt with the earlier stages' distilled targets (or, with `inputs`, the student's own outputs
      for those stages, record id -> stage -> text; `mix` keeps both versions) -> its own target;
    - `single`: the direct prompt (instruction alone) -> the final stage's target;
    - `multitask`: one adapter on every earlier stage's examples plus the direct ones (Distilling step-by-step,
      arXiv 2305.02301), which answers directly at run time.
    """
    out = Examples(name)
    if name == MULTITASK:
        for stage in stack.config.stages[:-1]:
            part = build_examples(stack, records, val_records, stage.name, max_length, form=form)
            out.train += part.train
            out.val += part.val
            out.problems += part.problems
        direct = build_examples(stack, records, val_records, SINGLE, max_length, form=form)
        out.train += direct.train
        out.val += direct.val
        out.problems += direct.problems
        return out
    backend = stack.backend
    tok = backend.tokenizer
    eos = tok.eos_token_id
    if eos is None:
        raise FslmError(
            f"the tokenizer of {stack.config.base.model!r} has no EOS token; cannot mark where a target ends"
        )
    limit = min(backend.context_length, max_length or backend.context_length)
    target_of = stack.config.final_stage.name if name in BASELINES else name
    for split, recs in (("train", records), ("val", val_records)):
        for r in recs:
            missing = [s for s in _needed(stack, name) if s not in r.targets]
            empty = [s for s in _needed(stack, name) if s in r.targets and not r.targets[s]]
            if missing:
                out.problems.append(Problem(r.line, f"targets has no field {', '.join(map(repr, missing))}"))
                continue
            if empty:
                out.problems.append(Problem(r.line, f"target {', '.join(map(repr, empty))} is empty"))
                continue
            if name in BASELINES:
                prompts = [stack.direct_prompt(r.instruction, r.input, form=form)]
            else:
                versions = [r.targets]
                if inputs is not None:
                    student = {**r.targets, **inputs.get(r.id, {})}
                    versions = [r.targets, student] if mix else [student]
                prompts = [stack.render_prompt(name, r.instruction, r.input, outputs=v, form=form) for v in versions]
            target_ids = tok(r.targets[target_of], add_special_tokens=False)["input_ids"] + [eos]
            for prompt in dict.fromkeys(prompts):  # mix: a student chain equal to the teacher's counts once
                prompt_ids = backend.encode(prompt)
                total = len(prompt_ids) + len(target_ids)
                if total > limit:
                    out.problems.append(
                        Problem(r.line, f"prompt + target is {total} tokens, longer than the limit ({limit})")
                    )
                    continue
                example = {
                    "input_ids": prompt_ids + target_ids,
                    "labels": [IGNORE_INDEX] * len(prompt_ids) + target_ids,
                }
                getattr(out, split).append(example)
    return out


def report_problems(
    data: Path, per_name: dict[str, list[Problem]], parse: list[Problem], strict: bool, quiet: bool = False
) -> int:
    """One line per bad record (naming the stages it was skipped for); fatal under --strict."""
    grouped: dict[tuple[int, str], list[str]] = {}
    for p in parse:
        grouped.setdefault((p.line, p.message), [])
    for name, problems in per_name.items():
        for p in problems:
            grouped.setdefault((p.line, p.message), []).append(name)
    lines = []
    for (line, message), names in sorted(grouped.items()):
        where = f" (skipped for {', '.join(names)})" if names else " (skipped)"
        lines.append(f"{data}:{line}: {message}{where}")
    if not lines:
        return 0
    if strict:
        more = f" (and {len(lines) - 1} more bad record(s))" if len(lines) > 1 else ""
        raise FslmError(f"{lines[0].replace(' (skipped', ' (').replace(' ()', '')}{more}; fix it or drop --strict")
    for text in lines[:20] if not quiet else []:
        log.warning("%s", text)
    if len(lines) > 20 and not quiet:
        log.warning("... and %d more bad record(s)", len(lines) - 20)
    return len(lines)
