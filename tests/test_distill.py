"""`fslm distill` on a tiny random teacher: format, per-stage prompts, cache, filters, resume after SIGKILL."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fslm.cli import app
from fslm.config import GenerationSettings, load_config, update_config
from fslm.data import read_dataset
from fslm.steps.distill import DistillOptions, distill_records
from fslm.steps.distill.filters import check_target, fit_to_budget, is_degenerate, trim_to_sentence
from fslm.steps.distill.prompts import REFERENCE_NOTE
from fslm.steps.init import InitOptions, init
from fslm.teachers import torch_teacher

runner = CliRunner()
STAGES = ["intent", "plan", "reasoning", "answer"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def make_dataset(path: Path, n: int, every_no_reference: int = 4) -> Path:
    rows = []
    for i in range(n):
        row = {"instruction": f"Explain idea number {i} in one sentence.", "input": "" if i % 3 else f"context {i}"}
        row["output"] = "" if i % every_no_reference == every_no_reference - 1 else f"Idea {i} is simple."
        rows.append(row)
    path.write_text(json.dumps(rows, indent=1))
    return path


@pytest.fixture
def stack_dir(tmp_path, tiny_llama) -> Path:
    d = tmp_path / "stack"
    init(d, InitOptions(base=str(tiny_llama)))
    return d


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_distill_cli_format_resume_and_cache(tmp_path, stack_dir):
    data = make_dataset(tmp_path / "d.json", 10)
    out = tmp_path / "out" / "d.jsonl"
    args = ["distill", data, "--stack", stack_dir, "--out", out, "--limit", "8", "--seed", "1"]
    args += ["--max-new-tokens", "6", "--filters", "none", "--batch-size", "3"]
    r = invoke(*args)
    assert r.exit_code == 0, r.output
    rows = read_jsonl(out)
    selected = read_dataset(data, limit=8, seed=1).records
    assert [row["id"] for row in rows] == [rec.id for rec in selected]  # file order, each once
    for row, rec in zip(rows, selected, strict=True):
        assert set(row) == {"id", "instruction", "input", "reference", "targets", "source", "checks"}
        assert list(row["targets"]) == STAGES
        assert row["source"] == {"file": "d.json", "index": rec.index}
        assert row["instruction"] == rec.instruction and row["input"] == rec.input
        if rec.reference:
            assert row["targets"]["answer"] == rec.reference == row["reference"]
        else:  # no reference: the teacher wrote the final stage too
            assert row["reference"] is None and row["targets"]["answer"]
    manifest = json.loads((tmp_path / "out" / "d.jsonl.manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["counts"] == {
        "selected": 8,
        "written": 8,
        "written_records": 8,
        "rejected_records": 0,
        "filtered": {"empty": 0, "overlong": 0, "repetition": 0, "leak": 0, "options": 0, "wrong": 0, "format": 0},
        "lost": 0,
    }
    assert manifest["dataset"]["sha256"] and manifest["dataset"]["seed"] == 1 and manifest["dataset"]["limit"] == 8
    assert manifest["teacher"]["backend"] == "torch" and manifest["teacher"]["id"].startswith("torch:")
    assert manifest["stack"]["prompts_sha256"] and {"torch", "transformers", "python"} <= set(manifest["versions"])
    no_ref = sum(1 for rec in selected if not rec.reference)
    assert manifest["last_run"]["teacher_calls"] == 3 * 8 + no_ref
    first = out.read_bytes()

    assert [run["teacher_calls"] for run in manifest["runs"]] == [3 * 8 + no_ref]
    assert manifest["runs"][0]["versions"] == manifest["versions"]  # each run says what it ran with
    manifest_path = tmp_path / "out" / "d.jsonl.manifest.json"

    r = invoke(*args)  # same command again: nothing to do
    assert r.exit_code == 0, r.output
    assert "8 resumed, 0 teacher calls" in r.stdout and out.read_bytes() == first
    again = json.loads(manifest_path.read_text())  # a no-op resume keeps what the records cost
    assert again["last_run"]["teacher_calls"] == 0 and again["runs"] == manifest["runs"]

    r = invoke(*args, "--overwrite")  # rewritten from the cache: the teacher is not asked again
    assert r.exit_code == 0, r.output
    assert "0 resumed, 0 teacher calls" in r.stdout and out.read_bytes() == first
    assert [run["teacher_calls"] for run in json.loads(manifest_path.read_text())["runs"]] == [0]  # a new history

    r = invoke(*args[:-6], "--max-new-tokens", "7", "--filters", "none", "--batch-size", "3")
    assert r.exit_code == 2 and "different distill run (differs in options)" in r.output
    assert out.read_bytes() == first


class Spy:
    """The real tiny teacher, recording what it is asked."""

    def __init__(self, inner):
        self.inner, self.id, self.batch_size, self.asked = inner, inner.id, inner.batch_size, []

    def describe(self):
        return self.inner.describe()

    def prompt_key(self, system, user):
        return self.inner.prompt_key(system, user)

    def generate(self, requests, settings, on_result=None, label="teacher"):
        self.asked.extend(requests)
        return self.inner.generate(requests, settings, on_result, label)


def test_teacher_prompts_read_earlier_teacher_outputs(tmp_path, stack_dir, tiny_llama):
    config = load_config(stack_dir)
    data = make_dataset(tmp_path / "d.json", 3, every_no_reference=99)  # all with references
    dataset = read_dataset(data)
    teacher = torch_teacher(str(tiny_llama), config.base, stack_dir, batch_size=4)
    spy = Spy(teacher)
    opts = DistillOptions(max_new_tokens=5, filters=(), reference="shown")
    result = distill_records(config, dataset, spy, tmp_path / "a.jsonl", options=opts)
    assert result.written == 3 and result.lost == 0
    rows = {row["id"]: row for row in read_jsonl(tmp_path / "a.jsonl")}
    assert len(spy.asked) == 3 * 3  # the final stage comes from the reference
    roles = {s.name: s.role for s in config.stages}
    for rec in dataset.records:
        asked = [(s, u) for s, u in spy.asked if f"Instruction: {rec.instruction}" in u]
        assert [s for s, _ in asked] == [roles["intent"], roles["plan"], roles["reasoning"]]
        targets = rows[rec.id]["targets"]
        assert f"What the user wants: {targets['intent']}" in asked[1][1]  # the teacher's own earlier output
        assert f"Plan:\n{targets['plan']}" in asked[2][1]
        note = REFERENCE_NOTE.format(reference=rec.reference)
        assert all(u.endswith(note) for _, u in asked)

    spy2 = Spy(teacher)
    opts = DistillOptions(max_new_tokens=5, filters=(), reference="hidden", final_from="teacher")
    distill_records(config, dataset, spy2, tmp_path / "b.jsonl", options=opts)
    assert len(spy2.asked) == 3 * 4 and not any("reference answer" in u for _, u in spy2.asked)
    for row in read_jsonl(tmp_path / "b.jsonl"):
        assert row["targets"]["answer"] != row["reference"]


def test_filters_unit():
    stage = load_config_stage()
    count = lambda s: len(s.split())  # noqa: E731
    assert check_target("  ", stage, ["empty"], count, 1.0) == "empty"
    assert check_target(" ".join(["w"] * 65), stage, ["overlong"], count, 1.0) == "overlong"  # intent budget 64
    assert check_target(" ".join(["w"] * 64), stage, ["overlong"], count, 1.0) is None
    assert check_target("short but cut", stage, ["overlong"], count, 1.0, cut=True) == "overlong"
    assert check_target(" ".join(["w"] * 65), stage, ["overlong"], count, 0.0) is None  # factor 0 disables
    loop = "I think that " * 10
    assert is_degenerate(loop) and check_target(loop, stage, ["repetition"], count, 1.0) == "repetition"
    assert not is_degenerate("The three primary colours are red, yellow and blue; mixing them gives the others.")
    assert not is_degenerate("yes yes yes")  # too short to judge
    assert check_target(loop, stage, [], count, 1.0) is None


def test_trim_cut_teacher_output():
    plan = "1. Read the question.\n2. Find the numbers.\n3. Add them up and then write"
    assert trim_to_sentence(plan) == "1. Read the question.\n2. Find the numbers."
    assert trim_to_sentence("Paris is the capital of France. It has 2.1 million people and its ri") == (
        "Paris is the capital of France."
    )
    assert trim_to_sentence("no sentence end at all and cut") is None
    assert trim_to_sentence("Ok. " + "then a very long unfinished run of words " * 5) is None  # would keep too little


def test_fit_to_budget():
    words = lambda s: len(s.split())  # noqa: E731
    plan = "1. Read the question.\n2. Find the numbers in it.\n3. Add them up.\n4. Check the sum."
    assert fit_to_budget(plan, 12, words) == "1. Read the question.\n2. Find the numbers in it."
    assert fit_to_budget(plan, 100, words) == plan  # already fits: the whole text
    assert fit_to_budget(plan, 3, words) is None  # no full line fits
    assert fit_to_budget("Short. " + "a long run of words without an end " * 4, 5, words) is None  # keeps too little


def load_config_stage():
    from fslm.config import StageConfig

    return StageConfig(
        name="intent", role="r", template="{{ instruction }}", generation=GenerationSettings(max_new_tokens=64)
    )


def test_filtered_records_are_counted_not_lost(tmp_path, stack_dir):
    """Default filters on a random teacher cut at 4 tokens: every record is rejected as overlong, none lost."""
    data = make_dataset(tmp_path / "d.json", 5)
    out = tmp_path / "d.jsonl"
    r = invoke("distill", data, "--stack", stack_dir, "--out", out, "--max-new-tokens", "4", "--no-trim-cut")
    assert r.exit_code == 2 and "0 of 5 records kept" in r.output, r.output  # a run that keeps nothing says so
    manifest = json.loads(Path(f"{out}.manifest.json").read_text())
    rejected = read_jsonl(Path(f"{out}.rejected.jsonl"))
    counts = manifest["counts"]
    assert counts["written"] + sum(counts["filtered"].values()) == 5 and counts["lost"] == 0
    assert counts["filtered"]["overlong"] == len([x for x in rejected if x["rejected"]["filter"] == "overlong"]) > 0
    assert len(read_jsonl(out)) == counts["written"]


def test_torn_lines_repaired_on_restart(tmp_path, stack_dir):
    data = make_dataset(tmp_path / "d.json", 4)
    out = tmp_path / "d.jsonl"
    args = ["distill", data, "--stack", stack_dir, "--out", out, "--max-new-tokens", "4", "--filters", "none"]
    assert invoke(*args).exit_code == 0
    rows = out.read_text().splitlines()
    # As if killed mid-write: the last record half written, a cache line half written.
    out.write_text("\n".join(rows[:-1]) + "\n" + rows[-1][: len(rows[-1]) // 2])
    cache = Path(f"{out}.cache.jsonl")
    cache.write_text(cache.read_text() + '{"key": "abc", "te')
    r = invoke(*args)
    assert r.exit_code == 0, r.output
    assert out.read_text().splitlines() == rows  # the torn record redone once, from the cache
    assert "3 resumed, 0 teacher calls" in r.stdout
    assert all(json.loads(line) for line in cache.read_text().splitlines())


@pytest.mark.parametrize("mode, batch, tokens", [("stages", "2", "24"), ("joint", "1", "96")])
def test_sigkill_mid_run_then_resume(tmp_path, stack_dir, mode, batch, tokens):
    """Kill a real `python -m fslm distill` with SIGKILL mid-run; the same command finishes: 0 lost, 0 duplicated.
    In joint mode the random teacher writes no sections, so every record lands in the rejected file (format)."""
    n = 24
    data = make_dataset(tmp_path / "d.json", n)
    out = tmp_path / "d.jsonl"
    rejected = Path(f"{out}.rejected.jsonl")
    if mode == "joint":  # the tiny model's 512-token context holds no full joint prompt: one-word briefs

        def short(doc):
            for stage in doc["stages"]:
                stage["brief"] = stage["name"]

        update_config(stack_dir, short)
    cmd = [sys.executable, "-m", "fslm", "distill", str(data), "--stack", str(stack_dir), "--out", str(out)]
    cmd += ["--batch-size", batch, "--max-new-tokens", tokens, "--filters", "none", "--teacher-mode", mode]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

    def lines() -> int:
        return sum(f.read_bytes().count(b"\n") for f in (out, rejected) if f.exists())

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + 180
    while lines() < 3:
        assert proc.poll() is None, f"distill ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
        assert time.monotonic() < deadline, "distill made no progress"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    at_kill = lines()
    assert proc.returncode == -signal.SIGKILL and 0 < at_kill < n

    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == (2 if mode == "joint" else 0), done.stderr[-2000:]  # joint keeps nothing: exit 2
    ids = [row["id"] for f in (out, rejected) if f.exists() for row in read_jsonl(f)]
    assert len(ids) == len(set(ids)) == n  # 0 duplicated
    assert set(ids) == {rec.id for rec in read_dataset(data).records}  # 0 lost
    manifest = json.loads(Path(f"{out}.manifest.json").read_text())
    assert manifest["counts"]["lost"] == 0 and manifest["last_run"]["resumed_records"] >= at_kill
    keys = [json.loads(line)["key"] for line in Path(f"{out}.cache.jsonl").read_text().splitlines()]
    assert len(keys) == len(set(keys))  # no teacher answer paid for twice


def test_bad_rows_reported_and_strict(tmp_path, stack_dir):
    data = tmp_path / "bad.jsonl"
    data.write_bytes(
        b'{"instruction": "Say hi.", "output": "hi"}\n{"instruction": "broken"\n{"output": "no instruction"}\n'
        b'{"instruction": "Say bye.", "output": "bye"}\n'
    )
    out = tmp_path / "d.jsonl"
    r = invoke("distill", data, "--stack", stack_dir, "--out", out, "--max-new-tokens", "3", "--filters", "none")
    assert r.exit_code == 0, r.output
    assert "bad.jsonl:2: broken JSON line" in r.output and "bad.jsonl:3: missing instruction" in r.output
    assert "skipped 2 bad row(s) of 4" in r.output
    assert [row["instruction"] for row in read_jsonl(out)] == ["Say hi.", "Say bye."]

    r = invoke("distill", data, "--stack", stack_dir, "--out", tmp_path / "e.jsonl", "--strict")
    assert r.exit_code == 2 and "bad.jsonl:2: broken JSON line" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "e.jsonl").exists()


def test_contamination_warns_refuses_and_counts(tmp_path, stack_dir):
    bench = tmp_path / "bench"
    (bench / "arc").mkdir(parents=True)
    stem = "Which gas do plants absorb from the air?"
    (bench / "arc" / "ARC-Easy-Test.jsonl").write_text(json.dumps({"question": {"stem": stem}}) + "\n")
    data = tmp_path / "d.json"
    rows = [{"instruction": stem.upper(), "output": "CO2"}, {"instruction": "Say hi.", "output": "hi"}]
    data.write_text(json.dumps(rows))
    out = tmp_path / "d.jsonl"
    base = ["distill", data, "--stack", stack_dir, "--max-new-tokens", "3", "--data-dir", bench, "--filters", "none"]
    r = invoke(*base, "--out", out, "--strict")
    assert (
        r.exit_code == 2 and "1 of 2 training instructions appear in a benchmark test split (1 in arc_easy)" in r.output
    )
    r = invoke(*base, "--out", out)
    assert r.exit_code == 0 and "1 in arc_easy" in r.output
    manifest = json.loads(Path(f"{out}.manifest.json").read_text())
    assert manifest["contamination"]["per_split"] == {"arc_easy": 1} and manifest["contamination"]["contaminated"] == 1

    r = invoke("check-contamination", out, "--data-dir", bench, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["per_split"] == {"arc_easy": 1}
    r = invoke("check-contamination", out, "--data-dir", bench)
    assert re.search(r"│ arc_easy\s+│\s+1\s+│\s+1\s+│", r.stdout), r.stdout  # split, its items, instructions found
    assert "1 of 2" in r.stdout
    assert invoke("check-contamination", out, "--data-dir", bench, "--strict").exit_code == 2


def test_refused_run_leaves_an_unrelated_file_untouched(tmp_path, stack_dir):
    data = make_dataset(tmp_path / "d.json", 2)
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes, no trailing newline")
    r = invoke("distill", data, "--stack", stack_dir, "--out", notes, "--max-new-tokens", "3")
    assert r.exit_code == 2 and "notes.txt: already holds records from a different distill run" in r.output
    assert notes.read_text() == "my notes, no trailing newline"
    other = tmp_path / "other.jsonl"
    other.write_text('{"a": 1}\nnot json\ntail without newline')
    before = other.read_bytes()
    r = invoke("distill", data, "--stack", stack_dir, "--out", other, "--max-new-tokens", "3")
    assert r.exit_code == 2 and "other.jsonl:2: not a JSON line" in r.output
    assert other.read_bytes() == before
