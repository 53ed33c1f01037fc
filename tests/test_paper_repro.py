"""benchmarks/paper_repro.py end to end on a tiny model: every step runs, the ledger and table are written, and a
rerun reuses what is done instead of redoing it."""

from __future__ import annotations

import json
import os

from conftest import load_benchmark, make_benchmark_dir, make_model_dir

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _script():
    return load_benchmark("paper_repro")


def test_paper_repro_runs_every_step_and_resumes(tmp_path, capsys):
    model_dir = make_model_dir(tmp_path, "llama", chat=True, context=2048)
    data_dir = make_benchmark_dir(tmp_path / "bench")
    alpaca = tmp_path / "alpaca.json"
    records = [
        {"instruction": f"Name a colour number {i}.", "input": "", "output": f"Colour {i} is blue."} for i in range(8)
    ]
    alpaca.write_text(json.dumps(records))
    out = tmp_path / "run"
    # a random model never stops by itself: every teacher text is cut, so no overlong filter
    flags = {
        "--alpaca": alpaca, "--data-dir": data_dir, "--out": out, "--base": model_dir, "--teacher-backend": "torch",
        "--teacher-tokens": 4, "--filters": "empty", "--train-steps": 1, "--batch-size": 2, "--eval-items": 3,
        "--stage-tokens": 3,
    }  # fmt: skip
    argv = [str(x) for flag in flags.items() for x in flag]
    script = _script()
    assert script.main(argv) == 0

    ledger = json.loads((out / "paper_repro.json").read_text())
    assert list(ledger["steps"]) == ["init", "distill", "train", "eval"]
    assert all(s["finished"] and s["invocations"] == 1 for s in ledger["steps"].values())
    assert set(ledger["results"]) == {"base", "single", "stack"}
    for row in ledger["results"].values():
        assert {"arc_easy", "arc_challenge", "mmlu"} <= set(row)
        assert all(row[t]["n"] == 3 for t in ("arc_easy", "arc_challenge", "mmlu"))
    assert ledger["hashes"]["distilled records written"] >= 1
    assert set(ledger["distilled"]) == {"intent", "plan", "reasoning", "answer"}
    assert ledger["distilled"]["answer"]["equals_reference"] == 1.0  # the final target is the reference
    assert ledger["settings"]["seed"] == 0 and ledger["settings"]["eval_seed"] == 1234
    table = (out / "paper_repro.md").read_text()
    assert "| stack |" in table and "| train |" in table and "| answer | " in table and "alpaca" in table

    # A rerun keeps the adapters and the finished eval rows: neither is written again (greedy decoding would give
    # equal results even if they were recomputed, so the files themselves are the evidence).
    adapter = out / "stack" / "adapters" / "answer" / "adapter_model.safetensors"
    mtime = adapter.stat().st_mtime_ns
    rows = {p.name: p.stat().st_mtime_ns for p in (out / "eval" / "systems").glob("*.json")}
    assert set(rows) == {"base.json", "single.json", "stack.json"}
    capsys.readouterr()
    assert script.main(argv) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "already trained on this data: kept" in err
    assert all(f"{name}: already evaluated" in err for name in ("base", "single", "stack")), err
    again = json.loads((out / "paper_repro.json").read_text())
    assert adapter.stat().st_mtime_ns == mtime
    assert {p.name: p.stat().st_mtime_ns for p in (out / "eval" / "systems").glob("*.json")} == rows
    assert again["results"] == ledger["results"]
    assert all(s["invocations"] == 2 for s in again["steps"].values())

    # Other settings in the same --out are refused instead of mixing two experiments.
    assert script.main([*argv, "--train-steps", "2"]) == 2
    assert "other settings (train_steps)" in capsys.readouterr().err
