"""How examples become batches: right padding to the batch's own longest example, and a length-grouped order that is
the same in every process and after a resume."""

from __future__ import annotations

import torch
from transformers.trainer_pt_utils import LengthGroupedSampler

from fslm.steps.train.examples import IGNORE_INDEX


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
