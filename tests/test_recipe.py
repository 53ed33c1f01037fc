"""The distillation recipe: multiple-choice input, reference policies (hidden, hint-on-retry, shown), answer checks,
the leak guard, sampled chains, and on the training side the multitask baseline and the on-policy final stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fslm.answers import answer_correct, chosen_option
from fslm.cli import app
from fslm.config import load_config
from fslm.data import DatasetRecord, read_dataset
from fslm.steps.distill import DistillOptions, distill_records
from fslm.steps.distill.checks import leaks
from fslm.steps.distill.prompts import HINT_NOTE, REFERENCE_NOTE
from fslm.steps.init import InitOptions, init
from fslm.teachers import TeacherOutput

QUESTIONS = [
    ("Which gas do plants take in?", ["oxygen", "carbon dioxide", "helium", "neon"], "B"),
    ("What melts ice?", ["heat", "cold", "darkness", "sound"], "A"),
    ("Which is a planet?", ["the moon", "the sun", "mars", "a comet"], "C"),
    ("What do bees make?", ["milk", "silk", "wool", "honey"], "D"),
]


def write_arc(path: Path) -> Path:
    rows = []
    for i, (stem, texts, key) in enumerate(QUESTIONS):
        choices = [{"text": t, "label": "ABCD"[k]} for k, t in enumerate(texts)]
        rows.append({"id": f"q{i}", "question": {"stem": stem, "choices": choices}, "answerKey": key})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


class ScriptedTeacher:
    """A teacher whose answers are scripted: blind, it knows the gold answer of the questions in `knows`; with the
    hint in its earlier stages' text it always answers right. It records every (system, user) it is asked."""

    id = "scripted"
    batch_size = 8

    def __init__(self, config, knows: set[str], leak_when_noted: bool = False, hopeless: frozenset[str] = frozenset()):
        self.final_role = config.final_stage.role
        self.knows = knows
        self.hopeless = hopeless  # questions it gets wrong even with the hint
        self.leak_when_noted = leak_when_noted
        self.asked: list[tuple[str, str]] = []

    def describe(self):
        return {"backend": "scripted", "id": self.id}

    def prompt_key(self, system, user):
        return system + "\n" + user

    def generate(self, requests, settings, on_result=None, label="teacher"):
        self.asked.extend(requests)
        outs = []
        for system, user in requests:
            stem, texts, key = next(q for q in QUESTIONS if q[0] in user)
            gold = texts["ABCD".index(key)]
            if system == self.final_role:  # the teacher's own answer
                right = stem in self.knows or ("hinted" in user and stem not in self.hopeless)
                text = gold if right else texts[("ABCD".index(key) + 1) % 4]
            elif "Hint for you alone" in user:
                text = f"hinted notes: {gold} fits the question" + (
                    f". The answer is {gold}." if self.leak_when_noted else ""
                )
            elif "reference answer" in user:
                text = f"The answer is {gold}." if self.leak_when_noted else "notes about the question"
            else:
                text = f"notes about {stem}" + (f" seed {settings.seed}" if settings.seed is not None else "")
            outs.append(TeacherOutput(text, 10, 5, True))
            if on_result is not None:
                on_result(len(outs) - 1, outs[-1])
        return outs


@pytest.fixture
def stack_config(tmp_path, tiny_llama):
    init(tmp_path / "stack", InitOptions(base=str(tiny_llama)))
    return load_config(tmp_path / "stack")


def test_multiple_choice_files_read_as_the_evaluation_asks(tmp_path):
    arc = read_dataset(write_arc(tmp_path / "ARC-Easy-Train.jsonl"))
    assert arc.format == "arc" and len(arc.records) == 4
    r = arc.records[0]
    assert r.instruction == "Question: Which gas do plants take in?\nAnswer:"  # lm-eval's ARC prompt
    assert r.reference == "carbon dioxide" and r.gold == 1 and r.choices[1] == "carbon dioxide"
    tsv = tmp_path / "train.tsv"
    tsv.write_text(
        "ID\tQuestion Stem\tChoices\tComplete Question\tAnswer Key\n1-1\tThe sun is\t(A) hot (B) cold\tx\tA\n"
    )
    obqa = read_dataset(tsv)
    assert obqa.format == "openbookqa" and obqa.records[0].instruction == "The sun is"
    assert obqa.records[0].reference == "hot"
    sciq = tmp_path / "train.json"
    sciq.write_text(
        json.dumps(
            [
                {
                    "question": "Q?",
                    "distractor1": "a",
                    "distractor2": "b",
                    "distractor3": "c",
                    "correct_answer": "d",
                    "support": "",
                }
            ]
        )
    )
    rec = read_dataset(sciq).records[0]
    assert rec.reference == "d" and rec.choices[rec.gold] == "d" and sorted(rec.choices) == ["a", "b", "c", "d"]
    mmlu_dir = tmp_path / "mmlu"
    mmlu_dir.mkdir()
    (mmlu_dir / "astronomy_val.csv").write_text('"What is a star?",gas,rock,ice,wood,A\n')
    (mmlu_dir / "biology_val.csv").write_text('"What is a cell?",unit,rock,ice,wood,A\n"Cells?",a,b,c,d,C\n')
    mmlu = read_dataset(mmlu_dir)  # a directory of files is one dataset
    assert mmlu.format == "mmlu" and len(mmlu.records) == 3
    assert mmlu.records[0].reference == "A" and mmlu.records[0].instruction.endswith("D. wood\nAnswer:")
    shards = tmp_path / "shards"
    shards.mkdir()
    for i in range(2):
        (shards / f"part{i}.json").write_text(json.dumps([{"instruction": f"do {i}", "input": "", "output": "ok"}]))
    assert [r.instruction for r in read_dataset(shards / "part*.json").records] == ["do 0", "do 1"]  # a glob


