"""The runtime: both architectures, adapter switching, batching, context policy."""

from __future__ import annotations

import pytest
from conftest import make_adapter, make_model_dir

from fslm import Stack
from fslm.errors import FslmError
from fslm.steps.init import InitOptions, init


def test_runs_every_stage_on_both_architectures(tiny_stack):
    arch, directory = tiny_stack
    stack = Stack.load(directory)
    seen = []
    trace = stack.run(
        "Give three tips for staying healthy.", on_stage=lambda i, r: seen.append(r.name), max_new_tokens=6
    )
    assert seen == ["intent", "plan", "reasoning", "answer"]
    assert [s.name for s in trace.stages] == seen
    for s in trace.stages:
        assert s.adapter is None  # zero-shot stack
        assert s.prompt_tokens == stack.backend.count_tokens(s.prompt)
        assert 1 <= s.output_tokens <= 6
        assert s.seconds > 0
    assert trace.answer == trace.stages[-1].output
    # Each stage's prompt carries the instruction and the earlier stages' outputs it reads.
    answer_prompt = trace.stages[3].prompt
    assert "Give three tips for staying healthy." in answer_prompt
    for earlier in trace.stages[:3]:
        assert earlier.output in answer_prompt
    if arch == "llama":
        assert answer_prompt.startswith("<|im_start|>system\n") and answer_prompt.endswith("<|im_start|>assistant\n")
    else:
        assert answer_prompt.endswith("### Response:\n")


def test_input_is_rendered_only_when_given(tiny_stack):
    _, directory = tiny_stack
    stack = Stack.load(directory)
    with_input = stack.render_prompt("intent", "Summarise.", "Some text to summarise.")
    without = stack.render_prompt("intent", "Summarise.")
    assert "Input: Some text to summarise." in with_input
    assert "Input:" not in without


def _greedy_pair(stack, prompt):
    return [c.text for c in stack.backend.generate([prompt], None, stack.config.stages[0].generation)]


def test_adapter_switching(tmp_path, tiny_model):
    arch, model_dir = tiny_model
    directory = tmp_path / "s"
    init(directory, InitOptions(base=str(model_dir)))
    make_adapter(model_dir, arch, directory / "adapters" / "intent", seed=1)
    make_adapter(model_dir, arch, directory / "adapters" / "plan", seed=2)
    stack = Stack.load(directory)
    assert stack.stage_adapter("intent") == "intent" and stack.stage_adapter("plan") == "plan"
    assert stack.stage_adapter("reasoning") is None

    prompt = stack.render_prompt("intent", "Explain why the sky is blue.")
    settings = stack.config.stages[0].generation.model_copy(update={"max_new_tokens": 12})

    def gen(adapter):
        return stack.backend.generate([prompt], adapter, settings)[0].text

    first, second, base = gen("intent"), gen("plan"), gen(None)
    assert first != second, "two different adapters must give different outputs"
    assert base not in (first, second)
    assert gen("intent") == first, "switching back must restore the first adapter exactly"
    assert gen(None) == base, "disabling adapters must restore the base model exactly"

    question = "Explain why the sky is blue."
    trace = stack.run(question, max_new_tokens=4)
    assert [s.adapter for s in trace.stages] == ["intent", "plan", None, None]
    # Ablating intent: that stage runs on the bare base (its output is the base model's, not the adapter's),
    # and the next stage still runs with its own adapter, on the ablated intent's text.
    ablated = stack.run(question, max_new_tokens=4, adapters={"intent": None})
    assert [s.adapter for s in ablated.stages] == [None, "plan", None, None]
    short = settings.model_copy(update={"max_new_tokens": 4})
    with_adapter = stack.backend.generate([trace.stages[0].prompt], "intent", short)[0].text
    on_base = stack.backend.generate([trace.stages[0].prompt], None, short)[0].text
    assert with_adapter != on_base, "the intent adapter must change the first 4 tokens"
    assert trace.stages[0].output == with_adapter and ablated.stages[0].output == on_base
    plan_prompt = ablated.stages[1].prompt
    assert on_base in plan_prompt and plan_prompt != trace.stages[1].prompt
    assert ablated.stages[1].output == stack.backend.generate([plan_prompt], "plan", short)[0].text
    assert ablated.stages[1].output != stack.backend.generate([plan_prompt], None, short)[0].text


