"""Training data for `fslm train`: distilled JSONL -> tokenised, prompt-masked examples per stage.

Each example is the stage prompt exactly as `Stack.run` renders it at inference (earlier stages' outputs replaced
by their distilled targets), followed by the stage's target text and EOS. Only the target tokens carry a loss.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers.trainer_pt_utils import LengthGroupedSampler

from fslm.errors import FslmError
from fslm.prompts import render_user_message, stage_variables

IGNORE_INDEX = -100  # label of prompt and padding tokens: no loss
SINGLE = "single"  # the single-adapter baseline (adapters/single/), not a stage
# The single baseline's user message: the instruction (and input) alone, no intermediate stages.
SINGLE_TEMPLATE = "Instruction: {{ instruction }}\n{% if input %}Input: {{ input }}\n{% endif %}"


@dataclass
class Record:
    line: int  # 1-based line in the JSONL file
    id: str
    instruction: str
    input: str | None
    targets: dict[str, str]


@dataclass
class Problem:
    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


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


def read_records(path: str | Path) -> tuple[list[Record], list[Problem]]:
    """Parse a distilled JSONL file; malformed lines become problems with their line number, not exceptions."""
    path = Path(path)
    if not path.is_file():
        raise FslmError(f"{path}: no such data file (write one with `fslm distill`)")
    records: list[Record] = []
    problems: list[Problem] = []
    seen: dict[str, int] = {}
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            lines = list(f)
        except UnicodeDecodeError as e:
            raise FslmError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    for n, text in enumerate(lines, 1):
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            problems.append(Problem(n, f"not valid JSON ({e.msg} at column {e.colno})"))
            continue
        if not isinstance(obj, dict):
            problems.append(Problem(n, f"expected a JSON object, got {type(obj).__name__}"))
            continue
        instruction = obj.get("instruction")
        if not isinstance(instruction, str) or not instruction.strip():
            problems.append(Problem(n, "field 'instruction' is missing or empty"))
            continue
        input = obj.get("input")
        if input is not None and not isinstance(input, str):
            problems.append(Problem(n, "field 'input' must be a string or null"))
            continue
        targets = obj.get("targets")
        if not isinstance(targets, dict):
            problems.append(Problem(n, "field 'targets' is missing or not an object of stage name -> text"))
            continue
        rid = str(obj.get("id") or f"line{n}")
        if rid in seen:
            problems.append(Problem(n, f"duplicate id {rid!r} (first on line {seen[rid]})"))
            continue
        seen[rid] = n
        clean = {k: v.strip() for k, v in targets.items() if isinstance(v, str)}
        records.append(Record(n, rid, instruction.strip(), (input or "").strip() or None, clean))
    return records, problems


def split_validation(records: list[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Hold out the same records (by id, seeded) for every stage, so no stage validates on its training data."""
    if fraction <= 0 or len(records) < 2:
        return list(records), []
    n_val = min(len(records) - 1, max(1, round(len(records) * fraction)))
    ids = sorted(r.id for r in records)
    random.Random(seed).shuffle(ids)
    held = set(ids[:n_val])
    return [r for r in records if r.id not in held], [r for r in records if r.id in held]


def single_prompt(stack: Any, instruction: str, input: str | None = None) -> str:
    """The prompt of the single-adapter baseline (`fslm train --single`, eval's "single" system).

    The final stage's role as the system message and a plain user message holding only the instruction and
    input, wrapped like every stage prompt by `stack.backend.format_prompt`. It does not reuse the final stage's
    template with empty earlier outputs: that template asks for notes the baseline never has.
    """
    user = render_user_message(SINGLE_TEMPLATE, stage_variables(instruction, input, {}, []))
    return stack.backend.format_prompt(stack.config.final_stage.role, user)


def _needed(stack: Any, name: str) -> list[str]:
    """The targets an example of `name` needs: its own and those of the stages it reads."""
    if name == SINGLE:
        return [stack.config.final_stage.name]
    return [*stack.config.stage(name).reads, name]


def build_examples(
    stack: Any, records: list[Record], val_records: list[Record], name: str, max_length: int | None = None
) -> Examples:
    """Tokenise the examples of one stage (or SINGLE): prompt ids (label -100) + target ids + EOS."""
    backend = stack.backend
    tok = backend.tokenizer
    eos = tok.eos_token_id
    if eos is None:
        raise FslmError(
            f"the tokenizer of {stack.config.base.model!r} has no EOS token; cannot mark where a target ends"
        )
    limit = min(backend.context_length, max_length or backend.context_length)
    out = Examples(name)
    add_special = not backend.chat
    target_of = stack.config.final_stage.name if name == SINGLE else name
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
            if name == SINGLE:
                prompt = single_prompt(stack, r.instruction, r.input)
            else:
                prompt = stack.render_prompt(name, r.instruction, r.input, outputs=r.targets)
            prompt_ids = tok(prompt, add_special_tokens=add_special)["input_ids"]
            target_ids = tok(r.targets[target_of], add_special_tokens=False)["input_ids"] + [eos]
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


class PadCollator:
    """Right-pads a batch to its own longest example (dynamic padding), or to `fixed_length` (the naive way)."""

    def __init__(self, pad_id: int, fixed_length: int | None = None, multiple_of: int = 1) -> None:
        self.pad_id = pad_id
        self.fixed_length = fixed_length
        self.multiple_of = multiple_of

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        width = self.fixed_length or -(-longest // self.multiple_of) * self.multiple_of
        ids = torch.full((len(features), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            ids[i, :n] = torch.tensor(f["input_ids"])
            labels[i, :n] = torch.tensor(f["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


class EpochLengthGroupedSampler(LengthGroupedSampler):
    """transformers' length-grouped sampler, reseeded from (seed, epoch) so every process and a resumed run
    draw exactly the same order; the stock one draws from the global RNG, which dropout also consumes."""

    def __init__(self, batch_size: int, lengths: list[int], seed: int) -> None:
        super().__init__(batch_size, lengths=lengths)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):  # type: ignore[no-untyped-def]
        self.generator = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        return super().__iter__()
