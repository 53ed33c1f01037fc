"""How a training step fits its memory budget at the least compute: micro-batches first, checkpointing last.

Why: gradient checkpointing recomputes the forward pass during the backward one. With a frozen base that is half as
much compute again as the step itself (forward 1, backward about 1, recompute 1; docs/train.md, "Speed on a CPU",
has the measured table). Splitting a batch into micro-batches whose gradients accumulate costs almost nothing on a CPU and
gives the same update (transformers divides the loss by the target tokens of the whole batch), so `auto`:
1. the largest micro-batch (a divisor of --batch-size) whose activations fit without checkpointing;
2. if not even one example fits, as few checkpointed layers as fit (transformers checkpoints every n-th decoder
   layer, `every_n_layers`), every layer at worst, at the largest micro-batch that needs no more of them.
On a GPU the budget is not the process's resident memory: there auto checkpoints every layer of whole batches.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

# What one decoder layer keeps for the backward pass per token, in float32 values per unit of (hidden + intermediate)
# size: the norms' inputs, q/k/v, the attention's output, the MLP's gate, up and product, and with LoRA dropout each
# adapted projection's dropped input and mask. Measured on SmolLM2-135M (width 2,112, 30 layers), the answer stage's
# quickstart records, tcmalloc, peak RSS: without dropout, checkpointing off at 1 / 2 / 4 x 398 tokens grows 1.43 MiB
# a token (5.9 values); with dropout 0.05, off minus on, 2.02 MiB a token at 2 x 398 and 2.05 at 4 x 398 (8.3
# values; docs/train.md, "Memory"); both rounded up.
FLOATS_PER_WIDTH = 6.0
FLOATS_PER_WIDTH_DROPOUT = 8.5
# What a step holds besides the activations, whatever its length: the file-backed pages it touches (the memory-mapped
# weights, the libraries' code), the LoRA's gradients and optimizer state, the loss's logits slices, the allocator's
# working set. Measured as above: the peak extrapolated to 0 tokens (1,211 MiB) minus the anonymous memory the process
# held before training (387 MiB); rounded up.
STEP_OVERHEAD_MIB = 850
GIB = 1024**3


@dataclass(frozen=True)
class StepPlan:
    """What auto decided for one adapter, and why (logged, and recorded with the adapter)."""

    micro_batch: int  # examples per forward/backward; the optimizer still steps once per --batch-size examples
    every_n_layers: int | None  # None: no checkpointing; 1: every layer; n: every n-th layer
    layers: int
    batch_tokens: int  # the longest batch's tokens (padded)
    activation_mib: float  # its estimated activations without checkpointing
    free_mib: float  # the budget minus what the process holds before training and a step's fixed overhead

    @property
    def checkpointed_layers(self) -> int:
        return 0 if self.every_n_layers is None else math.ceil(self.layers / self.every_n_layers)

    def describe(self, batch_size: int) -> str:
        ckpt = "off" if self.every_n_layers is None else f"{self.checkpointed_layers} of {self.layers} layers"
        micro = f"micro-batches of {self.micro_batch}, " if self.micro_batch < batch_size else ""
        return (
            f"{micro}gradient checkpointing {ckpt} (longest batch {self.batch_tokens} tokens: ~"
            f"{self.activation_mib:,.0f} MiB of activations without it; {self.free_mib:,.0f} MiB free in the budget "
            "after a step's other memory)"
        )


def resident_bytes() -> int:
    """This process's anonymous resident memory now: what its own allocations hold (Linux /proc; 0 where it cannot be
    read, which makes auto optimistic). Not the file-backed pages (the memory-mapped weights, the libraries' code):
    a training step touches all of them anyway, so STEP_OVERHEAD_MIB counts them, and after one adapter they are
    already resident; counting them here too made every later adapter of a process checkpoint."""
    try:
        with open(f"/proc/{os.getpid()}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def longest_batch_tokens(lengths: list[int], batch_size: int) -> int:
    """Tokens of the largest padded batch: length grouping puts the longest examples together."""
    longest = sorted(lengths, reverse=True)[:batch_size]
    return max(longest, default=0) * len(longest)


def plan_step(
    model_config: Any, lengths: list[int], batch_size: int, budget_gib: float, dropout: float = 0.0
) -> StepPlan:
    """The micro-batch and checkpointing that fit `budget_gib` (minus what is resident now and a step's fixed
    overhead) at the least compute; `dropout`: the LoRA's, whose masks and dropped inputs are activations too."""
    layers = int(getattr(model_config, "num_hidden_layers", 0) or 0)
    width = int(getattr(model_config, "hidden_size", 0) or 0) + int(getattr(model_config, "intermediate_size", 0) or 0)
    free = budget_gib * GIB - resident_bytes() - STEP_OVERHEAD_MIB * 2**20
    floats = FLOATS_PER_WIDTH_DROPOUT if dropout > 0 else FLOATS_PER_WIDTH

    def per_layer(micro: int) -> float:
        return longest_batch_tokens(lengths, micro) * width * floats * 4

    def plan(micro: int, every: int | None) -> StepPlan:
        mib = per_layer(micro) * layers / 2**20
        return StepPlan(micro, every, layers, longest_batch_tokens(lengths, micro), mib, free / 2**20)

    if not layers:  # an unknown architecture: every layer checkpointed, the safe choice
        return plan(batch_size, 1)

    def fewest(micro: int) -> int | None:  # checkpoint every n-th layer; None: none needed
        if per_layer(micro) * layers <= free:
            return None
        every = 1
        for n in range(2, layers + 1):  # every n-th layer checkpointed keeps layers - ceil(layers / n) of them
            if (layers - math.ceil(layers / n)) * per_layer(micro) > free:
                break
            every = n
        return every

    options = [plan(m, fewest(m)) for m in range(batch_size, 0, -1) if batch_size % m == 0]
    return min(options, key=lambda p: p.checkpointed_layers)  # the largest micro-batch among the cheapest
