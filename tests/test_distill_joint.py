"""Joint teacher mode (one call per record, every stage a `### Stage` section), options shown to the teacher only,
the options filter, and the per-stage teacher labels the llama.cpp prefix cache is keyed by."""

from __future__ import annotations

import json

import pytest
from test_recipe import QUESTIONS, write_arc
from typer.testing import CliRunner

from fslm.cli import app
from fslm.config import load_config
from fslm.data import DatasetRecord, read_dataset
from fslm.errors import FslmError
from fslm.steps.distill import DistillOptions, distill_records
from fslm.steps.distill.checks import option_references
from fslm.steps.distill.prompts import joint_messages, split_sections
from fslm.steps.init import InitOptions, init
from fslm.teachers import TeacherOutput


@pytest.fixture
def config(tmp_path, tiny_llama):
    init(tmp_path / "stack", InitOptions(base=str(tiny_llama)))
    return load_config(tmp_path / "stack")


def sections(**parts: str) -> str:
    return "\n".join(f"### {name.capitalize()}\n{text}" for name, text in parts.items())


GOOD = {
    "intent": "The user wants the gas plants take in.",
    "plan": "1. Recall photosynthesis. 2. Name the gas.",
    "reasoning": "Plants take in carbon dioxide and give off oxygen.",
}


class JointTeacher:
    """Answers every joint request with a scripted response per question stem (default: well formed, right)."""

    id = "joint-scripted"
    batch_size = 8

    def __init__(self, responses: dict[str, str] | None = None, cut: frozenset[str] = frozenset()):
        self.responses = responses or {}
        self.cut = cut
        self.asked: list[tuple[str, str, str]] = []  # (label, system, user)

    def describe(self):
        return {"backend": "scripted", "id": self.id}

    def prompt_key(self, system, user):
        return system + "\n" + user

    def generate(self, requests, settings, on_result=None, label="teacher"):
        outs = []
        for system, user in requests:
            self.asked.append((label, system, user))
            stem, texts, key = next(q for q in QUESTIONS if q[0] in user)
            gold = texts["ABCD".index(key)]
            if label == "joint":
                text = self.responses.get(stem, sections(**GOOD, answer=gold))
            else:  # a per-stage request (the final answer after a hinted joint chain)
                text = gold
            outs.append(TeacherOutput(text, 30, 20, stem not in self.cut))
            if on_result is not None:
                on_result(len(outs) - 1, outs[-1])
        return outs


def run(config, tmp_path, teacher, **options):
    data = read_dataset(write_arc(tmp_path / "ARC-Easy-Train.jsonl"))
    out = tmp_path / "d.jsonl"
    opts = DistillOptions(teacher_mode="joint", **options)
    result = distill_records(config, data, teacher, out, options=opts)
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    rejected = [json.loads(x) for x in (tmp_path / "d.jsonl.rejected.jsonl").read_text().splitlines()]
    return result, rows, rejected


def test_one_call_per_record_splits_into_stage_targets(config, tmp_path):
    teacher = JointTeacher()
    result, rows, rejected = run(config, tmp_path, teacher, options="shown")
    assert len(teacher.asked) == len(QUESTIONS)  # one teacher call per record, none per stage
    assert {label for label, _, _ in teacher.asked} == {"joint"}
    assert len(rows) == 4 and not rejected and result.lost == 0
    row = next(r for r in rows if "plants" in r["instruction"])
    assert row["targets"]["intent"] == GOOD["intent"] and row["targets"]["plan"] == GOOD["plan"]
    assert row["targets"]["reasoning"] == GOOD["reasoning"]
    assert row["targets"]["answer"] == "carbon dioxide"  # the gold option, as eval scores it
    assert row["checks"]["correct"] is True and row["checks"]["teacher_answer"] == "carbon dioxide"
    # The teacher saw the options; no training target carries them.
    system, user = teacher.asked[0][1], teacher.asked[0][2]
    assert "### Intent" in system and "### Answer" in system and "- carbon dioxide" in user
    assert all("Answer options" not in t for r in rows for t in r["targets"].values())
    manifest = json.loads((tmp_path / "d.jsonl.manifest.json").read_text())
    assert manifest["teacher_mode"] == "joint" and manifest["run"]["options"]["teacher_mode"] == "joint"
    assert manifest["run"]["options"]["options"] == "shown"
    assert set(manifest["target_tokens"]) == {"intent", "plan", "reasoning", "answer"}
    assert manifest["last_run"]["prompt_tokens"] == 4 * 30 and manifest["last_run"]["teacher_calls"] == 4


