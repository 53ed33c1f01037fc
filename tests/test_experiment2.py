"""benchmarks/experiment2.py end to end on a tiny model (regime alpaca, a handful of records): every step runs, the
stack, single and multitask adapters are trained (the answer stage on the student's own earlier stages), every system
is evaluated, and a rerun finds every step done."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import load_benchmark, make_benchmark_dir, make_model_dir

from fslm.errors import FslmError
from fslm.files import sha256_file

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
        "--until": "eval",
    }  # fmt: skip
    argv = [str(x) for flag in flags.items() for x in flag]
    assert _script().main(argv) == 0

    ledger = json.loads((out / "ledger.json").read_text())
    assert list(ledger["steps"]) == ["init", "distill", "train", "eval"]  # --until eval
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

    # the adapters trained again to other bytes (a new machine's kernels): the eval, done on the old ones, runs again
    again["adapters"]["sha256"]["single"] = "0" * 64
    (out / "ledger.json").write_text(json.dumps(again))
    assert _script().main(argv) == 0
    third = json.loads((out / "ledger.json").read_text())
    assert [e["step"] for e in third["superseded"]] == ["eval"] and third["steps"]["eval"]["invocations"] == 1
    assert third["steps"]["eval"]["finished"]
    assert third["steps"]["eval"]["adapters"] == _script().adapters_fingerprint(third)

    # another campaign on other instructions (so other adapters), as regime B beside A: it reuses A's base row, which
    # reads no adapter, and scores its own single adapter
    other = tmp_path / "other"
    argv2 = [
        str(x) for flag in {**flags, "--out": other, "--alpaca": 4, "--systems": "base,single"}.items() for x in flag
    ]
    assert _script().main([*argv2, "--rows-from", str(out), "--plan", "--plan-questions", "2"]) == 0
    rows = {r["step"]: r for r in json.loads((other / "plan.json").read_text())["rows"]}
    assert rows["eval base"]["hours"] == 0 and "reused from" in rows["eval base"]["work"]
    assert "reused" not in rows["eval single"]["work"]  # its own adapter: scored here (a tiny model's hours round to 0)
    assert _script().main([*argv2, "--rows-from", str(out)]) == 0
    theirs = json.loads((other / "ledger.json").read_text())
    assert theirs["distilled"]["records"] == 4 and theirs["adapters"]["sha256"] != ledger["adapters"]["sha256"]
    assert theirs["results"]["systems"]["base"] == systems["base"]  # its seconds too: read back, not scored again
    assert set(theirs["results"]["systems"]) == {"base", "single"}
    assert (
        theirs["rows_from"]["eval/systems/base.json"] == json.loads((out / "eval/systems/base.json").read_text())["key"]
    )
    assert "Row `eval/systems/base.json`: reused from" in (other / "summary.md").read_text()
    assert "rows_from" not in theirs["settings"]  # where rows come from does not identify the experiment


def _mc_data(root):
    """Train files of the three regime-A sources (ARC-Easy, ARC-Challenge, OpenBookQA) beside the test splits; the
    gold option of train question i is always the text "fact i"."""
    data_dir = make_benchmark_dir(root)
    for split in ("Easy", "Challenge"):
        rows = []
        for i in range(6):
            texts = [f"fact {i}", f"myth {i}", f"guess {i}", f"rumour {i}"]
            choices = [{"text": t, "label": "ABCD"[k]} for k, t in enumerate(texts)]
            stem = f"Which {split.lower()} statement {i} is true?"
            rows.append({"id": f"t{split}{i}", "question": {"stem": stem, "choices": choices}, "answerKey": "A"})
        (data_dir / "arc" / f"ARC-{split}-Train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (data_dir / "openbookqa").mkdir()
    lines = ["ID\tQuestion Stem\tChoices\tComplete Question\tAnswer Key"]
    lines += [f"o{i}\tWhat is true about thing {i}\t(A) fact {i} (B) myth {i}\tx\tA" for i in range(6)]
    (data_dir / "openbookqa" / "train.tsv").write_text("\n".join(lines) + "\n")
    return data_dir


class _ScriptedJointTeacher:
    """Writes every stage blind as `### Stage` sections; names the gold ("fact N") where it sees the options."""

    id = "scripted-joint"
    batch_size = 4

    def describe(self):
        return {"backend": "scripted", "id": self.id}

    def prompt_key(self, system, user):
        return system + "\n" + user

    def generate(self, requests, settings, on_result=None, label="teacher"):
        import re

        from fslm.teachers import TeacherOutput

        outs = []
        for _, user in requests:
            n = re.search(r"(\d+)", user.split("\n")[0] if label == "joint" else user).group(1)
            if label == "joint":
                text = "### Intent\nWhat is true.\n### Plan\n1. Recall.\n### Reasoning\nIt is a fact.\n### Answer\nfact"
            else:
                text = f"fact {n}"
            outs.append(TeacherOutput(text, 20, 10, True))
            if on_result is not None:
                on_result(len(outs) - 1, outs[-1])
        return outs


def test_experiment2_mc_regime_plan_run_and_publish(tmp_path, monkeypatch):
    """Regime A on a tiny model with a scripted joint teacher: the plan prints every step's hours, the run distils
    all three sources (options only in the answer call), trains and evaluates every system, then publishes."""
    import fslm.steps.distill.run as distill_run

    monkeypatch.setattr(distill_run, "make_teacher", lambda *a, **k: _ScriptedJointTeacher())
    model_dir = make_model_dir(tmp_path, "llama", chat=True, context=2048)
    data_dir = _mc_data(tmp_path / "bench")
    out = tmp_path / "run"
    flags = {
        "--regime": "mc", "--data-dir": data_dir, "--out": out, "--base": model_dir, "--teacher-backend": "torch",
        "--arc-easy": 4, "--arc-challenge": 3, "--openbookqa": 3, "--batch-size": 2, "--filters": "empty,options",
        "--tasks": "arc_easy", "--eval-limit": 3, "--budgets": "intent=8,plan=8,reasoning=8,answer=8",
        "--plan-questions": 2, "--ablate-tasks": "arc_easy", "--ablate-limit": 2,
    }  # fmt: skip
    argv = [str(x) for flag in flags.items() for x in flag] + ["--teacher", str(model_dir)]  # its row: the tiny model
    test_split = data_dir / "arc" / "ARC-Easy-Test.jsonl"
    (data_dir / "arc" / "ARC-Easy-Dev.jsonl").write_text(test_split.read_text())  # the gate's τ is tuned on dev
    script = _script()
    assert script.main([*argv, "--plan"]) == 0
    plan = json.loads((out / "plan.json").read_text())
    steps = [row["step"] for row in plan["rows"]]
    assert steps[0] == "distill" and "train answer" in steps and "eval stack" in steps and plan["total_hours"] > 0
    assert plan["done"] == {"arc_easy_train": 0, "arc_challenge_train": 0, "openbookqa_train": 0}
    assert "teacher row" in steps and plan["eval"]["teacher_backend"] == "torch" and steps[-1] == "ablate stages"
    assert script.main([*argv, "--plan"]) == 0  # again: the probe times its teacher anew, not its earlier answers
    assert json.loads((out / "plan.json").read_text())["teacher"]["cache_hits"] == 0
    assert not (out / "ledger.json").exists() or "distill" not in json.loads((out / "ledger.json").read_text())["steps"]

    publish_root, sync = tmp_path / "repo", tmp_path / "committed"
    assert script.main([*argv, "--publish", "--publish-root", str(publish_root), "--sync", str(sync)]) == 0
    ledger = json.loads((out / "ledger.json").read_text())
    assert all(s["finished"] for s in ledger["steps"].values())
    parts = ledger["distilled"]["parts"]
    assert {p: v["counts"]["written_records"] for p, v in parts.items()} == {
        "distilled-arc_easy_train.jsonl": 4,
        "distilled-arc_challenge_train.jsonl": 3,
        "distilled-openbookqa_train.jsonl": 3,
    }
    assert (
        ledger["distilled"]["options"]["teacher_mode"] == "joint"
        and ledger["distilled"]["options"]["options"] == "answer"
    )
    row = json.loads((out / "train.jsonl").read_text().splitlines()[0])
    assert row["targets"]["reasoning"] == "It is a fact." and row["targets"]["answer"].startswith("fact ")
    assert set(ledger["results"]["systems"]) == {"base", "single", "multitask", "stack"}
    gate = ledger["results_gate"]["systems"]["stack"]
    assert gate["stack_scoring"]["mode"] == "gate" and gate["tasks"]["arc_easy"]["n"] == 3
    derived = load_benchmark("exp2_diagnosis").gate_at_caps(ledger["results_gate"], ledger["results"], [0.5])
    assert derived["arc_easy"]["reproduces_gate_row"]  # the gate row's per-item paths + the chain row = the gate row
    assert ledger["results_teacher"]["systems"]["base"]["tasks"]["arc_easy"]["n"] == 3
    ablation = ledger["results_ablation"]["systems"]
    assert set(ablation) == {"stack", *(f"stack-ablate-{s}" for s in ("intent", "plan", "reasoning", "answer"))}
    assert all(row["tasks"]["arc_easy"]["n"] == 2 for row in ablation.values())
    # each ablated row took the eval's chains up to its ablated stage (the answer's ablation: whole chains)
    assert ablation["stack-ablate-reasoning"]["stage_prefixes_borrowed"] == 2
    assert ablation["stack-ablate-answer"]["stage_chains_borrowed"] == 2
    assert ledger["steps_per_adapter"] == 5  # ceil(1 epoch x floor(10 x 0.9) / batch 2), the same for every adapter
    summary = (out / "summary.md").read_text()
    assert "| distilled-arc_easy_train.jsonl | 4 | 4 |" in summary and "| teacher |" in summary
    assert "### The stack's gate row" in summary and "### The teacher's row" in summary
    assert "### Per-stage ablation" in summary
    published = publish_root / "docs" / "results" / "exp2" / "mc"
    assert (published / "summary.md").is_file() and (published / "eval" / "results.json").is_file()
    assert {p.name for p in published.iterdir() if p.is_dir()} == {"eval", "eval-gate", "eval-teacher", "eval-ablate"}
    assert (publish_root / "data" / "exp2-mc" / "train.jsonl").read_text() == (out / "train.jsonl").read_text()
    assert (publish_root / "data" / "exp2-mc" / "distilled-openbookqa_train.jsonl.manifest.json").is_file()

    # --sync holds the trained adapters in bfloat16, the very bytes every eval row ran on, and the eval folders
    from safetensors.torch import load_file

    synced = sorted((sync / "stack" / "adapters").glob("*/adapter_model.safetensors"))
    assert {p.parent.name for p in synced} == {"intent", "plan", "reasoning", "answer", "single", "multitask"}
    assert all(t.dtype == torch.bfloat16 for p in synced for t in load_file(p).values())
    assert ledger["adapters"]["sha256"] == {p.parent.name: sha256_file(p) for p in synced}
    assert ledger["results"]["adapters"] == ledger["adapters"]["sha256"]  # the eval's setup: the adapters it read
    assert str(out) not in (sync / "stack" / "stack.yaml").read_text()
    assert (sync / "eval" / "systems" / "stack.stages.jsonl").is_file() and (
        sync / "eval-gate" / "results.json"
    ).is_file()

    # a new machine: a fresh OUT seeded from the committed folder trains nothing and evaluates nothing again
    fresh = tmp_path / "fresh"
    argv2 = [*argv[: argv.index("--out") + 1], str(fresh), *argv[argv.index("--out") + 2 :]]
    assert script.main([*argv2, "--sync", str(sync)]) == 0
    again = json.loads((fresh / "ledger.json").read_text())
    for step in ("train", "eval", "gate", "teacher", "ablate"):
        assert again["steps"][step]["invocations"] == ledger["steps"][step]["invocations"], step
    assert again["results"]["systems"] == ledger["results"]["systems"]

    # a sitting that stopped in the middle of the stack's row, resumed on a new machine: what --sync held then (the
    # ledger with eval unfinished, the finished rows, the stack's first chain) is enough; only the other chains run
    import shutil

    import fslm.steps.evaluate.lm_eval_model as lm_eval_model

    mid = tmp_path / "committed-mid-eval"
    shutil.copytree(sync, mid, ignore=shutil.ignore_patterns("eval-gate", "eval-teacher", "eval-ablate"))
    stopped = json.loads((mid / "ledger.json").read_text())
    stopped["steps"] = {k: v for k, v in stopped["steps"].items() if k in ("init", "distill", "train", "eval")}
    stopped["steps"]["eval"]["finished"] = False
    for k in ("results", "results_gate", "results_teacher", "results_ablation", "eval_options"):
        stopped.pop(k, None)
    (mid / "ledger.json").write_text(json.dumps(stopped))
    for f in ("stack.json", "tuning.json"):
        (mid / "eval" / "systems" / f).unlink(missing_ok=True)
    for f in ("results.json", "report.md", "accuracy_vs_cost.png"):
        (mid / "eval" / f).unlink(missing_ok=True)
    chains = (mid / "eval" / "systems" / "stack.stages.jsonl").read_text().splitlines()
    assert len(chains) == 3  # one greedy chain per question
    (mid / "eval" / "systems" / "stack.stages.jsonl").write_text(chains[0] + "\n")
    generated = []

    def counting(stack, instructions, *a, **k):
        generated.extend(instructions)
        return run_stages(stack, instructions, *a, **k)

    run_stages = lm_eval_model.run_stages
    monkeypatch.setattr(lm_eval_model, "run_stages", counting)
    fresh2 = tmp_path / "fresh-mid-eval"
    argv3 = [*argv[: argv.index("--out") + 1], str(fresh2), *argv[argv.index("--out") + 2 :]]
    # that sitting is stopped again (SIGTERM: KeyboardInterrupt) right after it wrote the other chains
    log_chains = lm_eval_model.FslmLM._log_chains

    def then_stopped(self, *a, **k):
        log_chains(self, *a, **k)
        raise KeyboardInterrupt("the sitting's end")

    monkeypatch.setattr(lm_eval_model.FslmLM, "_log_chains", then_stopped)
    with pytest.raises(KeyboardInterrupt):
        script.main([*argv3, "--sync", str(mid), "--until", "eval"])
    assert len(generated) == 2  # the two chains the stopped sitting had not written
    assert json.loads(chains[0])["context"].strip() not in generated
    assert len((mid / "eval" / "systems" / "stack.stages.jsonl").read_text().splitlines()) == 3  # copied at the stop
    monkeypatch.setattr(lm_eval_model.FslmLM, "_log_chains", log_chains)
    shutil.rmtree(fresh2)  # and resumed on yet another machine: every chain comes from the committed folder
    generated.clear()
    assert script.main([*argv3, "--sync", str(mid), "--until", "eval"]) == 0
    assert generated == []
    resumed = json.loads((fresh2 / "ledger.json").read_text())
    assert resumed["steps"]["train"]["invocations"] == ledger["steps"]["train"]["invocations"]  # not trained again
    assert resumed["results"]["systems"]["stack"]["items"] == ledger["results"]["systems"]["stack"]["items"]
    for system in ("base", "single", "multitask"):  # finished rows are read back, not scored again
        assert resumed["results"]["systems"][system] == ledger["results"]["systems"][system]


def test_diagnosis_reads_the_stacks_chains_and_rescoring_them_reproduces_the_eval(tmp_path, monkeypatch):
    """benchmarks/exp2_diagnosis.py on a tiny evaluated stack: the chain statistics and traces come from the eval's
    stage log, and scoring the answer stage after those very chains gives back the eval's own accuracy (so the
    ceiling's two figures are comparable with the eval's)."""
    from conftest import make_eval_stack
    from typer.testing import CliRunner

    from fslm.cli import app

    diagnosis = load_benchmark("exp2_diagnosis")
    stack = make_eval_stack(tmp_path / "stack")
    data_dir = make_benchmark_dir(tmp_path / "bench")
    report = tmp_path / "eval"
    args = ["eval", str(stack), "--tasks", "arc_easy", "--data-dir", str(data_dir), "--limit", "6"]
    r = CliRunner().invoke(app, [*args, "--systems", "stack", "--out", str(report), "--stage-tokens", "3"])
    assert r.exit_code == 0, r.output
    out = tmp_path / "diag"
    assert (
        diagnosis.main(["--stack", str(stack), "--eval", str(report), "--data-dir", str(data_dir), "--out", str(out)])
        == 0
    )
    result = json.loads((out / "diagnosis.json").read_text())["tasks"]["arc_easy"]
    assert result["names"]["chains"] == 6 and 0 <= result["names"]["name_gold"] <= 1
    shown = result["traces"]["right"] + result["traces"]["wrong"]
    assert shown and all("intent" in t and "reasoning" in t for t in shown)

    from fslm.steps.evaluate.lm_eval_model import FslmLM

    results, chains = diagnosis.read_eval(report)
    items = diagnosis.task_items(data_dir, "arc_easy")
    chosen = [(c, items[c]) for c in chains]
    lm = FslmLM(stack=str(stack), system="stack")
    task = results["systems"]["stack"]["tasks"]["arc_easy"]
    assert diagnosis.answer_accuracy(lm, chosen, chains) == round(task["accuracy"], 4)

    # the ceiling (the teacher's notes stubbed: no GGUF here): a seeded sample, paired against the stack's own chains
    def notes_naming_gold(args, config, task, chosen):
        return {c: {"intent": item["choices"][item["gold"]], "plan": "", "reasoning": ""} for c, item in chosen}

    monkeypatch.setattr(diagnosis, "teacher_notes", notes_naming_gold)
    argv = ["--stack", str(stack), "--eval", str(report), "--data-dir", str(data_dir), "--teacher", "t.gguf"]
    for run, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        assert diagnosis.main([*argv, "--out", str(tmp_path / f"ceil{run}"), "--ceiling", "4", "--seed", seed]) == 0
    ceil = [json.loads((tmp_path / f"ceil{r}" / "diagnosis.json").read_text())["tasks"]["arc_easy"]["ceiling"]
            for r in "abc"]  # fmt: skip
    assert ceil[0]["ids"] == ceil[1]["ids"] != ceil[2]["ids"]  # the sample: the seed's, not the chain file's order
    c = ceil[0]
    assert c["items"] == 4 and c["paired_teacher_minus_own"]["n"] == 4 and c["name_gold"]["teacher_notes"] == 1.0
    d = c["paired_teacher_minus_own"]
    assert d["diff"] == pytest.approx(c["answer_after_teacher_chain"] - c["answer_after_student_chain"], abs=1e-4)
    assert "Ceiling on 4 items (seeded (seed 0)" in (tmp_path / "ceila" / "diagnosis.md").read_text()
    own = lambda args, config, task, chosen: {c: chains[c] for c, _ in chosen}  # noqa: E731
    monkeypatch.setattr(diagnosis, "teacher_notes", own)  # the teacher writes the stack's own notes
    assert diagnosis.main([*argv, "--out", str(tmp_path / "same"), "--ceiling", "4"]) == 0
    same = json.loads((tmp_path / "same" / "diagnosis.json").read_text())["tasks"]["arc_easy"]["ceiling"]
    assert (
        same["paired_teacher_minus_own"]["diff"] == 0
        and same["name_gold"]["teacher_notes"] == c["name_gold"]["own_chain"]
    )


def test_a_ledger_written_before_places_were_named_resumes(tmp_path):
    """A ledger that spells the teacher's path absolutely (written before --sync named places) is rewritten with the
    place names, so the same settings compare equal instead of being refused as another experiment's."""
    script = _script()
    home = os.path.expanduser("~")
    ledger = tmp_path / "ledger.json"
    ledger.write_text(json.dumps({"settings": {"teacher": f"{home}/.cache/t.gguf", "seed": 0}}))
    script.name_places(ledger, {home: "~"})
    assert json.loads(ledger.read_text())["settings"] == {"teacher": "~/.cache/t.gguf", "seed": 0}
    script.Ledger(ledger, {"teacher": "~/.cache/t.gguf", "seed": 0})  # resumes: no error


