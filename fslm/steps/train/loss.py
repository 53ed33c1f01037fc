"""The training loss: the causal-LM cross-entropy over target tokens, with logits only where a target is predicted."""

from __future__ import annotations

from typing import Any

import torch

from fslm.steps.train.examples import IGNORE_INDEX

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
