"""The precision choice: bf16 only where the hardware runs it natively (auto), float32 otherwise; training in bf16
autocast keeps float32 adapters; scoring in bf16 stays close to float32."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from safetensors.torch import load_file

from fslm import precision
from fslm.config import load_config
from fslm.stack import Stack
from fslm.stackdir import StackDir
from fslm.steps.init import InitOptions, init
from fslm.steps.train import TrainOptions, train


def test_auto_means_bf16_only_where_native(monkeypatch, caplog):
    monkeypatch.setattr(precision, "bf16_support", lambda: (False, "no AMX here"))
    with caplog.at_level(logging.INFO, logger="fslm"):
        assert precision.resolve("auto", "training") == "fp32"
    assert "no AMX here" in caplog.text  # one line saying why
    monkeypatch.setattr(precision, "bf16_support", lambda: (True, "AMX"))
    assert precision.resolve("auto") == "bf16"
    assert precision.resolve("fp32") == "fp32" and precision.resolve("bf16") == "bf16"


def test_detection_reports_a_reason():
    native, why = precision.bf16_support()
    assert isinstance(native, bool) and why


@pytest.fixture
def small_stack(tmp_path, tiny_llama):
    directory = tmp_path / "stack"
    init(directory, InitOptions(base=str(tiny_llama)))
    data = tmp_path / "d.jsonl"
    rows = []
    for i in range(6):
        targets = {"intent": f"wants {i}", "plan": "1. think", "reasoning": f"fact {i}", "answer": f"answer {i}"}
        rows.append({"id": f"r{i}", "instruction": f"Question {i}?", "targets": targets})
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return directory, data


@pytest.mark.parametrize("choice", ["bf16", "fp32"])
def test_training_records_its_precision_and_saves_float32_adapters(small_stack, choice, monkeypatch):
    directory, data = small_stack
    monkeypatch.setattr(precision, "bf16_support", lambda: (False, "test"))  # auto must resolve to fp32 here
    asked = "auto" if choice == "fp32" else "bf16"
    options = TrainOptions(stages=["intent"], max_steps=2, batch_size=2, lr=1e-3, precision=asked)
    result = train(directory, data, options)
    training = result.adapters["intent"].training
    assert training.model_extra["precision"] == choice
    assert training.train_loss is not None and math.isfinite(training.train_loss)  # neither NaN nor inf
    weights = load_file(StackDir(directory).weights("intent"))
    assert {t.dtype for t in weights.values()} == {torch.float32}
    assert load_config(directory).stage("intent").training.model_extra["precision"] == choice


def test_bf16_scoring_stays_close_to_float32(small_stack):
    directory, _ = small_stack
    stack = Stack.load(directory)
    tok = stack.backend.tokenizer
    requests = [(tok.encode("The plan has three steps"), tok.encode(" read the question")) for _ in range(2)]
    requests.append((tok.encode("What is the capital of France?"), tok.encode(" Paris")))
    fp32 = stack.backend.score(requests, None)
    assert stack.backend.set_precision("bf16") == "bf16"
    bf16 = stack.backend.score(requests, None)
    for (a, _), (b, _) in zip(fp32, bf16, strict=True):
        assert abs(a - b) < 0.1 * max(1.0, abs(a))  # bf16 has ~3 significant digits
    assert [a for a, _ in bf16] != [a for a, _ in fp32]  # the scores really came from bf16 matmuls


def test_eval_records_its_precision_and_never_reuses_rows_across_precisions(tmp_path, tiny_llama, monkeypatch):
    """`fslm eval --precision bf16` scores in bf16 (recorded per row and in the report), a finished float32 row is not
    reused for it, and `fslm eval compare` pairs the two runs item by item: the score difference between precisions."""
    from conftest import make_benchmark_dir
    from typer.testing import CliRunner

    from fslm.backends.pytorch import TorchBackend
    from fslm.cli import app

    scored_in: list[str] = []  # the backend's precision at each scoring call
    score = TorchBackend.score
    monkeypatch.setattr(
        TorchBackend, "score", lambda self, *a, **k: scored_in.append(self.precision) or score(self, *a, **k)
    )
    directory = tmp_path / "stack"
    init(directory, InitOptions(base=str(tiny_llama)))
    data = make_benchmark_dir(tmp_path / "data")
    common = ["eval", str(directory), "--tasks", "arc_easy", "--data-dir", str(data), "--limit", "6"]
    common += ["--systems", "base"]
    runs = {}
    for choice in ("fp32", "bf16"):
        out = tmp_path / choice
        scored_in.clear()
        r = CliRunner().invoke(app, [*common, "--out", str(out), "--precision", choice])
        assert r.exit_code == 0, r.output
        assert scored_in and set(scored_in) == {choice}
        runs[choice] = out
        results = json.loads((out / "results.json").read_text())
        assert results["precision"] == results["systems"]["base"]["precision"] == choice
        compute = "bfloat16 autocast" if choice == "bf16" else "float32"
        assert results["pinned"]["compute"] == compute and compute in (out / "report.md").read_text()
    # the same report directory with the other precision: the row is computed again, not reused
    scored_in.clear()
    r = CliRunner().invoke(app, [*common, "--out", str(runs["fp32"]), "--precision", "bf16"])
    assert r.exit_code == 0 and set(scored_in) == {"bf16"}
    assert json.loads((runs["fp32"] / "results.json").read_text())["systems"]["base"]["precision"] == "bf16"

    r = CliRunner().invoke(app, ["eval", "compare", str(runs["bf16"]), str(tmp_path / "fp32"), "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)["rows"]
    assert rows and all(row["n"] == 6 for row in rows)
