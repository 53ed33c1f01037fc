"""The README's Python API section, run exactly as written on a tiny model (only the base model's name is swapped
for the tiny model's directory), in a scratch directory holding the files it names.

A randomly initialised model never stops by itself, so every teacher text it writes is cut at the token limit and
the default `overlong` filter would drop them all: for this test only, distillation's default filters are `empty`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import make_benchmark_dir, make_model_dir

README = Path(__file__).parent.parent / "README.md"


def readme_pipeline() -> str:
    section = README.read_text(encoding="utf-8").split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture
def only_empty_filter():
    from fslm.steps.distill import DistillOptions

    field = DistillOptions.model_fields["filters"]
    default = field.default
    field.default = ("empty",)
    DistillOptions.model_rebuild(force=True)
    yield
    field.default = default
    DistillOptions.model_rebuild(force=True)


def test_readme_pipeline_runs_on_a_tiny_model(tmp_path, monkeypatch, capsys, only_empty_filter):
    code = readme_pipeline()
    assert all(f"fslm.{step}(" in code for step in ("init", "distill", "train", "evaluate", "export"))
    model_dir = make_model_dir(tmp_path, "llama", chat=True, context=2048)
    monkeypatch.chdir(tmp_path)
    rows = [
        {"instruction": f"Name a colour number {i}.", "input": "", "output": f"Colour {i} is blue."} for i in range(6)
    ]
    Path("instructions.json").write_text(json.dumps(rows))
    make_benchmark_dir(tmp_path / "benchmark-data")

    exec(compile(code.replace('"smollm2-135m-instruct"', repr(str(model_dir))), "README.md", "exec"), {})

    printed = capsys.readouterr().out
    assert "{'base': " in printed and "'stack': " in printed  # the accuracy of every system
    assert (tmp_path / "my-stack" / "adapters" / "answer" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "my-stack" / "adapters" / "single" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "my-stack" / "gguf" / "answer.lora.gguf").is_file()
    assert (
        json.loads((tmp_path / "report" / "results.json").read_text())["systems"]["single"]["tasks"]["arc_easy"]["n"]
        == 14
    )
