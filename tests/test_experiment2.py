"""benchmarks/experiment2.py end to end on a tiny model (regime alpaca, a handful of records): every step runs, the
stack, single and multitask adapters are trained (the answer stage on the student's own earlier stages), every system
is evaluated, and a rerun finds every step done."""

from __future__ import annotations

import json
import os

from conftest import load_benchmark, make_benchmark_dir, make_model_dir

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _script():
    return load_benchmark("experiment2")


def test_experiment2_runs_every_step_and_resumes(tmp_path):
    model_dir = make_model_dir(tmp_path, "llama", chat=True, context=2048)
    data_dir = make_benchmark_dir(tmp_path / "bench")
    (data_dir / "alpaca").mkdir()
    rows = [{"instruction": f"Name colour {i}.", "input": "", "output": f"Colour {i} is blue."} for i in range(8)]
    (data_dir / "alpaca" / "a.json").write_text(json.dumps(rows))
    out = tmp_path / "run"
    # a random model never stops by itself: every teacher text is cut, so only the empty filter
    flags = {
        "--regime": "alpaca", "--data-dir": data_dir, "--out": out, "--base": model_dir, "--teacher-backend": "torch",
        "--alpaca": 6, "--alpaca-glob": "alpaca/*.json", "--filters": "empty", "--batch-size": 2,
        "--tasks": "arc_easy", "--eval-limit": 3, "--budgets": "intent=4,plan=4,reasoning=4,answer=4",
        "--teacher-mode": "stages",  # a random teacher writes no joint sections
    }  # fmt: skip
    argv = [str(x) for flag in flags.items() for x in flag]
    assert _script().main(argv) == 0

    ledger = json.loads((out / "ledger.json").read_text())
    assert list(ledger["steps"]) == ["init", "distill", "train", "eval"]
    assert all(s["finished"] for s in ledger["steps"].values())
    systems = ledger["results"]["systems"]
    assert set(systems) == {"base", "single", "multitask", "stack"}
    assert all(row["tasks"]["arc_easy"]["n"] == 3 for row in systems.values())
    config = (out / "stack" / "stack.yaml").read_text()
    assert "max_new_tokens: 4" in config  # the budgets were written before distillation
    assert ledger["distilled"]["records"] == 6 and ledger["distilled"]["options"]["reference"] == "hidden"

    assert _script().main(argv) == 0  # a rerun: every step done, nothing redone
    again = json.loads((out / "ledger.json").read_text())
    assert all(again["steps"][s]["invocations"] == 1 for s in again["steps"])
