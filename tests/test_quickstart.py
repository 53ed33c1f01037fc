"""`fslm quickstart`'s orchestration on a tiny model: the five steps run in order with a progress view, the trace
and the accuracy table are printed, and a rerun continues instead of starting over."""

from __future__ import annotations

import json
import os

from conftest import make_model_dir
from typer.testing import CliRunner

from fslm.cli import app

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def test_quickstart_runs_five_steps_and_resumes(tmp_path):
    model_dir = make_model_dir(tmp_path, "llama", chat=True, context=2048)
    out = tmp_path / "qs"
    budget = ["--records", "4", "--teacher-tokens", "4", "--train-steps", "1", "--batch-size", "2"]
    budget += ["--eval-items", "3", "--stage-tokens", "3"]
    tiny = ["--base", str(model_dir), "--teacher-backend", "torch", "--filters", "empty"]
    result = CliRunner().invoke(app, ["quickstart", "--out", str(out), *budget, *tiny])
    assert result.exit_code == 0, result.output

    steps = [line for line in result.stderr.splitlines() if line.startswith("step ")]
    assert [s.split("step ")[1][:3] for s in steps] == ["1/5", "2/5", "3/5", "4/5", "5/5"]
    assert "left" in steps[-1] and "done in" in result.stderr
    printed = result.stdout
    for stage in ("intent", "plan", "reasoning", "answer"):
        assert f"{stage} · " in printed  # the run step's trace: one panel per stage
    assert "s/query" in printed and "│ single" in printed and "│ stack" in printed  # the eval table

    report = out / "eval"
    results = json.loads((report / "results.json").read_text())
    assert set(results["systems"]) == {"base", "single", "stack"}
    assert results["systems"]["stack"]["tasks"]["mmlu"]["n"] == 3
    assert (out / "eval-data" / "mmlu" / "test").is_dir()
    from fslm.stackdir import StackDir

    config = StackDir(out / "stack").load()  # the stages' budgets are the targets' (--teacher-tokens), not the recipe's
    assert [s.generation.max_new_tokens for s in config.stages] == [4, 4, 4, 4]
    adapter = out / "stack" / "adapters" / "single" / "adapter_model.safetensors"
    mtime = adapter.stat().st_mtime_ns

    again = CliRunner().invoke(app, ["quickstart", "--out", str(out), *budget, *tiny])
    assert again.exit_code == 0, again.output
    assert "reusing the stack" in again.stderr
    assert "already trained on this data: kept" in again.stderr
    assert adapter.stat().st_mtime_ns == mtime