def test_batch_equals_one_by_one_greedy(tmp_path, tiny_model):
    arch, model_dir = tiny_model
    directory = tmp_path / "s"
    init(directory, InitOptions(base=str(model_dir)))
    make_adapter(model_dir, arch, directory / "adapters" / "plan", seed=3)
    stack = Stack.load(directory)
    items = [
        "Give three tips for staying healthy.",
        ("What is the capital of France?", "Answer in one word."),
        "Explain why the sky is blue, in detail, with an example and a short summary at the end.",
    ]
    batched = stack.run_batch(items, max_new_tokens=10)
    single = [stack.run(*((i,) if isinstance(i, str) else i), max_new_tokens=10) for i in items]
    for b, s in zip(batched, single, strict=True):
        assert b.outputs == s.outputs
        assert [x.prompt_tokens for x in b.stages] == [x.prompt_tokens for x in s.stages]
        assert [x.output_tokens for x in b.stages] == [x.output_tokens for x in s.stages]
    # the prompts differ in length, so left padding really was exercised
    assert len({t.stages[0].prompt_tokens for t in batched}) == 3


def test_stop_strings_cut_the_output(tiny_stack):
    _, directory = tiny_stack
    stack = Stack.load(directory)
    prompt = stack.render_prompt("intent", "Give three tips for staying healthy.")
    settings = stack.config.stages[0].generation.model_copy(update={"max_new_tokens": 16})
    full = stack.backend.generate([prompt], None, settings)[0].text
    assert len(full) > 3
    stop = full[2:4]
    cut = stack.backend.generate([prompt], None, settings.model_copy(update={"stop": [stop]}))[0].text
    assert stop not in cut and full.startswith(cut)


def test_prompt_longer_than_context_is_refused(tmp_path, models_root):
    model_dir = make_model_dir(models_root, "llama", chat=True, context=64)
    init(tmp_path / "s", InitOptions(base=str(model_dir)))
    stack = Stack.load(tmp_path / "s")
    with pytest.raises(FslmError, match=r"stage 'intent': the prompt is \d+ tokens but the model's context is 64"):
        stack.run("word " * 200)


def test_max_new_tokens_is_lowered_to_fit_the_context(tmp_path, models_root, caplog):
    """A prompt that fits but leaves less room than max_new_tokens: that stage writes only up to the context's end,
    with a warning naming the stage (README, "Long prompts")."""
    import logging

    model_dir = make_model_dir(models_root, "llama", chat=True, context=64)
    init(tmp_path / "s", InitOptions(base=str(model_dir)))
    stack = Stack.load(tmp_path / "s")
    settings = stack.config.stages[0].generation.model_copy(update={"max_new_tokens": 40, "stop": []})
    prompt = "Give three tips for staying healthy. Eat well, sleep enough and move every day."
    with caplog.at_level(logging.WARNING, logger="fslm"):
        (done,) = stack.backend.generate([prompt], None, settings, label="intent")
    assert 24 < done.prompt_tokens < 62  # fits, but not with 40 new tokens
    room = 64 - done.prompt_tokens
    assert f"stage 'intent': max_new_tokens lowered from 40 to {room} to fit the context" in caplog.text
    assert done.output_tokens == room  # this random model does not stop early: it wrote up to the context's end
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fslm"):
        (short,) = stack.backend.generate([prompt], None, settings.model_copy(update={"max_new_tokens": 3}))
    assert short.output_tokens == 3 and "lowered" not in caplog.text


def test_empty_instruction_is_refused(tiny_stack):
    _, directory = tiny_stack
    stack = Stack.load(directory)
    with pytest.raises(FslmError, match="instruction is empty"):
        stack.run_batch(["fine", "   "])