def test_committed_files_name_places_only_as_whole_paths():
    """Manifests spell the data folder as it was given (`../shared/data/arc/...`): it is named there too, but a
    longer name that merely starts with it, or text around it, is left alone."""
    places = {"/w/runs/x": "OUT", "/w/shared/data": "DATA_DIR", "../shared/data": "DATA_DIR"}
    text = '{"file": "../shared/data/arc/t.jsonl", "a": "/w/shared/data", "b": "/w/runs/x/stack", "c": "../shared/database"}'
    assert json.loads(_script().portable(text, places)) == {
        "file": "DATA_DIR/arc/t.jsonl",
        "a": "DATA_DIR",
        "b": "OUT/stack",
        "c": "../shared/database",
    }


def test_a_ledger_written_before_a_setting_existed_resumes_at_its_old_value(tmp_path):
    """--prompt came after the campaign's ledger: that ledger resumes as the full form (what the older code trained),
    and asking for the compact form is refused, naming the setting, as any change of settings is."""
    script = _script()
    ledger = tmp_path / "ledger.json"
    ledger.write_text(json.dumps({"settings": {"seed": 0}, "steps": {}}))
    script.add_new_settings(ledger, script.LATER_SETTINGS)
    today = {"seed": 0, **script.LATER_SETTINGS}
    script.Ledger(ledger, today)  # resumes: no error
    with pytest.raises(FslmError, match="prompt"):
        script.Ledger(ledger, {**today, "prompt": "compact"})


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD is Linux only")
def test_the_script_restarts_under_the_training_allocator_and_records_it(tmp_path):
    """experiment2 trains in-process, so it restarts under the allocator `fslm train` gets (tcmalloc where installed)
    and the ledger names it, with PyTorch's thread count, which it warns about when the environment holds PyTorch
    below the cores it has (MKL_NUM_THREADS=1 did so silently for a campaign sitting). A stand-in library plays the
    allocator here (tests/test_heap.py)."""
    import subprocess

    from test_heap import _stand_in_library

    model_dir = make_model_dir(tmp_path, "llama", chat=True, context=2048)
    data_dir = make_benchmark_dir(tmp_path / "bench")
    out = tmp_path / "run"
    unset = ("FSLM_ALLOCATOR", "FSLM_ALLOCATOR_PRELOADED", "LD_PRELOAD")
    env = {k: v for k, v in os.environ.items() if k not in unset} | {"FSLM_ALLOCATOR": _stand_in_library()}
    env |= {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "1"}  # PyTorch takes the smaller
    args = ["--regime", "mc", "--data-dir", data_dir, "--out", out, "--base", model_dir, "--until", "init"]
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "experiment2.py"
    done = subprocess.run(
        [sys.executable, script, *map(str, args)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    ledger = json.loads((out / "ledger.json").read_text())
    assert ledger["allocators"] == [_stand_in_library()]
    assert ledger["torch_threads"] == [1]
    if len(os.sched_getaffinity(0)) > 1:
        assert "PyTorch runs on 1 of the" in " ".join(done.stderr.split())


def test_the_gate_under_a_cost_cap_is_derived_per_item_and_reproduces_the_gate_row():
    diagnosis = load_benchmark("exp2_diagnosis")
    tuning = {"value": 0.5, "grid": {"0.0": 0.5, "0.5": 0.75, "1.0": 0.6},
              "chain_rates": {"0.0": 0.0, "0.5": 0.3, "1.0": 1.0}}  # fmt: skip
    ids = ["a", "b", "c", "d"]
    # τ 0.5 chains a and c (margins below it): the chain's answers there, the direct path's on b and d
    gate_items = {"ids": ids, "acc": [1, 1, 0, 0], "direct_margin": [0.1, 0.9, 0.3, 0.7], "direct_acc": [0, 1, 1, 0],
                  "chained": [1, 0, 1, 0]}  # fmt: skip
    gate = {"tuning": {"arc_easy": tuning}, "systems": {"stack": {"items": {"arc_easy": gate_items}}}}
    chain = {"systems": {
        "stack": {"items": {"arc_easy": {"ids": ids, "acc": [1, 0, 0, 1]}}, "seconds_per_query": 3.0},
        "single": {"items": {"arc_easy": {"ids": ids, "acc": [0, 1, 1, 1]}}, "seconds_per_query": 0.5},
    }}  # fmt: skip
    out = diagnosis.gate_at_caps(gate, chain, [0.1, 0.5])["arc_easy"]
    assert out["reproduces_gate_row"] and out["tuned"] == {"tau": 0.5, "accuracy": 0.5, "chain_rate": 0.5}
    cheap, full = out["caps"]["0.1"], out["caps"]["0.5"]
    assert cheap["tau"] == 0.0 and cheap["accuracy"] == 0.5 and cheap["chain_rate"] == 0.0  # the direct path alone
    assert cheap["est_times_single"] == 1.0 and cheap["minus_single"]["difference"] == -0.25
    assert full["tau"] == 0.5 and full["dev_accuracy"] == 0.75 and full["est_seconds_per_question"] == 2.0
    gate_items["acc"] = [1, 1, 1, 0]  # a gate row the derivation cannot reproduce is flagged, not trusted
    assert not diagnosis.gate_at_caps(gate, chain, [0.1])["arc_easy"]["reproduces_gate_row"]
    assert "does not reproduce" in "\n".join(diagnosis.gate_lines(diagnosis.gate_at_caps(gate, chain, [0.1])))


def test_diagnosis_controls_names_gold_with_the_other_systems_and_reads_what_was_taught(tmp_path):
    """Naming the gold may only mark easy items: the other systems' accuracy on the same two sides is the control.
    `taught` counts the teacher's kept notes (not the answer stage) that name the gold or a wrong option."""
    diagnosis = load_benchmark("exp2_diagnosis")
    items = {"q1": {"id": "1", "choices": ["red fox", "blue whale"], "gold": 0},
             "q2": {"id": "2", "choices": ["red fox", "blue whale"], "gold": 1},
             "q3": {"id": "3", "choices": ["ice", "steam"], "gold": 1}}  # fmt: skip
    chains = {"q1": {"reasoning": "It is a red fox."}, "q2": {"reasoning": "A red fox."}, "q3": {"reasoning": "?"}}
    stats = diagnosis.chain_stats(chains, items, {"1": 1, "2": 0, "3": 1}, {"single": {"1": 1, "2": 1, "3": 0}})
    assert stats["name_gold"] == round(1 / 3, 4) and stats["name_a_wrong_option"] == round(1 / 3, 4)
    assert stats["accuracy_when_gold_named"] == 1 and stats["accuracy_when_not"] == 0.5
    assert stats["others"] == {"single": {"when_gold_named": 1.0, "when_not": 0.5}}
    rows = [{"reference": "steam", "choices": ["ice", "steam"], "targets": {"plan": "boil: steam", "answer": "steam"}},
            {"reference": "ice", "choices": ["ice", "steam"], "targets": {"plan": "think", "answer": "ice"}},
            {"reference": "x", "targets": {"plan": "x", "answer": "x"}}]  # fmt: skip
    (tmp_path / "d.jsonl").write_text(
        "".join(json.dumps({"id": f"r{i}", "instruction": "q", **r}) + "\n" for i, r in enumerate(rows))
    )
    taught = diagnosis.taught_stats([tmp_path / "d.jsonl"], ["plan", "answer"])
    assert taught == {"d.jsonl": {"records": 2, "name_gold": 0.5, "name_a_wrong_option": 0.0}}  # answers not counted


def test_a_stack_made_with_other_budgets_is_refused_not_silently_used(tmp_path, capsys):
    """A --plan (or an earlier run) made OUT/stack with some stage budgets; a run asking for others must not train
    with the old ones while its ledger records the new."""
    from fslm.steps.init import InitOptions, init

    model_dir = make_model_dir(tmp_path, "llama", chat=True, context=2048)
    out = tmp_path / "run"
    init(out / "stack", InitOptions(base=str(model_dir)))  # the recipe's own budgets
    data_dir = make_benchmark_dir(tmp_path / "bench")
    argv = ["--regime", "alpaca", "--data-dir", str(data_dir), "--out", str(out), "--base", str(model_dir),
            "--budgets", "intent=4,plan=4,reasoning=4,answer=4", "--plan"]  # fmt: skip
    assert _script().main(argv) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "stack.yaml: stage budgets differ from --budgets (intent" in err and "vs 4" in err


def test_only_steps_that_read_the_adapters_are_superseded_when_they_change():
    """Adapters trained again (a new machine): eval, gate and ablate ran on the old ones and run again; the teacher's
    row reads no adapter and stays done, its seconds kept."""
    script = _script()
    ledger = {"adapters": {"sha256": {"single": "a" * 64}}, "steps": {}}
    old = script.adapters_fingerprint(ledger)
    for step in ("train", "eval", "gate", "teacher", "ablate"):
        ledger["steps"][step] = {"seconds": 5.0, "invocations": 1, "finished": True, "adapters": old}
    assert script.supersede_stale(ledger) == []  # the same adapters: nothing moves
    ledger["adapters"]["sha256"]["single"] = "b" * 64
    assert script.supersede_stale(ledger) == ["eval", "gate", "ablate"]
    assert list(ledger["steps"]) == ["train", "teacher"] and ledger["steps"]["teacher"]["seconds"] == 5.0
    assert [e["step"] for e in ledger["superseded"]] == ["eval", "gate", "ablate"]