def test_options_hidden_by_default(config, tmp_path):
    teacher = JointTeacher()
    run(config, tmp_path, teacher)
    assert all("carbon dioxide" not in user for _, _, user in teacher.asked)


@pytest.mark.parametrize(
    "response, detail",
    [
        (sections(intent="i", plan="p", answer="carbon dioxide"), "section 'reasoning' missing"),
        (sections(intent="i", plan="p", reasoning="r", answer="carbon dioxide") + "\n### Plan\nagain", "repeated"),
        ("Sure! Here are the notes.\n" + sections(**GOOD, answer="carbon dioxide"), "text before the first section"),
        (sections(**GOOD, conclusion="x", answer="carbon dioxide"), "unknown section 'Conclusion'"),
        ("carbon dioxide", "no section headers"),
    ],
)
def test_malformed_responses_are_rejected_with_the_reason(config, tmp_path, response, detail):
    teacher = JointTeacher({"Which gas do plants take in?": response})
    result, rows, rejected = run(config, tmp_path, teacher, options="shown")
    assert len(rows) == 3 and len(rejected) == 1 and result.lost == 0
    assert rejected[0]["rejected"]["filter"] == "format" and detail in rejected[0]["rejected"]["detail"]
    assert result.filtered["format"] == 1


def test_a_response_cut_before_its_last_section_says_so(config, tmp_path):
    stem = "Which gas do plants take in?"
    teacher = JointTeacher({stem: sections(intent="i", plan="p", reasoning="Plants take")}, cut=frozenset({stem}))
    _, _, rejected = run(config, tmp_path, teacher, options="shown", trim_cut=False)
    assert rejected[0]["rejected"]["detail"] == "section 'answer' missing (cut at the token limit)"


def test_wrong_answers_and_option_pointers_are_dropped(config, tmp_path):
    teacher = JointTeacher(
        {
            "What melts ice?": sections(**GOOD, answer="cold"),  # wrong
            "Which is a planet?": sections(
                intent="Name the planet.", plan="1. Check each.", reasoning="Option C is right.", answer="mars"
            ),
            "What do bees make?": sections(
                intent="What bees make.", plan="1. Recall.", reasoning="Not milk, not silk, not wool.", answer="honey"
            ),
        }
    )
    result, rows, rejected = run(config, tmp_path, teacher, options="shown")
    why = {r["instruction"].split("\n")[0]: r["rejected"]["filter"] for r in rejected}
    assert why == {
        "Question: What melts ice?": "wrong",
        "Question: Which is a planet?": "options",
        "Question: What do bees make?": "options",
    }
    assert len(rows) == 1
    checks = result.checks["option_references"]
    assert checks == {"chains": 2, "of": 4, "in_written_rows": 0}
    # Without the filter the pointing chains are written, and the manifest counts them.
    (tmp_path / "nofilter").mkdir()
    teacher2 = JointTeacher(teacher.responses)
    result2, rows2, _ = run(config, tmp_path / "nofilter", teacher2, options="shown", filters="empty,overlong")
    assert result2.checks["option_references"]["in_written_rows"] == 2 and len(rows2) == 3


def test_hint_on_retry_in_joint_mode_checks_the_answer_without_the_hint(config, tmp_path):
    wrong = sections(**GOOD, answer="oxygen")
    teacher = JointTeacher({"Which gas do plants take in?": wrong})
    _, rows, rejected = run(config, tmp_path, teacher, options="shown", reference="hint-on-retry")
    # The wrong record was written again (joint, with the hint), then answered by the final stage alone.
    hinted = [u for label, _, u in teacher.asked if label == "joint" and "Hint for you alone" in u]
    finals = [(label, u) for label, _, u in teacher.asked if label == "answer"]
    assert len(hinted) == 1 and len(finals) == 1 and "Hint for you alone" not in finals[0][1]
    row = next(r for r in rows if "plants" in r["instruction"])
    assert row["checks"]["hinted"] is True and row["checks"]["correct"] is True and not rejected


