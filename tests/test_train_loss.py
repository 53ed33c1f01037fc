"""`fslm train`'s memory savers change nothing but memory: the loss computes logits only where a target token is
predicted (the same loss and gradients as the model's own full-logits loss, on every architecture and on padded,
unevenly masked batches), and gradient checkpointing trains the same adapter."""

from __future__ import annotations

import shutil

import pytest
import torch
import transformers.modeling_utils
from conftest import LORA_TARGETS, build_model, build_tokenizer
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from test_train import write_distilled
from transformers import Trainer

from fslm import Stack
from fslm.config import update_config
from fslm.steps.train import TrainOptions, train
from fslm.steps.train.batches import PadCollator
from fslm.steps.train.examples import IGNORE_INDEX, Examples
from fslm.steps.train.loss import target_token_loss
from fslm.steps.train.trainer import make_trainer


def _examples(vocab: int, seed: int = 0) -> list[dict[str, list[int]]]:
    """Rows of different prompt and target lengths (so the batch is padded and the target spans do not line up)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for prompt_len, target_len in ((23, 5), (9, 11), (31, 1), (14, 7)):
        ids = torch.randint(7, vocab, (prompt_len + target_len,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt_len + ids[prompt_len:]})
    return rows


def _lora_model(arch: str) -> tuple[torch.nn.Module, int]:
    tok = build_tokenizer(chat=True)
    base = build_model(arch, tok, seed=1)
    # init_lora_weights=False: random A and B, so every LoRA weight has a non-zero gradient to compare.
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_TARGETS[arch], init_lora_weights=False)
    model = get_peft_model(base, config)
    model.train()
    return model, tok.pad_token_id


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt_neox"])
@pytest.mark.parametrize("num_items", [None, 40])
@pytest.mark.parametrize("slice_rows", [None, 5])
def test_target_logits_loss_equals_the_full_logits_loss(arch, num_items, slice_rows):
    """In one piece, and in slices of 5 target positions recomputed in the backward pass (24 targets: 5 slices)."""
    model, pad_id = _lora_model(arch)
    batch = PadCollator(pad_id)(_examples(model.config.vocab_size))
    n = torch.tensor(num_items) if num_items is not None else None

    full = model(**batch, num_items_in_batch=n) if n is not None else model(**batch)
    full.loss.backward()
    expected = _grads(model)
    assert full.logits.shape[:2] == batch["input_ids"].shape  # the stock loss: logits at every position

    loss, outputs = target_token_loss(model, model.get_output_embeddings(), batch, n, slice_rows=slice_rows)
    loss.backward()
    got = _grads(model)
    targets = int(batch["labels"][:, 1:].ne(IGNORE_INDEX).sum())
    # only the target positions; sliced, the model's own head ran on none (the loss ran it slice by slice)
    assert outputs["logits"].shape == (targets if slice_rows is None else 0, model.config.vocab_size)
    torch.testing.assert_close(loss, full.loss, rtol=1e-5, atol=1e-6)
    assert expected.keys() == got.keys() and len(got) > 0
    for name in expected:
        assert expected[name].abs().sum() > 0, name
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_trainer_loss_equals_the_stock_trainer_loss(arch, tmp_path):
    """Through StackTrainer.compute_loss, with the num_items_in_batch the Trainer counts (and its scaling)."""
    model, pad_id = _lora_model(arch)
    rows = _examples(model.config.vocab_size, seed=3)
    examples = Examples(name="s", train=rows)
    trainer = make_trainer(model, examples, TrainOptions(max_steps=1), tmp_path / "out", [], pad_id)
    batch = PadCollator(pad_id)(rows)
    n = trainer._get_num_items_in_batch([batch], torch.device("cpu"))
    assert n is not None  # the Trainer normalises by the target count: compare in that mode
    ours = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=n)
    ours.backward()
    got = _grads(trainer.model)
    stock = Trainer.compute_loss(trainer, trainer.model, dict(batch), num_items_in_batch=n)
    stock.backward()
    expected = _grads(trainer.model)
    torch.testing.assert_close(ours, stock, rtol=1e-5, atol=1e-6)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_gradient_checkpointing_trains_the_same_adapter(tiny_stack, tmp_path, monkeypatch):
    """Recomputing the activations (with LoRA dropout on: the RNG state is restored) gives the adapter that keeping
    them gives; afterwards the base is back to plain inference (no checkpointing, no input-grad hook)."""
    _, directory = tiny_stack
    update_config(directory, lambda doc: doc["lora"].__setitem__("dropout", 0.1))  # new stacks have none
    data = write_distilled(tmp_path / "d.jsonl", n=12)
    calls = []
    real = transformers.modeling_utils.checkpoint

    def counted(*args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.modeling_utils, "checkpoint", counted)
    weights = {}
    for checkpointing in (False, True):
        shutil.rmtree(directory / "adapters" / "intent", ignore_errors=True)
        stack = Stack.load(directory)
        options = TrainOptions(stages=["intent"], max_steps=3, lr=3e-3, gradient_checkpointing=checkpointing)
        train(directory, data, options, loaded=stack)
        weights[checkpointing] = load_file(str(directory / "adapters" / "intent" / "adapter_model.safetensors"))
        base = stack.backend.base_model
        assert not base.is_activation_checkpointing and not getattr(base, "_require_grads_hooks", None)
        assert bool(calls) == checkpointing and set(calls) <= {False}  # layers were recomputed, non-reentrant
    assert weights[False].keys() == weights[True].keys()
    for k in weights[False]:
        torch.testing.assert_close(weights[True][k], weights[False][k], rtol=1e-4, atol=1e-6, msg=k)
