"""Issue 33: what a new user hits trying every documented command, each through the CLI as the user types it.

1 `fslm lm-eval --model hf` works beside `--model fslm` (and scores alike); 2 every training step learns; 3 a half
adapter folder is an error for run and a warning for info; 4 the baselines run on llama.cpp after an export; 5 a
distill run that keeps nothing says why and what to try; 6 serve on a taken port; 7 the train table in a log;
8 base model and server errors name stack.yaml's line; 9 one line instead of a traceback; 10 FSLM_DATA_DIR for
eval; 11 one bad line of a training file; 12 lock files go with their run; 13 quickstart's help and the README agree.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_adapter, make_benchmark_dir
from typer.testing import CliRunner

from fslm.cli import app
from fslm.steps.init import InitOptions, init

ROOT = Path(__file__).resolve().parents[1]
ENV = {
    **os.environ,
    "PYTHONPATH": str(ROOT),
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}
STAGES = ("intent", "plan", "reasoning", "answer")
runner = CliRunner()


def invoke(*args, env: dict[str, str] | None = None):
    return runner.invoke(app, [str(a) for a in args], env=env)


def fslm(*args, env: dict[str, str] | None = None, **kwargs) -> subprocess.CompletedProcess:
    """`fslm ARGS` in a process of its own (bytes arguments pass as given)."""
    argv = [a if isinstance(a, bytes) else str(a) for a in args]
    return subprocess.run(
        [sys.executable, "-m", "fslm", *argv], capture_output=True, env={**ENV, **(env or {})}, timeout=300, **kwargs
    )


def one_error_line(output: str, exit_code: int, *needles: str) -> str:
    """Exit 2, no traceback, exactly one `error:` line, naming each needle; returns that line."""
    assert exit_code == 2, output
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


@pytest.fixture
def stack_dir(tmp_path, tiny_llama) -> Path:
    directory = tmp_path / "stack"
    init(directory, InitOptions(base=str(tiny_llama)))
    return directory


def distilled(path: Path, n: int = 4, bad_line: int | None = None) -> Path:
    """A distilled JSONL of n records; `bad_line` (1-based) gets a Latin-1 byte in its instruction."""
    lines = []
    for i in range(n):
        row = {"id": f"r{i}", "instruction": f"Explain idea {i}.", "targets": {s: f"{s} of idea {i}." for s in STAGES}}
        line = json.dumps(row).encode()
        if bad_line == i + 1:
            line = line.replace(b"Explain", b"Expl\xe9in")
        lines.append(line)
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def arc_rows(path: Path, n: int = 4) -> Path:
    rows = []
    for i in range(n):
        choices = [{"text": t, "label": "ABCD"[k]} for k, t in enumerate(("iron", "wood", "glass", "stone"))]
        rows.append({"id": f"q{i}", "question": {"stem": f"Which material is magnetic ({i})?", "choices": choices},
                     "answerKey": "A"})  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --- 1. lm-eval's own models beside fslm's ------------------------------------------------------------------------


def test_lm_eval_hf_and_fslm_base_give_identical_scores(tmp_path, tiny_llama):
    """`--model hf` was "no model for this name found! Supported model names: fslm"; now both run, each in a process
    of its own as a user starts it (the two at once: most of each is lm-eval indexing its tasks), on the same seeded
    subset, and agree item by item."""
    data = make_benchmark_dir(tmp_path / "data")
    init(tmp_path / "stack", InitOptions(base=str(tiny_llama)))
    metadata = json.dumps({"data_dir": str(data), "subset": 4, "seed": 7})
    models = {"hf": f"pretrained={tiny_llama},dtype=float32", "fslm": f"stack={tmp_path / 'stack'},system=base"}
    procs = {}
    for name, model_args in models.items():
        argv = ["lm-eval", "--model", name, "--model_args", model_args, "--tasks", "fslm_arc_easy", "--device", "cpu"]
        argv += ["--metadata", metadata, "--log_samples", "--output_path", str(tmp_path / name)]
        procs[name] = subprocess.Popen([sys.executable, "-m", "fslm", *argv], stderr=subprocess.PIPE, env=ENV)
    scores = {}
    for name, proc in procs.items():
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr.decode()[-3000:]
        (results,) = (tmp_path / name).rglob("results_*.json")
        (samples,) = (tmp_path / name).rglob("samples_fslm_arc_easy_*.jsonl")
        task = json.loads(results.read_text())["results"]["fslm_arc_easy"]
        items = [json.loads(line) for line in samples.read_text().splitlines()]
        scores[name] = {
            "acc": task["acc,none"],
            "acc_norm": task["acc_norm,none"],
            "items": {i["doc_id"]: (i["acc"], [float(r[0][0]) for r in i["resps"]]) for i in items},
        }
    hf, ours = scores["hf"], scores["fslm"]
    assert len(hf["items"]) == 4 and hf["items"].keys() == ours["items"].keys()
    assert (hf["acc"], hf["acc_norm"]) == (ours["acc"], ours["acc_norm"])
    for doc, (acc, logprobs) in hf["items"].items():
        assert ours["items"][doc][0] == acc
        assert ours["items"][doc][1] == pytest.approx(logprobs, abs=1e-4)


# --- 2. every training step learns ----------------------------------------------------------------------------


def test_two_steps_change_the_adapter_twice(tmp_path, stack_dir):
    """The default warm-up (0.05 of 2 steps: 1 step) gave step 1 a learning rate of 0: lora_B stayed all zeros."""
    from safetensors.torch import load_file

    data = distilled(tmp_path / "d.jsonl")
    args = ["train", stack_dir, "--data", data, "--stages", "intent", "--max-steps", "2", "--batch-size", "1"]
    r = invoke(*args, "--save-steps", "1", "--keep-checkpoints", "--val-fraction", "0")
    assert r.exit_code == 0, r.output
    checkpoints = stack_dir / ".fslm-train" / "intent"

    def lora_b(path: Path) -> dict:
        return {k: v for k, v in load_file(path / "adapter_model.safetensors").items() if "lora_B" in k}

    fresh = {k: 0 * v for k, v in lora_b(checkpoints / "checkpoint-1").items()}  # PEFT starts B at zero
    after = [lora_b(checkpoints / f"checkpoint-{n}") for n in (1, 2)]
    final = lora_b(stack_dir / "adapters" / "intent")
    assert any(v.abs().max() > 0 for v in after[0].values()), "step 1 did not change lora_B"
    assert any((after[1][k] - after[0][k]).abs().max() > 0 for k in fresh), "step 2 did not change lora_B"
    assert all((final[k] == after[1][k]).all() for k in fresh)
    history = json.loads((checkpoints / "checkpoint-2" / "trainer_state.json").read_text())["log_history"]
    rates = {h["step"]: h["learning_rate"] for h in history if "learning_rate" in h}
    assert rates[1] > 0 and rates[2] > 0, rates


# --- 3. half an adapter folder --------------------------------------------------------------------------------


def test_half_an_adapter_folder_is_an_error_for_run_and_a_warning_for_info(stack_dir, tiny_llama):
    make_adapter(tiny_llama, "llama", stack_dir / "adapters" / "plan", seed=1)
    (stack_dir / "adapters" / "plan" / "adapter_config.json").unlink()
    r = invoke("run", stack_dir, "Give one tip.", "--max-new-tokens", "2")
    one_error_line(r.output, r.exit_code, str(stack_dir / "adapters" / "plan"), "adapter_config.json")
    r = invoke("info", stack_dir)
    assert r.exit_code == 0, r.output
    rows = [[c.strip() for c in line.split("│")[1:-1]] for line in r.stdout.splitlines() if line.startswith("│")]
    plan = next(row for row in rows if row[1] == "plan")
    assert plan[3] != "adapters/plan" and plan[4] == "-", plan  # not listed as trained, no parameters counted
    assert "warning:" in r.output and "adapter_config.json" in r.output


# --- 4. baselines on llama.cpp --------------------------------------------------------------------------------


def test_the_single_baseline_runs_on_llamacpp_after_an_export(stack_dir, tiny_llama):
    make_adapter(tiny_llama, "llama", stack_dir / "adapters" / "single", seed=4)
    r = invoke("export", stack_dir, "--quant", "f32")
    assert r.exit_code == 0, r.output
    args = ["run", stack_dir, "Give one tip.", "--backend", "llamacpp", "--system", "single", "--json"]
    r = invoke(*args, "--max-new-tokens", "3")
    assert r.exit_code == 0, r.output
    trace = json.loads(r.stdout)
    assert [(s["name"], s["adapter"]) for s in trace["stages"]] == [("single", "single")]


# --- 5. a distill run that keeps nothing ----------------------------------------------------------------------


def test_a_distill_run_that_keeps_nothing_says_why_and_what_to_try(tmp_path, stack_dir):
    data = arc_rows(tmp_path / "ARC-Easy-Train.jsonl")
    out = tmp_path / "d.jsonl"
    r = invoke("distill", data, "--stack", stack_dir, "--out", out, "--max-new-tokens", "3", "--filters", "none")
    line = one_error_line(r.output, r.exit_code, "0 of 4", "wrong", "--options answer", "--reference hint-on-retry")
    assert "--teacher-model" in line and "--overwrite" in line
    assert "0 of 4 records written" in r.stdout  # the summary is still there
    assert "A run that keeps nothing" in (ROOT / "docs" / "distill.md").read_text()


# --- 6. serve on a port already taken -------------------------------------------------------------------------


def test_serve_on_a_taken_port_is_one_error_line(stack_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = invoke("serve", stack_dir, "--port", port)
    one_error_line(r.output, r.exit_code, f"--port {port}", "127.0.0.1")
    assert "serving" not in r.output


# --- 7. the training table in a log ---------------------------------------------------------------------------


def test_the_train_table_names_every_adapter_in_a_log(tmp_path, stack_dir):
    data = distilled(tmp_path / "d.jsonl")
    log = tmp_path / "log"
    env = {k: v for k, v in ENV.items() if k != "COLUMNS"} | {"FSLM_ALLOCATOR": "system"}  # no re-exec under tcmalloc
    with open(log, "wb") as f:  # not a terminal: rich assumes 80 columns
        proc = subprocess.run(
            [sys.executable, "-m", "fslm", "train", str(stack_dir), "--data", str(data), "--stages", "intent,plan",
             "--max-steps", "1", "--val-fraction", "0"],
            stdout=f, stderr=subprocess.PIPE, env=env, timeout=300,
        )  # fmt: skip
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    rows = [line for line in log.read_text().splitlines() if line.startswith("│")]
    assert [re.split(r"\s*│\s*", row)[1] for row in rows] == ["adapters/intent", "adapters/plan"], log.read_text()


# --- 8. base model and server errors name stack.yaml's line ---------------------------------------------------


def _line_of(path: Path, prefix: str) -> int:
    return next(n for n, line in enumerate(path.read_text().splitlines(), 1) if line.strip().startswith(prefix))


def test_a_misspelled_base_alias_is_named_with_its_line(tmp_path, tiny_llama):
    directory = tmp_path / "s"
    init(directory, InitOptions(base=str(tiny_llama)))
    manifest = directory / "stack.yaml"
    manifest.write_text(manifest.read_text().replace(f"model: {tiny_llama}", "model: smollm2-135m-instruc"))
    where = f"{manifest}:{_line_of(manifest, 'model:')}: base.model"
    for command in (["run", directory, "Hi."], ["info", directory], ["export", directory]):
        r = invoke(*command)
        one_error_line(r.output, r.exit_code, where, "smollm2-135m-instruc")


def test_a_server_without_its_models_is_named_with_its_line(stack_dir):
    manifest = stack_dir / "stack.yaml"
    text = manifest.read_text().replace("backend: torch", "backend: openai\n  server:\n    url: http://127.0.0.1:9/v1")
    manifest.write_text(text)
    r = invoke("run", stack_dir, "Hi.")
    one_error_line(r.output, r.exit_code, f"{manifest}:{_line_of(manifest, 'server:')}: base.server", "base_model")


# --- 9. one line, not a traceback -----------------------------------------------------------------------------


def test_an_instruction_that_is_not_utf8(stack_dir):
    proc = fslm("run", stack_dir, b"caf\xe9 ok?")
    one_error_line(proc.stderr.decode(), proc.returncode, "INSTRUCTION", "UTF-8", "0xe9")


def test_eval_out_that_is_a_file(tmp_path, stack_dir):
    data = make_benchmark_dir(tmp_path / "data")
    report = tmp_path / "report"
    report.write_text("mine\n")
    r = invoke("eval", stack_dir, "--data-dir", data, "--out", report, "--tasks", "arc_easy", "--systems", "base")
    one_error_line(r.output, r.exit_code, str(report), "--out")
    assert report.read_text() == "mine\n"


def test_distill_out_that_is_a_directory_fails_before_the_teacher_loads(tmp_path, stack_dir, monkeypatch):
    from fslm.steps.distill import run as distill_run

    def no_teacher(*_, **__):
        raise AssertionError("the teacher was loaded")

    monkeypatch.setattr(distill_run, "make_teacher", no_teacher)
    data = arc_rows(tmp_path / "a.jsonl")
    out = tmp_path / "out"
    out.mkdir()
    before = sorted(tmp_path.rglob("*"))
    r = invoke("distill", data, "--stack", stack_dir, "--out", out)
    one_error_line(r.output, r.exit_code, str(out), "--out")
    assert sorted(tmp_path.rglob("*")) == before  # nothing half-written


def test_lm_eval_unknown_task_and_missing_data_dir(tmp_path, stack_dir):
    data = make_benchmark_dir(tmp_path / "data")
    model = ["--model", "fslm", "--model_args", f"stack={stack_dir},system=base"]
    env = {"FSLM_DATA_DIR": ""}
    proc = fslm("lm-eval", *model, "--tasks", "fslm_arc_eazy", "--metadata", json.dumps({"data_dir": str(data)}))
    one_error_line(proc.stderr.decode(), proc.returncode, "--tasks", "fslm_arc_eazy", "fslm_arc_easy")
    proc = fslm("lm-eval", *model, "--tasks", "fslm_arc_easy", env=env)
    one_error_line(proc.stderr.decode(), proc.returncode, "FSLM_DATA_DIR", "--metadata")


# --- 10. FSLM_DATA_DIR, one rule for eval and lm-eval ---------------------------------------------------------


def test_eval_reads_fslm_data_dir(tmp_path, stack_dir):
    data = make_benchmark_dir(tmp_path / "data")
    report = tmp_path / "report"
    args = ["eval", stack_dir, "--out", report, "--tasks", "arc_easy", "--systems", "base", "--limit", "2"]
    r = invoke(*args, env={"FSLM_DATA_DIR": str(data)})
    assert r.exit_code == 0, r.output
    results = json.loads((report / "results.json").read_text())
    assert results["data_dir"] == str(data.resolve())


# --- 11. one line of a training file that is not UTF-8 --------------------------------------------------------


def test_train_skips_and_names_a_line_that_is_not_utf8(tmp_path, stack_dir):
    data = distilled(tmp_path / "d.jsonl", n=4, bad_line=3)
    args = ["train", stack_dir, "--data", data, "--stages", "intent", "--max-steps", "1", "--val-fraction", "0"]
    r = invoke(*args)
    assert r.exit_code == 0, r.output
    assert re.search(r"d\.jsonl:3: not valid UTF-8", r.output), r.output
    assert (stack_dir / "adapters" / "intent" / "adapter_config.json").is_file()
    r = invoke(*args, "--strict")
    one_error_line(r.output, r.exit_code, "d.jsonl:3", "UTF-8")


# --- 12. lock files go with their run -------------------------------------------------------------------------


def test_lock_files_go_with_their_run_and_a_dead_holders_does_not_block(tmp_path, stack_dir):
    data = arc_rows(tmp_path / "a.jsonl", 2)
    out = tmp_path / "d.jsonl"
    dead = json.dumps({"pid": 999_999_999, "host": socket.gethostname(), "started": "long ago"})
    locks = [out.with_name("d.jsonl.lock"), out.with_name("d.jsonl.cache.jsonl.lock"), stack_dir / ".fslm-train.lock"]
    for lock in locks:
        lock.write_text(dead)  # left by a killed run
    args = ["distill", data, "--stack", stack_dir, "--out", out, "--max-new-tokens", "2", "--filters", "none"]
    r = invoke(*args, "--reference", "shown")  # kept or not, the run itself ends
    assert r.exit_code in (0, 2) and "in use by another fslm run" not in r.output, r.output
    r = invoke(*args)  # a different run on the same output: refused, under the lock
    one_error_line(r.output, r.exit_code, "different distill run")
    good = distilled(tmp_path / "good.jsonl")
    r = invoke("train", stack_dir, "--data", good, "--stages", "intent", "--max-steps", "1", "--val-fraction", "0")
    assert r.exit_code == 0, r.output
    r = invoke("train", stack_dir, "--data", tmp_path / "missing.jsonl")  # fails before the lock
    assert r.exit_code == 2
    bad = distilled(tmp_path / "bad.jsonl", n=1)
    bad.write_text(bad.read_text().replace('"intent"', '"elsewhere"'))  # no target for intent: fails under the lock
    r = invoke("train", stack_dir, "--data", bad, "--stages", "intent", "--max-steps", "1", "--val-fraction", "0")
    assert r.exit_code == 2, r.output
    assert [lock for lock in locks if lock.exists()] == []


# --- 13. quickstart's help and the README -----------------------------------------------------------------------


def test_quickstart_help_gives_the_readmes_duration():
    readme = (ROOT / "README.md").read_text()
    (figure,) = set(re.findall(r"fslm quickstart .*?\((\d+-\d+ min) on 2 cores\)", readme))
    r = invoke("quickstart", "--help")
    assert r.exit_code == 0
    assert figure in " ".join(r.stdout.split()), (figure, r.stdout)
