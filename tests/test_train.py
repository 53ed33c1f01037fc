"""`fslm train`: examples and masking, bad data, loss going down, fresh LoRAs, trained stacks and the single baseline."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from fslm import Stack
from fslm.cli import app
from fslm.config import load_config
from fslm.distilled import read_distilled as read_records
from fslm.files import sha256_file
from fslm.stackdir import SINGLE
from fslm.steps.init import InitOptions, init
from fslm.steps.train import TrainOptions, train
from fslm.steps.train.examples import IGNORE_INDEX, build_examples, split_validation

runner = CliRunner()
STAGES = ["intent", "plan", "reasoning", "answer"]
WORDS = "eat well sleep enough move every day paris capital france sky blue light plan read think write".split()


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def distilled_record(i: int, rng: random.Random) -> dict:
    """One record in the distilled format (docs/formats.md) with short targets for every paper4 stage."""
    instruction = f"Question {i}: " + " ".join(rng.choices(WORDS, k=rng.randint(3, 10)))
    return {
        "id": f"{i:016x}",
        "instruction": instruction,
        "input": "some text" if i % 5 == 0 else None,
        "reference": None,
        "targets": {
            "intent": "The user wants " + " ".join(rng.choices(WORDS, k=3)),
            "plan": "1. read 2. think 3. write",
            "reasoning": "Notes: " + " ".join(rng.choices(WORDS, k=rng.randint(2, 12))),
            "answer": "The answer is " + " ".join(rng.choices(WORDS, k=rng.randint(2, 6))),
        },
        "source": {"file": "test", "index": i},
    }


def write_distilled(path: Path, n: int = 40, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps(distilled_record(i, rng)) + "\n")
    return path


@pytest.fixture
def llama_stack(tmp_path, tiny_llama) -> Path:
    directory = tmp_path / "stack"
    init(directory, InitOptions(base=str(tiny_llama)))
    return directory


def adapter_weights(directory: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "adapters" / name / "adapter_model.safetensors"))


def test_examples_are_inference_prompts_with_masked_labels(tiny_stack, tmp_path):
    """Each example = the prompt Stack.run renders (earlier outputs = targets) + target + EOS; loss on target only."""
    _, directory = tiny_stack
    data = write_distilled(tmp_path / "d.jsonl", n=6)
    stack = Stack.load(directory)
    records, problems = read_records(data)
    assert not problems and len(records) == 6
    tok = stack.backend.tokenizer
    for stage in STAGES:
        ex = build_examples(stack, records, [], stage)
        assert len(ex.train) == 6 and not ex.problems
        for r, e in zip(records, ex.train, strict=True):
            prompt = stack.render_prompt(stage, r.instruction, r.input, outputs=r.targets)
            n_prompt = stack.backend.count_tokens(prompt)  # how inference tokenises the prompt
            assert e["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
            assert IGNORE_INDEX not in e["labels"][n_prompt:]
            assert e["labels"][n_prompt:] == e["input_ids"][n_prompt:]
            assert e["input_ids"][-1] == tok.eos_token_id
            assert tok.decode(e["input_ids"][n_prompt:-1]) == r.targets[stage]
            assert tok.decode(e["input_ids"][:n_prompt]) == prompt
        # Later stages see the earlier stages' targets in their prompt, as they would see their outputs at run time.
        if stage == "answer":
            text = tok.decode(ex.train[0]["input_ids"])
            assert all(records[0].targets[s] in text for s in STAGES[:3])


def test_validation_split_is_the_same_records_for_every_stage():
    rng = random.Random(1)
    from fslm.distilled import DistilledRecord as Record

    records = [Record(f"id{i}", f"q{i}", None, distilled_record(i, rng)["targets"], line=i + 1) for i in range(50)]
    train, val = split_validation(records, 0.1, seed=3)
    assert len(val) == 5 and len(train) == 45 and not {r.id for r in val} & {r.id for r in train}
    again = split_validation(list(reversed(records)), 0.1, seed=3)[1]
    assert {r.id for r in again} == {r.id for r in val}, "the split depends on ids and seed, not file order"
    assert {r.id for r in split_validation(records, 0.1, seed=4)[1]} != {r.id for r in val}


def test_bad_data_is_reported_with_line_numbers(llama_stack, tmp_path):
    rng = random.Random(0)
    good = [distilled_record(i, rng) for i in range(8)]
    missing = distilled_record(100, rng)
    del missing["targets"]["plan"]
    empty = distilled_record(101, rng)
    empty["targets"]["answer"] = "   "
    too_long = distilled_record(102, rng)
    too_long["targets"]["intent"] = " ".join(["light"] * 600)  # the tiny model's context is 512 tokens
    lines = [json.dumps(r) for r in good[:2]]
    lines += ["{not json", json.dumps(missing), json.dumps(empty), json.dumps(too_long)]
    lines += [json.dumps(r) for r in good[2:]]
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join(lines) + "\n")

    r = invoke("train", llama_stack, "--data", data, "--max-steps", "1", "--stages", "intent,plan,answer")
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())  # rich wraps long warning lines
    assert f"{data}:3: broken JSON line" in text
    assert "bad.jsonl:4: targets has no field 'plan' (skipped for plan, answer)" in text
    assert "bad.jsonl:5: target 'answer' is empty (skipped for answer)" in text
    assert "bad.jsonl:6: prompt + target is" in text and "longer than the limit (512)" in text
    config = load_config(llama_stack)
    # intent: the 8 good records + lines 4 and 5; answer (its prompt holds the long intent too): the 8 good ones.
    intent, answer = config.stage("intent").training, config.stage("answer").training
    assert intent.examples + intent.model_extra["val_examples"] == 8 + 2
    assert answer.examples + answer.model_extra["val_examples"] == 8
    assert config.stage("reasoning").training is None and not (llama_stack / "adapters" / "reasoning").exists()

    r = invoke("train", llama_stack, "--data", data, "--max-steps", "1", "--strict")
    assert r.exit_code == 2
    assert "error:" in r.output and "bad.jsonl:3: broken JSON line" in " ".join(r.output.split())
    assert "Traceback" not in r.output

    r = invoke("train", llama_stack, "--data", data, "--stages", "intent,nope")
    assert r.exit_code == 2 and "no stage named 'nope'" in r.output


def test_loss_falls_and_the_record_is_written(llama_stack, tmp_path):
    data = write_distilled(tmp_path / "d.jsonl", n=40)
    options = TrainOptions(stages=["answer"], max_steps=40, lr=3e-3, batch_size=4, warmup=2)
    results = train(llama_stack, data, options).adapters
    history = results["answer"].log_history
    losses = [h["loss"] for h in history if "loss" in h]
    assert len(losses) == 40
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.6 * first, f"loss did not fall: first steps {first:.3f}, last steps {last:.3f}"
    val = [h["eval_loss"] for h in history if "eval_loss" in h]
    assert len(val) >= 4 and val[-1] < val[0], "validation loss is measured each epoch and falls"

    t = load_config(llama_stack).stage("answer").training
    assert t is not None and t.steps == 40 and t.examples == 36 and t.model_extra["val_examples"] == 4
    assert t.data_sha256 == sha256_file(data) and t.data_file == str(data.resolve())
    assert t.train_loss == pytest.approx(last) and t.val_loss == pytest.approx(val[-1])
    assert {"torch", "transformers", "peft"} <= set(t.versions) and t.seconds > 0
    assert t.model_extra["lora"]["target_modules"] == load_config(llama_stack).lora.target_modules
    card = (llama_stack / "README.md").read_text()
    assert "## Training" in card and "| answer | 36 |" in card
    cfg = json.loads((llama_stack / "adapters" / "answer" / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == sorted(load_config(llama_stack).lora.target_modules)
    assert cfg["r"] == 16 and cfg["lora_alpha"] == 32
    assert not (llama_stack / ".fslm-train").exists(), "checkpoints are removed after a finished run"


def test_retraining_starts_from_a_fresh_lora(llama_stack, tmp_path):
    """Stack.load attaches the old adapter; retraining must start from the base, so the same run gives the same
    weights again (training on top of the old adapter would not)."""
    data = write_distilled(tmp_path / "d.jsonl", n=16)
    options = TrainOptions(stages=["intent"], max_steps=6, lr=3e-3)
    train(llama_stack, data, options)
    first = adapter_weights(llama_stack, "intent")
    stack = Stack.load(llama_stack)
    assert stack.stage_adapter("intent") == "intent"
    train(llama_stack, data, options, loaded=stack)
    second = adapter_weights(llama_stack, "intent")
    assert first.keys() == second.keys()
    for k in first:
        torch.testing.assert_close(first[k], second[k])
    assert stack.stage_adapter("intent") == "intent", "the returned stack has the new adapter attached"


def test_trained_stack_runs_with_its_adapters_and_differs_from_zero_shot(llama_stack, tmp_path):
    data = write_distilled(tmp_path / "d.jsonl", n=24)
    question = "Question 3: eat well and sleep enough"
    r = invoke("run", llama_stack, question, "--json", "--max-new-tokens", "8")
    assert r.exit_code == 0, r.output
    zero_shot = json.loads(r.stdout)
    assert [s["adapter"] for s in zero_shot["stages"]] == [None] * 4

    r = invoke("train", llama_stack, "--data", data, "--max-steps", "8", "--lr", "3e-3", "--batch-size", "4")
    assert r.exit_code == 0, r.output
    assert all(f"adapters/{s}" in r.stdout for s in STAGES)
    assert all((llama_stack / "adapters" / s / "adapter_model.safetensors").is_file() for s in STAGES)

    r = invoke("run", llama_stack, question, "--json", "--max-new-tokens", "8")
    assert r.exit_code == 0, r.output
    trained = json.loads(r.stdout)
    assert [s["adapter"] for s in trained["stages"]] == STAGES
    assert [s["output"] for s in trained["stages"]] != [s["output"] for s in zero_shot["stages"]]
    r = invoke("info", llama_stack)
    assert r.exit_code == 0 and "adapters/answer" in r.output and "none (base)" not in r.output


def test_single_baseline(llama_stack, tmp_path):
    data = write_distilled(tmp_path / "d.jsonl", n=16)
    stack = Stack.load(llama_stack)
    prompt = stack.direct_prompt("Summarise this.", "Some text.")
    final = stack.config.final_stage
    assert final.role in prompt and "Summarise this." in prompt and "Input: Some text." in prompt
    assert "Notes:" not in prompt and "Plan:" not in prompt  # no empty slots for stages it never sees
    assert prompt == stack.backend.format_prompt(final.role, "Instruction: Summarise this.\nInput: Some text.")

    records, _ = read_records(data)
    ex = build_examples(stack, records, [], SINGLE)
    n = stack.backend.count_tokens(stack.direct_prompt(records[0].instruction, records[0].input))
    assert stack.backend.tokenizer.decode(ex.train[0]["input_ids"][n:-1]) == records[0].targets["answer"]

    r = invoke("train", llama_stack, "--data", data, "--single", "--max-steps", "6", "--lr", "3e-3")
    assert r.exit_code == 0, r.output
    assert (llama_stack / "adapters" / SINGLE / "adapter_model.safetensors").is_file()
    assert not any((llama_stack / "adapters" / s).exists() for s in STAGES)
    config = load_config(llama_stack)
    assert config.baselines["single"].steps == 6
    assert all(s.training is None for s in config.stages)

    stack = Stack.load(llama_stack)
    assert stack.stage_adapter("answer") is None  # the baseline is not a stage adapter
    name = stack.load_baseline(SINGLE)
    p = stack.direct_prompt("Question 2: eat well")
    settings = final.generation.model_copy(update={"max_new_tokens": 8})
    with_single = stack.backend.generate([p], name, settings)[0].text
    assert with_single != stack.backend.generate([p], None, settings)[0].text


def test_an_interrupt_mid_adapter_reaches_the_caller_and_leaves_a_bare_base(llama_stack, tmp_path, monkeypatch):
    """Ctrl-C (or SIGTERM turned into KeyboardInterrupt) while an adapter trains: the caller sees the interrupt, not
    an AttributeError from the cleanup, and the loaded stack's model has no LoRA layer left in it."""
    import fslm.steps.train.trainer as trainer

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt("signal 15")

    monkeypatch.setattr(trainer, "fit", interrupted)
    data = write_distilled(tmp_path / "d.jsonl", n=8)
    stack = Stack.load(llama_stack)
    with pytest.raises(KeyboardInterrupt):
        train(llama_stack, data, TrainOptions(stages=["intent"], max_steps=2), loaded=stack)
    assert not any("lora" in name for name, _ in stack.backend.model.named_modules())
