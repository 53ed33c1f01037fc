"""Prompt forms: an adapter trained on the compact form (stage name, instruction, earlier stages) is run, served and
evaluated with that form; a stage on the bare base keeps the full form (role + template), which it needs."""

from __future__ import annotations

import json

import pytest
from test_train import write_distilled
from typer.testing import CliRunner

from fslm.cli import app
from fslm.config import load_config
from fslm.stack import Stack
from fslm.steps.init import InitOptions, init
from fslm.steps.train import TrainOptions, train


@pytest.fixture
def stack_dir(tmp_path, tiny_llama):
    init(tmp_path / "stack", InitOptions(base=str(tiny_llama)))
    return tmp_path / "stack"


def test_the_two_forms(stack_dir):
    stack = Stack.load(stack_dir, backend="torch")
    outputs = {"intent": "wants a colour", "plan": "1. name it"}
    compact = stack.render_prompt("reasoning", "Name a colour.", "for a child", outputs, form="compact")
    user = "Name a colour.\n\nfor a child\n\nIntent: wants a colour\n\nPlan: 1. name it"
    assert compact == stack.backend.format_prompt("reasoning", user)
    full = stack.render_prompt("reasoning", "Name a colour.", "for a child", outputs, form="full")
    assert stack.config.stage("reasoning").role in full and "Follow the plan" in full
    for stage in stack.config.stages:  # the compact form saves the role and template text of every stage
        done = {s.name: "some earlier text" for s in stack.config.stages}
        short = stack.backend.count_tokens(stack.render_prompt(stage, "Name a colour.", None, done, form="compact"))
        long = stack.backend.count_tokens(stack.render_prompt(stage, "Name a colour.", None, done, form="full"))
        assert short < long, stage.name
    # a direct answer (the baselines) speaks as the final stage in both forms
    assert stack.direct_prompt("Name a colour.", form="compact") == stack.backend.format_prompt(
        "answer", "Name a colour."
    )
    assert stack.config.final_stage.role in stack.direct_prompt("Name a colour.")


def test_compact_training_is_recorded_and_used_at_run_time(tmp_path, stack_dir):
    data = write_distilled(tmp_path / "d.jsonl", n=12)
    r = CliRunner().invoke(
        app,
        ["train", str(stack_dir), "--data", str(data), "--stages", "intent,plan", "--prompt", "compact",
         "--max-steps", "1", "--batch-size", "2"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    config = load_config(stack_dir)
    assert config.stage("intent").training.prompt == "compact" and config.stage("plan").training.prompt == "compact"
    assert config.stage("reasoning").training is None

    r = CliRunner().invoke(
        app, ["run", str(stack_dir), "Name a colour.", "--json", "--prompts", "--max-new-tokens", "2"]
    )
    assert r.exit_code == 0, r.output
    stages = {s["name"]: s for s in json.loads(r.stdout)["stages"]}
    stack = Stack.load(stack_dir, backend="torch")
    assert stages["intent"]["adapter"] == "intent"
    assert stages["intent"]["prompt"] == stack.backend.format_prompt("intent", "Name a colour.")
    intent = stages["intent"]["output"].strip()
    assert stages["plan"]["prompt"] == stack.backend.format_prompt("plan", f"Name a colour.\n\nIntent: {intent}")
    # untrained stages run on the bare base, which needs its role and template
    assert stages["reasoning"]["adapter"] is None
    assert config.stage("reasoning").role in stages["reasoning"]["prompt"]
    assert stack.prompt_form("intent") == "compact" and stack.prompt_form(None) == "full"


def test_the_training_examples_are_the_run_time_prompts(tmp_path, stack_dir):
    """What a compact adapter trains on is what it is run with: the examples' prompt ids equal the encoded
    run-time prompt (earlier stages' outputs replaced by their targets)."""
    from fslm.distilled import read_distilled
    from fslm.steps.train.examples import build_examples

    data = write_distilled(tmp_path / "d.jsonl", n=4)
    records, _ = read_distilled(data)
    stack = Stack.load(stack_dir, backend="torch")
    example = build_examples(stack, records, [], "plan", form="compact").train[0]
    prompt = stack.render_prompt("plan", records[0].instruction, records[0].input, records[0].targets, form="compact")
    ids = stack.backend.encode(prompt)
    assert example["input_ids"][: len(ids)] == ids and all(x == -100 for x in example["labels"][: len(ids)])


def test_baselines_and_eval_scoring_use_the_adapters_form(tmp_path, stack_dir):
    from fslm.steps.evaluate.lm_eval_model import FslmLM

    data = write_distilled(tmp_path / "d.jsonl", n=12)
    train(stack_dir, data, TrainOptions(single=True, prompt="compact", max_steps=1, batch_size=2))
    assert load_config(stack_dir).baselines["single"].prompt == "compact"
    stack = Stack.load(stack_dir, backend="torch")
    trace = stack.answer(["Name a colour."], system="single", max_new_tokens=2)[0]
    assert trace.stages[0].prompt == stack.backend.format_prompt("answer", "Name a colour.")
    lm = FslmLM(stack=str(stack_dir), system="single")
    assert lm._final_prompt("Question: Which colour?\nAnswer:", None) == stack.backend.format_prompt(
        "answer", "Question: Which colour?\nAnswer:"
    )
    base = FslmLM(stack=str(stack_dir), system="base")  # the bare base: the full form
    assert stack.config.final_stage.role in base._final_prompt("Question: Which colour?\nAnswer:", None)


def test_the_benchmarks_report_names_no_machine_path(tmp_path):
    """benchmarks/prompt_forms.py's committed JSON names its data file, data dir and output folder, not where they
    were on the machine that ran it."""
    import argparse

    from conftest import load_benchmark

    args = argparse.Namespace(data=tmp_path / "d" / "data.jsonl", data_dir=tmp_path / "shared", out=tmp_path / "out")
    text = json.dumps({"command": f"--data {args.data} --data-dir {args.data_dir} --out {args.out}"})
    shown = load_benchmark("prompt_forms").without_machine_paths(text, args)
    assert str(tmp_path) not in shown
    assert json.loads(shown)["command"] == "--data data.jsonl --data-dir DATA_DIR --out OUT"