def test_answer_checks_and_leak_guard():
    r = DatasetRecord(
        "Question: gas?\nAnswer:", None, "carbon dioxide", "f", 0, 1, ["oxygen", "carbon dioxide"], 1, "text"
    )
    assert answer_correct("Plants take in carbon dioxide.", r) and not answer_correct("oxygen", r)
    assert chosen_option("oxygen or carbon dioxide", r) is None  # names both: no answer
    assert leaks("So the answer is carbon dioxide.", r) and leaks("As the hint says, it is gas.", r)
    assert not leaks("Plants breathe; carbon dioxide is a gas they use.", r)  # mentions it, does not state it
    m = DatasetRecord("Q\nA. 4\nB. 8\nAnswer:", None, "B", "f", 0, 1, ["4", "8"], 1, "letter")
    assert answer_correct("B", m) and answer_correct("The answer is (B).", m) and not answer_correct("A plant", m)
    assert leaks("the correct answer is B", m) and not leaks("B is a letter between A and C", m)
    free = DatasetRecord("q", None, "Eat a balanced diet with plenty of fruits and vegetables every day.", "f", 0, 1)
    assert leaks("Step one: eat a balanced diet with plenty of fruits and vegetables.", free)
    assert not leaks("Step one: think about diet.", free) and answer_correct("x", free) is None


def test_hidden_policy_checks_answers_and_drops_wrong_ones(tmp_path, stack_config):
    dataset = read_dataset(write_arc(tmp_path / "ARC-Easy-Train.jsonl"))
    teacher = ScriptedTeacher(stack_config, knows={QUESTIONS[0][0], QUESTIONS[1][0]})
    result = distill_records(stack_config, dataset, teacher, tmp_path / "d.jsonl", options=DistillOptions(filters=()))
    assert not any("Hint" in u or "reference answer" in u for _, u in teacher.asked)  # answer-blind throughout
    rows = [json.loads(x) for x in (tmp_path / "d.jsonl").read_text().splitlines()]
    assert [r["reference"] for r in rows] == ["carbon dioxide", "heat"]
    assert all(r["targets"]["answer"] == r["reference"] for r in rows)  # the gold answer, as the eval scores it
    assert result.filtered["wrong"] == 2 and result.lost == 0
    assert result.checks["teacher_blind_accuracy"] == 0.5 and result.checks["retried_with_hint"] == 0


def test_hint_on_retry_rationalises_only_the_wrong_ones(tmp_path, stack_config):
    dataset = read_dataset(write_arc(tmp_path / "ARC-Easy-Train.jsonl"))
    teacher = ScriptedTeacher(stack_config, knows={QUESTIONS[0][0]})
    opts = DistillOptions(filters=(), reference="hint-on-retry")
    result = distill_records(stack_config, dataset, teacher, tmp_path / "d.jsonl", options=opts)
    hinted = [(s, u) for s, u in teacher.asked if "Hint for you alone" in u]
    assert len(hinted) == 3 * 3  # three wrong questions x three earlier stages, once each
    assert all(s != stack_config.final_stage.role for s, _ in hinted)  # never in the final stage's prompt
    assert all(HINT_NOTE.split("{")[0] in u for _, u in hinted)
    rows = {r["reference"]: r for r in map(json.loads, (tmp_path / "d.jsonl").read_text().splitlines())}
    assert len(rows) == 4 and not rows["carbon dioxide"]["checks"]["hinted"] and rows["heat"]["checks"]["hinted"]
    assert rows["heat"]["targets"]["intent"].startswith("hinted notes")
    assert result.checks["retried_with_hint"] == 3 and result.checks["correct_after_hint"] == 3


