"""Gradient checkpointing sized to the memory budget (fslm/steps/train/memory.py) and the on / off / auto setting."""

from __future__ import annotations

import mmap
import os
import sys
from types import SimpleNamespace

import pytest

from fslm.steps.train import memory
from fslm.steps.train.memory import longest_batch_tokens, plan_step
from fslm.steps.train.options import TrainOptions

CONFIG = SimpleNamespace(num_hidden_layers=30, hidden_size=576, intermediate_size=1536)  # SmolLM2-135M's shape


@pytest.fixture(autouse=True)
def nothing_resident(monkeypatch):
    monkeypatch.setattr(memory, "resident_bytes", lambda: 0)


def per_layer_mib(tokens: int, floats: float = memory.FLOATS_PER_WIDTH) -> float:
    return tokens * (576 + 1536) * floats * 4 / 2**20


def gib(activation_mib: float) -> float:
    """A budget with room for a step's fixed overhead and `activation_mib` of activations."""
    return (memory.STEP_OVERHEAD_MIB + activation_mib) / 1024


def test_longest_batch_is_the_longest_examples_padded_together():
    assert longest_batch_tokens([10, 400, 30, 395, 200], 2) == 800
    assert longest_batch_tokens([10, 20], 4) == 40  # fewer examples than a batch
    assert longest_batch_tokens([], 4) == 0


def test_off_when_the_longest_batch_fits():
    plan = plan_step(CONFIG, [100] * 8, 4, budget_gib=64)
    assert plan.every_n_layers is None and plan.checkpointed_layers == 0
    assert plan.micro_batch == 4 and "off" in plan.describe(4)


def test_micro_batches_before_checkpointing():
    budget = gib(per_layer_mib(1600) * 10)  # a batch of 4 x 400 tokens: room for 10 of 30 layers' activations
    plan = plan_step(CONFIG, [400] * 8, 4, budget_gib=budget)
    assert plan.micro_batch == 1 and plan.every_n_layers is None  # 1 x 400 tokens: all 30 layers fit
    assert "micro-batches of 1" in plan.describe(4)
    budget = gib(per_layer_mib(1600) * 16)  # 2 x 400 fits, 4 x 400 does not
    assert plan_step(CONFIG, [400] * 8, 4, budget_gib=budget).micro_batch == 2


def test_every_layer_when_not_even_one_example_fits():
    budget = gib(per_layer_mib(400) * 10)  # one example of 400 tokens: room for 10 of 30 layers
    plan = plan_step(CONFIG, [400] * 8, 4, budget_gib=budget)
    assert plan.every_n_layers == 1 and plan.checkpointed_layers == 30
    assert plan.micro_batch == 4  # checkpointing every layer anyway: whole batches


def test_as_few_checkpointed_layers_as_the_budget_allows():
    budget = gib(per_layer_mib(400) * 24.5)  # one example: room for 24 of 30 layers
    plan = plan_step(CONFIG, [400] * 8, 1, budget_gib=budget)
    assert plan.every_n_layers is not None
    assert plan.layers - plan.checkpointed_layers <= 24  # fits
    more = plan.every_n_layers + 1  # the next setting checkpoints fewer layers and would not fit
    assert plan.layers - -(-plan.layers // more) > 24


def test_resident_memory_counts_against_the_budget(monkeypatch):
    budget = gib(per_layer_mib(400) * 31)  # the whole batch's activations fit in an empty process
    assert plan_step(CONFIG, [100] * 4, 4, budget_gib=budget).micro_batch == 4
    monkeypatch.setattr(memory, "resident_bytes", lambda: int(per_layer_mib(400) * 29 * 2**20))
    plan = plan_step(CONFIG, [100] * 4, 4, budget_gib=budget)
    assert plan.micro_batch < 4 or plan.checkpointed_layers > 0


def test_lora_dropout_counts_as_activations():
    """Dropout keeps each adapted projection's dropped input and mask: the same budget fits a smaller micro-batch."""
    budget = gib(per_layer_mib(1600) * 30)  # 4 x 400 tokens fit without dropout
    assert plan_step(CONFIG, [400] * 8, 4, budget_gib=budget).micro_batch == 4
    plan = plan_step(CONFIG, [400] * 8, 4, budget_gib=budget, dropout=0.05)
    assert plan.micro_batch == 2 and plan.every_n_layers is None
    assert plan.activation_mib == pytest.approx(per_layer_mib(800, memory.FLOATS_PER_WIDTH_DROPOUT) * 30)


def test_on_off_auto_and_the_old_booleans():
    assert TrainOptions().gradient_checkpointing == "auto"  # measured fastest within the budget (docs/train.md)
    assert TrainOptions(gradient_checkpointing=True).gradient_checkpointing == "on"
    assert TrainOptions(gradient_checkpointing=False).gradient_checkpointing == "off"
    with pytest.raises(ValueError):
        TrainOptions(gradient_checkpointing="sometimes")
    # the setting never changes the adapter, so a resumed run may change it
    assert TrainOptions(gradient_checkpointing="auto").fingerprint() == TrainOptions(memory_budget=8).fingerprint()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc is Linux only")
def test_resident_memory_is_the_processs_own_not_mapped_files(monkeypatch, tmp_path):
    """Touching a memory-mapped file (as the weights are) raises the resident set but not what auto counts: a
    training step touches every weight anyway, so counting them after the first adapter double-counted them."""
    monkeypatch.undo()  # the real resident_bytes, not the autouse fixture's 0
    path = tmp_path / "weights.bin"
    path.write_bytes(os.urandom(64 << 20))
    before_own, before_all = memory.resident_bytes(), _rss()
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        assert sum(mapped[i] for i in range(0, len(mapped), 4096)) >= 0  # touch every page
        grown_all, grown_own = _rss() - before_all, memory.resident_bytes() - before_own
    assert grown_all > 48 << 20 and grown_own < 16 << 20


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
