"""`fslm quickstart`'s orchestration on a tiny model: the five steps run in order with a progress view, the trace
and the accuracy table are printed, and a rerun continues instead of starting over."""

from __future__ import annotations

import json
import os

from conftest import make_model_dir

import fslm.cli as commands
from fslm.quickstart import Budget, quickstart

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def test_quickstart_runs_five_steps_and_resumes(tmp_path, capsys):
    model_dir = make_model_dir(tmp_path, "llama", chat=True, context=2048)
    budget = Budget(records=4, teacher_tokens=4, train_steps=1, batch_size=2, eval_items=3, stage_tokens=3)
    said: list[str] = []
    kwargs = {"base": str(model_dir), "teacher_backend": "torch", "filters": "empty"}
    paths = quickstart(tmp_path / "qs", budget, said.append, commands, **kwargs)

    steps = [line for line in said if "step " in line]
    assert [s.split("step ")[1][:3] for s in steps] == ["1/5", "2/5", "3/5", "4/5", "5/5"]
    assert "left" in steps[-1] and "done" in said[-1]
    printed = capsys.readouterr().out
    for stage in ("intent", "plan", "reasoning", "answer"):
        assert stage in printed  # the run step's trace
    assert "stack" in printed and "single" in printed and "s/query" in printed  # the eval table

    results = json.loads((paths["report"] / "results.json").read_text())
    assert set(results["systems"]) == {"base", "single", "stack"}
    assert results["systems"]["stack"]["tasks"]["mmlu"]["n"] == 3
    assert (paths["eval data"] / "mmlu" / "test").is_dir()
    adapter = paths["stack"] / "adapters" / "single" / "adapter_model.safetensors"
    mtime = adapter.stat().st_mtime_ns

    said.clear()
    quickstart(tmp_path / "qs", budget, said.append, commands, **kwargs)
    assert any("reusing the stack" in s for s in said)
    assert any("already trained on this data: kept" in s for s in said)
    assert adapter.stat().st_mtime_ns == mtime