def test_leak_guard_rejects_copied_references_when_shown(tmp_path, stack_config):
    dataset = read_dataset(write_arc(tmp_path / "ARC-Easy-Train.jsonl"))
    teacher = ScriptedTeacher(stack_config, knows=set(), leak_when_noted=True)
    shown = distill_records(
        stack_config, dataset, teacher, tmp_path / "s.jsonl", options=DistillOptions(reference="shown")
    )
    assert any(REFERENCE_NOTE.split("{")[0] in u for _, u in teacher.asked)
    assert shown.filtered["leak"] == 4 and shown.checks["leak_rate_all_intermediate"] == 1.0
    hidden = distill_records(
        stack_config, dataset, ScriptedTeacher(stack_config, knows={q[0] for q in QUESTIONS}), tmp_path / "h.jsonl"
    )
    assert hidden.filtered["leak"] == 0 and hidden.checks["leak_rate_all_intermediate"] == 0.0 and hidden.written == 4


def test_samples_write_distinct_chains_in_one_group(tmp_path, stack_config):
    dataset = read_dataset(write_arc(tmp_path / "ARC-Easy-Train.jsonl"))
    teacher = ScriptedTeacher(stack_config, knows={q[0] for q in QUESTIONS})
    opts = DistillOptions(filters=(), samples=3)
    result = distill_records(stack_config, dataset, teacher, tmp_path / "d.jsonl", options=opts)
    rows = [json.loads(x) for x in (tmp_path / "d.jsonl").read_text().splitlines()]
    assert result.written == 12 and result.written_records == 4 and result.lost == 0
    assert len({r["id"] for r in rows}) == 12 and len({r["group"] for r in rows}) == 4
    assert {r["sample"] for r in rows} == {0, 1, 2}
    again = distill_records(stack_config, dataset, teacher, tmp_path / "d.jsonl", options=opts)
    assert again.resumed == 4 and again.written == 12  # a rerun finds every record done


def test_multitask_and_on_policy_answer_stage_train_and_run(tmp_path, tiny_llama):
    """CLI end to end on a tiny model: distilled data -> stages (final on the student's own outputs) + multitask."""
    stack = tmp_path / "stack"
    init(stack, InitOptions(base=str(tiny_llama)))
    data = tmp_path / "d.jsonl"
    rows = []
    for i in range(8):
        targets = {"intent": f"wants {i}", "plan": "1. think", "reasoning": f"fact {i}", "answer": f"answer {i}"}
        rows.append({"id": f"r{i}", "instruction": f"Question {i}?", "input": None, "targets": targets})
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    runner = CliRunner()
    common = ["--data", str(data), "--max-steps", "2", "--batch-size", "2"]
    r = runner.invoke(app, ["train", str(stack), *common, "--student-backend", "torch"])
    assert r.exit_code == 0, r.output
    config = load_config(stack)
    answer = config.final_stage.training.model_extra
    assert answer["answer_inputs"] == "student" and answer["student"]["generated"] == 8
    assert config.stage("intent").training.model_extra.get("answer_inputs") is None
    cached = [json.loads(x) for x in (stack / ".fslm-cache" / "student.jsonl").read_text().splitlines()]
    assert len(cached) == 8 and set(cached[0]["outputs"]) == {"intent", "plan", "reasoning"}
    r = runner.invoke(app, ["train", str(stack), *common, "--multitask"])
    assert r.exit_code == 0, r.output
    assert load_config(stack).baselines["multitask"].examples == 7 * 4  # 3 stages + direct; 1 record held out
    r = runner.invoke(
        app, ["run", str(stack), "Question 3?", "--system", "multitask", "--json", "--max-new-tokens", "3"]
    )
    assert r.exit_code == 0, r.output
    trace = json.loads(r.stdout)
    assert [s["adapter"] for s in trace["stages"]] == ["multitask"]


def test_a_retry_that_stays_wrong_is_counted_and_dropped(tmp_path, stack_config):
    """A hinted retry that still answers wrong: counted as retried (not rescued), the record dropped as wrong."""
    dataset = read_dataset(write_arc(tmp_path / "ARC-Easy-Train.jsonl"))
    teacher = ScriptedTeacher(stack_config, knows={QUESTIONS[0][0]}, hopeless=frozenset({QUESTIONS[1][0]}))
    opts = DistillOptions(filters=(), reference="hint-on-retry")
    result = distill_records(stack_config, dataset, teacher, tmp_path / "d.jsonl", options=opts)
    assert result.checks["retried_with_hint"] == 3 and result.checks["correct_after_hint"] == 2
    assert result.filtered["wrong"] == 1
    rejected = [json.loads(x) for x in (tmp_path / "d.jsonl.rejected.jsonl").read_text().splitlines()]
    assert [r["checks"]["retried"] and not r["checks"]["hinted"] for r in rejected] == [True]
