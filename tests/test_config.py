"""stack.yaml: round trip, and validation errors that name the file, line and field."""

from __future__ import annotations

import pytest

from fslm.config import dump_config, load_config, parse_config, save_config
from fslm.errors import FslmError
from fslm.recipes import available, load_recipe
from fslm.steps.init import InitOptions, init


def test_paper4_is_shipped_and_labelled_ours():
    assert "paper4" in available()
    recipe = load_recipe("paper4")
    assert [s["name"] for s in recipe["stages"]] == ["intent", "plan", "reasoning", "answer"]
    assert "published none" in recipe["description"]


def test_yaml_round_trip(tmp_path, tiny_llama):
    config = init(tmp_path / "s", InitOptions(base=str(tiny_llama))).config
    loaded = load_config(tmp_path / "s")
    assert loaded == config
    # Edit a prompt the way a user would, save, load: the edit survives and multi-line text stays a block.
    edited = loaded.model_copy(deep=True)
    edited.stages[1].template = "Plan for: {{ instruction }}\nBe brief. {{ intent }}"
    edited.stages[1].generation.stop = ["\n\n"]
    save_config(edited, tmp_path / "s")
    text = (tmp_path / "s" / "stack.yaml").read_text()
    assert "template: |" in text
    again = load_config(tmp_path / "s")
    assert again == edited
    assert parse_config(dump_config(again)) == again
    assert again.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _manifest(tmp_path, tiny_llama) -> str:
    init(tmp_path / "s", InitOptions(base=str(tiny_llama)))
    return (tmp_path / "s" / "stack.yaml").read_text()


def test_malformed_yaml_names_file_and_line(tmp_path):
    with pytest.raises(FslmError, match=r"stack.yaml:4:1: malformed YAML: .*flow sequence started at line 3"):
        parse_config("name: x\nstages:\n  - name: [unclosed\n", "stack.yaml")


def test_unknown_template_variable_names_field_and_line(tmp_path, tiny_llama):
    text = _manifest(tmp_path, tiny_llama).replace("{{ intent }}", "{{ intnet }}", 1)
    lines = text.splitlines()
    plan = next(i for i, ln in enumerate(lines) if "- name: plan" in ln)
    line = next(i for i, ln in enumerate(lines[plan:], plan + 1) if ln.strip().startswith("template:"))
    with pytest.raises(FslmError) as e:
        parse_config(text, "DIR/stack.yaml")
    msg = str(e.value)
    assert msg.startswith(f"DIR/stack.yaml:{line}: stages[1].template: unknown variable 'intnet'")
    assert "known: input, instruction, intent" in msg


def test_wrong_type_points_at_the_line(tmp_path, tiny_llama):
    text = _manifest(tmp_path, tiny_llama).replace("max_new_tokens: 96", "max_new_tokens: lots", 1)
    line = next(i for i, ln in enumerate(text.splitlines(), 1) if "max_new_tokens: lots" in ln)
    with pytest.raises(FslmError, match=rf"stack.yaml:{line}: stages\[1\]\.generation\.max_new_tokens: .*integer"):
        parse_config(text, "stack.yaml")


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (("reads: [intent]", "reads: [answer]"), r"stages\[1\]\.reads: 'answer' comes later"),
        (("reads: [intent]", "reads: [nope]"), r"stages\[1\]\.reads: 'nope' is not an earlier stage"),
        (("- name: plan", "- name: intent"), r"duplicate stage name 'intent'"),
        (("- name: plan", "- name: Plan!"), r"stages\[1\]\.name: 'Plan!' is not a valid stage name"),
        (("name: ", "nmae: "), r"nmae: Extra inputs are not permitted"),
        (("{{ instruction }}", "{{ instruction "), r"stages\[0\]\.template: template line 2: expected token"),
    ],
)
def test_bad_fields(tmp_path, tiny_llama, edit, expected):
    text = _manifest(tmp_path, tiny_llama).replace(*edit, 1)
    with pytest.raises(FslmError, match=expected):
        parse_config(text, "stack.yaml")


def test_missing_and_non_stack_directories(tmp_path):
    with pytest.raises(FslmError, match="no such directory"):
        load_config(tmp_path / "absent")
    with pytest.raises(FslmError, match=r"not a stack directory \(no stack.yaml"):
        load_config(tmp_path)
