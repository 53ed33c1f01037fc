"""Training data for `fslm train`: distilled JSONL -> tokenised, prompt-masked examples per stage.

Each example is the stage prompt exactly as `Stack.run` renders it at inference (earlier stages' outputs replaced
by their distilled targets), followed by the stage's target text and EOS. Only the target tokens carry a loss.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.trainer_pt_utils import LengthGroupedSampler

from fslm.distilled import DistilledRecord, Problem
from fslm.errors import FslmError
from fslm.stackdir import BASELINES, MULTITASK, SINGLE

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
            part = build_examples(stack, records, val_records, stage.name, max_length)
            out.train += part.train
            out.val += part.val
            out.problems += part.problems
        direct = build_examples(stack, records, val_records, SINGLE, max_length)
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
                prompts = [stack.direct_prompt(r.instruction, r.input)]
            else:
                versions = [r.targets]
                if inputs is not None:
                    student = {**r.targets, **inputs.get(r.id, {})}
                    versions = [r.targets, student] if mix else [student]
                prompts = [stack.render_prompt(name, r.instruction, r.input, outputs=v) for v in versions]
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


# Architectures whose logits are exactly their output head's (no soft-capping or scaling after it): their loss may
# run the head slice by slice (target_token_loss). Others take the one-slice path, correct but larger.
PLAIN_HEAD_ARCHS = frozenset({"llama", "gpt_neox", "qwen2", "qwen3", "mistral", "phi3"})
LOSS_SLICE = 256  # target positions per slice: 50 MB of float32 logits for a 49k vocabulary


def target_token_loss(
    model: Any,
    head: torch.nn.Module,
    inputs: dict[str, Any],
    num_items_in_batch: Any = None,
    slice_rows: int | None = LOSS_SLICE,
) -> tuple[torch.Tensor, Any]:
    """The causal-LM cross-entropy over the target tokens, with logits computed only where a target is predicted.

    Why: the model's own loss computes float32 logits at every position of every row (batch x length x a 49k
    vocabulary, then log-softmax and its gradient, each as large), although only the few positions followed by a
    target token (labels != -100, shifted by one) carry a loss; prompts are hundreds of tokens, targets tens. A
    forward pre-hook on the output head (`head`, the model's `get_output_embeddings()`) hands it only the hidden
    states of those positions, so the head's matmul, the logits and their gradient shrink to (target tokens x
    vocabulary). Whatever the model does to the logits after its head (a float cast, soft-capping) still applies.

    On architectures whose logits are the head's alone (PLAIN_HEAD_ARCHS) the head and the cross-entropy go further:
    they run over `slice_rows` target positions at a time, each slice recomputed in the backward pass instead of
    kept, so the logits, their log-softmax and both gradients never exist for all targets at once (4 x 107 MB for
    the embedded model's 570 answer targets of a batch of 4, against 4 x 50 MB). The model's own forward then runs
    its head on no rows, and the returned outputs' logits are empty (0 x vocabulary). Costs one more head matmul.

    The value equals transformers' `ForCausalLMLoss`: the sum over target tokens divided by `num_items_in_batch`
    when the Trainer passes it (the target count of the whole accumulated batch), else the mean over this batch's
    target tokens. Returns (loss, the model's outputs, whose logits are (target tokens x vocabulary) or empty).
    """
    from torch.utils.checkpoint import checkpoint

    labels = inputs["labels"]
    targets = labels[:, 1:]
    keep = targets.ne(IGNORE_INDEX)  # position t predicts token t + 1
    arch = getattr(getattr(model, "config", None), "model_type", None)
    sliced = slice_rows is not None and arch in PLAIN_HEAD_ARCHS
    selected: list[torch.Tensor] = []

    def only_target_positions(module: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
        hidden = args[0]
        if hidden.dim() != 3 or hidden.shape[:2] != labels.shape:
            raise RuntimeError(f"the output head got hidden states of shape {tuple(hidden.shape)}, not batch x length")
        rows = hidden[:, :-1][keep]
        selected.append(rows)
        return (rows[:0] if sliced else rows, *args[1:])

    handle = head.register_forward_pre_hook(only_target_positions)
    try:
        outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})
    finally:
        handle.remove()
    chosen = targets[keep].to(outputs["logits"].device)
    if sliced:
        hidden = selected[0]

        def slice_loss(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.cross_entropy(head(h).float(), y, reduction="sum")

        step = slice_rows or 1
        parts = [
            checkpoint(slice_loss, hidden[i : i + step], chosen[i : i + step], use_reentrant=False)
            for i in range(0, max(len(chosen), 1), step)
        ]
        total = torch.stack(parts).sum()
        if num_items_in_batch is None:
            return total / len(chosen), outputs  # the mean (NaN without targets, as cross_entropy's own mean)
    else:
        logits = outputs["logits"].float()  # as ForCausalLMLoss: the loss in float32 even under bf16 autocast
        if num_items_in_batch is None:
            return torch.nn.functional.cross_entropy(logits, chosen), outputs
        total = torch.nn.functional.cross_entropy(logits, chosen, reduction="sum")
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch, outputs