def test_option_references():
    rec = DatasetRecord("Q", None, "oxygen", "f", 0, 1, ["oxygen", "iron", "wood", "salt"], 0, "text")
    for text in ["Option B is wrong.", "So (C).", "B) iron", "the first choice", "none of the options", "iron or wood"]:
        assert option_references(text, rec), text
    for text in ["Oxygen is a gas.", "Vitamin B helps.", "To answer a question, think.", "a choice we make"]:
        assert option_references(text, rec) is None, text
    free = DatasetRecord("Q", None, "x", "f", 0, 1)
    assert option_references("Option B", free) is None  # only multiple-choice records have options


def test_joint_prompt_uses_the_stacks_own_stages(config):
    edited = config.model_copy(deep=True)
    edited.stages[0].brief = "One line: the goal."
    edited.stages[1].brief = None  # a stage without a brief is described by its role
    rec = DatasetRecord("Explain tides.", "for kids", None, "f", 0, 1)
    system, user = joint_messages(edited, rec)
    assert "### Intent\nOne line: the goal." in system and f"### Plan\n{config.stages[1].role}" in system
    assert user == "Request: Explain tides.\nInput: for kids"
    parsed = split_sections("## Intent:\na\n**### Plan**\nb\n### reasoning\nc\n### ANSWER\nd", config)
    assert parsed.problem is None and parsed.targets == {"intent": "a", "plan": "b", "reasoning": "c", "answer": "d"}


def test_cli_flags(config, tmp_path, tiny_llama):
    r = CliRunner().invoke(
        app,
        ["distill", str(write_arc(tmp_path / "a.jsonl")), "--stack", str(tmp_path / "stack"), "--out",
         str(tmp_path / "o.jsonl"), "--teacher-mode", "both"],
    )  # fmt: skip
    assert r.exit_code == 2 and "--teacher-mode" in r.output and "Traceback" not in r.output


def test_word_limits_give_each_section_its_length(config):
    rec = DatasetRecord("Explain tides.", None, None, "f", 0, 1)
    system, _ = joint_messages(config, rec, word_limits=True)
    for stage in config.stages:
        words = int(stage.generation.max_new_tokens * 0.6)
        assert f"{(stage.brief or stage.role).strip()} At most {words} words." in system
    assert "At most" not in joint_messages(config, rec)[0]  # off by default
    # A multiple-choice answer section under --options shown is a copied option: no length to give.
    choice = DatasetRecord("Q?", None, "oxygen", "f", 0, 1, ["oxygen", "iron"], 0, "text")
    system, _ = joint_messages(config, choice, options_shown=True, word_limits=True)
    assert system.count("At most") == len(config.stages) - 1


def test_word_limits_are_part_of_the_run(config, tmp_path):
    teacher = JointTeacher()
    _, rows, _ = run(config, tmp_path, teacher, options="answer", word_limits=True)
    assert rows and all("At most" in system for label, system, _ in teacher.asked if label == "joint")
    answers = [user for label, _, user in teacher.asked if label == "answer"]
    final = config.final_stage.generation.max_new_tokens
    assert answers and all(u.endswith(f"(Write at most {int(final * 0.6)} words.)") for u in answers)
    manifest = json.loads((tmp_path / "d.jsonl.manifest.json").read_text())
    assert manifest["run"]["options"]["word_limits"] is True
    # The same output without word limits is another run: refused, nothing appended.
    with pytest.raises(FslmError, match="word_limits"):
        run(config, tmp_path, JointTeacher(), options="answer")
    assert len((tmp_path / "d.jsonl").read_text().splitlines()) == len(rows)


