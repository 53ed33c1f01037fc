"""The whole pipeline on the paper's student architecture (GPT-NeoX, as Pythia) and on Qwen2, with tiny random
models: init -> distill (a tiny torch teacher) -> train -> run -> eval -> export -> run on llama.cpp.

`--base EleutherAI/pythia-160m` (the paper's configuration) differs from the tiny GPT-NeoX here only in its size
and its download."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import LORA_TARGETS, make_benchmark_dir
from typer.testing import CliRunner

from fslm.backends.llamacpp import LlamaCppBackend
from fslm.cli import app
from fslm.config import load_config
from fslm.stack import Stack

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

STAGES = ["intent", "plan", "reasoning", "answer"]
runner = CliRunner()


def invoke(*args: object):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory) -> Path:
    return make_benchmark_dir(tmp_path_factory.mktemp("bench"))


def _dataset(path: Path, n: int) -> Path:
    rows = [{"instruction": f"Explain idea number {i} in one sentence.", "input": "", "output": ""} for i in range(n)]
    path.write_text(json.dumps(rows))
    return path


@pytest.mark.parametrize("arch", ["gpt_neox", "qwen2"])
def test_init_distill_train_run_eval_export_llamacpp(arch, tmp_path, request, tiny_llama, bench_dir):
    model_dir = request.getfixturevalue({"gpt_neox": "tiny_neox", "qwen2": "tiny_qwen2"}[arch])
    d = tmp_path / "stack"

    invoke("init", d, "--base", model_dir)
    assert load_config(d).lora.target_modules == LORA_TARGETS[arch]

    # distil: a different tiny model (a chat Llama) teaches every stage; no references, so it writes the answer too
    data = tmp_path / "d.jsonl"
    invoke(
        *("distill", _dataset(tmp_path / "raw.json", 6), "--stack", d, "--out", data),
        *("--teacher-model", tiny_llama, "--teacher-backend", "torch", "--max-new-tokens", "6"),
        *("--filters", "none", "--final-from", "teacher", "--batch-size", "6"),
    )
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    assert len(rows) == 6 and all(list(r["targets"]) == STAGES for r in rows)
    manifest = json.loads(data.with_name("d.jsonl.manifest.json").read_text())
    assert manifest["teacher"]["backend"] == "torch" and tiny_llama.name in manifest["teacher"]["id"]

    invoke("train", d, "--data", data, "--max-steps", "2", "--batch-size", "2", "--lr", "3e-3")
    for stage in STAGES:
        assert (d / "adapters" / stage / "adapter_model.safetensors").is_file()
        assert load_config(d).stage(stage).training.steps == 2

    question = "What is the capital of France?"
    trace = json.loads(invoke("run", d, question, "--json", "--max-new-tokens", "4").stdout)
    assert [s["adapter"] for s in trace["stages"]] == STAGES

    report = tmp_path / "report"
    invoke(
        *("eval", d, "--tasks", "arc_easy", "--data-dir", bench_dir, "--limit", "3"),
        *("--systems", "base,stack", "--out", report, "--stage-tokens", "2"),
    )
    results = json.loads((report / "results.json").read_text())
    assert all(results["systems"][s]["tasks"]["arc_easy"]["n"] == 3 for s in ("base", "stack"))

    invoke("export", d, "--quant", "f32")
    manifest = json.loads((d / "gguf" / "manifest.json").read_text())
    assert manifest["architecture"] == arch and set(manifest["adapters"]) == set(STAGES)

    fast = json.loads(invoke("run", d, question, "--backend", "llamacpp", "--json", "--max-new-tokens", "4").stdout)
    assert [s["adapter"] for s in fast["stages"]] == STAGES
    assert [s["prompt_tokens"] for s in fast["stages"]][0] == trace["stages"][0]["prompt_tokens"]

    # the trained adapters (not random ones) give the same greedy trace on both backends
    config = load_config(d)
    # f32 KV cache and no flash attention (CPU flash attention rounds queries to f16): exact enough for greedy text
    llama = Stack(config, LlamaCppBackend.from_settings(config.base, d, type_k=0, type_v=0, flash_attn_type=0), d)
    try:
        torch_trace = Stack.load(d, backend="torch").run(question, max_new_tokens=6).to_dict()
        llama_trace = llama.run(question, max_new_tokens=6).to_dict()
    finally:
        llama.backend.close()
    for t, g in zip(torch_trace["stages"], llama_trace["stages"], strict=True):
        assert (g["output"], g["output_tokens"], g["prompt_tokens"]) == (
            t["output"],
            t["output_tokens"],
            t["prompt_tokens"],
        ), g["name"]