def test_fit_overlong_keeps_a_long_target_trimmed_to_its_budget(config, tmp_path):
    """A finished reasoning longer than its stage may generate: dropped as overlong by default; with --fit-overlong
    kept, cut at its last full sentence within the budget (student tokens; words here), and the row says so."""
    stem = "Which gas do plants take in?"
    budget = next(s for s in config.stages if s.name == "reasoning").generation.max_new_tokens
    sentences = [" ".join(f"w{i}x{j}" for j in range(9)) + " done." for i in range(budget // 10 + 2)]  # no repetition
    long = " ".join(sentences)
    teacher = JointTeacher({stem: sections(**{**GOOD, "reasoning": long}, answer="carbon dioxide")})
    _, rows, rejected = run(config, tmp_path, teacher, options="shown")
    assert [r["rejected"] for r in rejected] == [{"filter": "overlong", "stage": "reasoning"}]

    teacher = JointTeacher({stem: sections(**{**GOOD, "reasoning": long}, answer="carbon dioxide")})
    (tmp_path / "fit").mkdir()
    result, rows, rejected = run(config, tmp_path / "fit", teacher, options="shown", fit_overlong=True)
    assert not rejected, rejected[0]["rejected"]
    assert len(rows) == 4 and result.checks["fitted_records"] == 1
    row = next(r for r in rows if r["instruction"].startswith(f"Question: {stem}"))
    fitted = row["targets"]["reasoning"]
    assert long.startswith(fitted) and fitted.endswith(".") and budget - 10 < len(fitted.split()) <= budget
    assert row["checks"]["fitted"] == ["reasoning"]
    assert all("fitted" not in r["checks"] for r in rows if r is not row)
    manifest = json.loads((tmp_path / "fit" / "d.jsonl.manifest.json").read_text())
    assert manifest["run"]["options"]["fit_overlong"] is True  # part of the run's identity


def test_refilter_reproduces_a_distilled_file_and_measures_fit_overlong(config, tmp_path):
    """benchmarks/refilter.py: the file's own options give back its rows; --fit-overlong keeps the overlong one."""
    from conftest import load_benchmark

    from fslm import models

    stack = tmp_path / "stack"
    tokenizer = models.load_tokenizer(models.resolve_base(config.base, stack), config.base)

    def count(text):
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    stem = "Which gas do plants take in?"
    budget = next(s for s in config.stages if s.name == "plan").generation.max_new_tokens
    lines = [f"{i}. Check the leaves of plant {i} and name its gas." for i in range(1, budget)]
    n = next(n for n in range(1, budget) if count("\n".join(lines[:n])) > budget)
    plan = "\n".join(lines[: n + 1])  # a line or two over its budget
    teacher = JointTeacher({stem: sections(**{**GOOD, "plan": plan}, answer="carbon dioxide")})
    data = read_dataset(write_arc(tmp_path / "ARC-Easy-Train.jsonl"))
    out = tmp_path / "d.jsonl"
    distill_records(config, data, teacher, out, options=DistillOptions(teacher_mode="joint"), count_tokens=count)
    assert [json.loads(x)["rejected"]["filter"] for x in (tmp_path / "d.jsonl.rejected.jsonl").open()] == ["overlong"]

    report = tmp_path / "refilter.json"
    script = load_benchmark("refilter")
    argv = [str(out), "--stack", str(stack), "--data-dir", str(tmp_path), "--out", str(report)]
    assert script.main([*argv, "--questions-per-hour", "100"]) == 0
    part = json.loads(report.read_text())["parts"][0]
    assert part["reproduces_the_file"] and part["questions"] == 4
    assert part["as_written"]["kept"] == 3 and part["as_written"]["filtered"] == {"overlong": 1}
    assert part["fit_overlong"]["kept"] == 4 and part["fit_overlong"]["fitted_targets"] == {"plan": 1}
    assert json.loads(report.read_text())["total"]["kept_per_hour"] == {"as_written": 75.0, "fit_overlong": 100.0}

    # a file whose rows its own options do not give back (edited by hand): the script says so, exit 1
    rows = out.read_text().splitlines()
    out.write_text("\n".join(rows[:-1]) + "\n")
    moved = {**json.loads(rows[-1]), "rejected": {"filter": "leak", "stage": "plan"}}
    with (tmp_path / "d.jsonl.rejected.jsonl").open("a") as f:
        f.write(json.dumps(moved) + "\n")
    assert script.main(argv) == 1
