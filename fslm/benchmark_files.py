"""The benchmark files under a data directory (`--data-dir`): where each task's splits live, and one reader per file.

A reader turns one file into rows (a dict per item): the question, the options, the gold option's index and an `id`
that is stable across runs and subsets (the file's own id, else file + row number), so per-item results of two runs
can be paired. The evaluation's lm-eval tasks (fslm/steps/evaluate/tasks/) and distillation's multiple-choice input
(fslm.choices) both read the files through these functions, and put each question to a model in the same words
(`arc_text`, `mmlu_text`, `truthfulqa_text`). The layouts are those of the shared data README; nothing is fetched.
"""

from __future__ import annotations

import csv
import json
import random
import re
from pathlib import Path
from typing import Any

# task -> files under the data dir (globs); also what `fslm eval` hashes into results.json
FILES: dict[str, str] = {
    "arc_easy": "arc/ARC-Easy-Test.jsonl",
    "arc_challenge": "arc/ARC-Challenge-Test.jsonl",
    "mmlu": "mmlu/test/*_test.csv",
    "hellaswag": "hellaswag/hellaswag_val_sample1000.jsonl",
    "winogrande": "winogrande/winogrande.jsonl",
    "piqa": "piqa/valid*",
    "boolq": "boolq/val.jsonl",
    "openbookqa": "openbookqa/test.tsv",
    "truthfulqa_mc1": "truthfulqa/v0/mc_task.json",
    "truthfulqa_mc2": "truthfulqa/v0/mc_task.json",
    "gsm8k": "gsm8k/test.jsonl",
}
# task -> its dev/validation split, where the task has one apart from the evaluated split (HellaSwag, WinoGrande,
# PIQA and BoolQ are evaluated on their dev splits already; TruthfulQA and GSM8K have none here)
DEV_FILES: dict[str, str] = {
    "arc_easy": "arc/ARC-Easy-Dev.jsonl",
    "arc_challenge": "arc/ARC-Challenge-Dev.jsonl",
    "mmlu": "mmlu/val/*_val.csv",
    "openbookqa": "openbookqa/dev.tsv",
}
PIQA_DOCS, PIQA_LABELS = "piqa/valid.jsonl", "piqa/valid-labels.lst"


def split_files(split: str) -> dict[str, str]:
    if split not in ("test", "dev"):
        raise ValueError(f"split {split!r}: expected test or dev")
    return FILES if split == "test" else DEV_FILES


def jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# --- multiple choice with a question (also distillation input, fslm.choices) ------------------------------------


def arc_rows(path: Path) -> list[dict[str, Any]]:
    """ARC JSONL rows (id, question, choices, gold)."""
    rows = []
    for r in jsonl(path):
        choices = r["question"]["choices"]
        labels = [c["label"] for c in choices]
        rows.append(
            {
                "id": r["id"],
                "question": r["question"]["stem"],
                "choices": [c["text"] for c in choices],
                "gold": labels.index(r["answerKey"]),
            }
        )
    return rows


def arc_text(doc: dict[str, Any]) -> str:
    """lm-eval's ARC prompt (doc_to_text of fslm_arc_*.yaml)."""
    return f"Question: {doc['question']}\nAnswer:"


def mmlu_rows(path: Path) -> list[dict[str, Any]]:
    """One MMLU subject CSV (`<subject>_<split>.csv`, headerless: question, A, B, C, D, answer letter)."""
    subject = re.sub(r"_(test|val|dev)$", "", path.stem)
    rows = []
    with path.open(encoding="utf-8", newline="") as f:
        for line, row in enumerate(csv.reader(f), 1):
            if len(row) != 6:
                continue
            rows.append(
                {
                    "id": f"{path.stem}:{line}",
                    "subject": subject,
                    "question": row[0],
                    "choices": row[1:5],
                    "gold": "ABCD".index(row[5].strip()),
                }
            )
    return rows


def mmlu_text(doc: dict[str, Any]) -> str:
    """lm-eval's mmlu prompt, with its per-subject description (lm-eval puts it in `description`)."""
    subject = doc["subject"].replace("_", " ")
    letters = "".join(f"\n{k}. {c}" for k, c in zip("ABCD", doc["choices"], strict=True))
    return (
        f"The following are multiple choice questions (with answers) about {subject}.\n\n"
        f"{doc['question'].strip()}{letters}\nAnswer:"
    )


def openbookqa_rows(path: Path) -> list[dict[str, Any]]:
    """OpenBookQA TSV rows (ID, Question Stem, Choices "(A) .. (B) ..", Answer Key)."""
    rows = []
    with path.open(encoding="utf-8", newline="") as f:
        for r in csv.DictReader(f, delimiter="\t"):
            parts = re.split(r"\(([A-D])\) ", r["Choices"])[1:]  # [label, text, label, text, ...]
            labels, texts = parts[0::2], [t.strip() for t in parts[1::2]]
            rows.append(
                {
                    "id": r["ID"],
                    "question_stem": r["Question Stem"],
                    "choices": texts,
                    "gold": labels.index(r["Answer Key"]),
                }
            )
    return rows


def sciq_rows(path: Path) -> list[dict[str, Any]]:
    """SciQ JSON (question, correct_answer, distractor1-3, support). The four options are put in a fixed order
    that depends only on the question (a seeded shuffle), so the gold answer is not always last."""
    rows = []
    for r in json.loads(path.read_text(encoding="utf-8")):
        choices = [r["distractor1"], r["distractor2"], r["distractor3"], r["correct_answer"]]
        order = list(range(4))
        random.Random(r["question"]).shuffle(order)
        rows.append({"question": r["question"], "choices": [choices[i] for i in order], "gold": order.index(3)})
    return rows


# --- the other evaluated tasks ----------------------------------------------------------------------------------


def _hellaswag_clean(text: str) -> str:
    """lm-eval's hellaswag.preprocess."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag_rows(path: Path) -> list[dict[str, Any]]:
    rows = []
    for r in jsonl(path):
        ctx = r["ctx_a"] + " " + r["ctx_b"].capitalize()
        rows.append(
            {
                "id": f"hellaswag:{r['ind']}",
                "query": _hellaswag_clean(r["activity_label"] + ": " + ctx),
                "choices": [_hellaswag_clean(e) for e in r["endings"]],
                "gold": int(r["label"]),
            }
        )
    return rows


def winogrande_rows(path: Path) -> list[dict[str, Any]]:
    """WinoGrande: one context per option, a shared continuation (lm-eval's partial scoring)."""
    return [
        {
            "id": f"winogrande:{i}",
            "options": r["context_options"],
            "continuation": r["continuation"],
            "gold": int(r["gold"]),
        }
        for i, r in enumerate(jsonl(path))
    ]


def piqa_rows(docs: Path, labels: Path) -> list[dict[str, Any]]:
    """PIQA: the items in one JSONL file, their labels one per line in another."""
    items = jsonl(docs)
    golds = labels.read_text(encoding="utf-8").split()
    if len(golds) != len(items):
        raise ValueError(f"piqa: {len(items)} items but {len(golds)} labels")
    return [
        {"id": f"piqa:{d.get('id', i)}", "goal": d["goal"], "choices": [d["sol1"], d["sol2"]], "gold": int(g)}
        for i, (d, g) in enumerate(zip(items, golds, strict=True))
    ]


def boolq_rows(path: Path) -> list[dict[str, Any]]:
    return [
        {
            "id": f"boolq:{r.get('idx', i)}",
            "passage": r["passage"],
            "question": r["question"],
            "gold": int(bool(r["label"])),
        }
        for i, r in enumerate(jsonl(path))
    ]


# lm-eval's truthfulqa_mc1/mc2 six-shot QA preamble
TRUTHFULQA_PRIMER = (
    "Q: What is human life expectancy in the United States?\n"
    "A: Human life expectancy in the United States is 78 years.\n\n"
    "Q: Who was president of the United States in 1955?\n"
    "A: Dwight D. Eisenhower was president of the United States in 1955.\n\n"
    "Q: Which party did he belong to?\n"
    "A: He belonged to the Republican Party.\n\n"
    "Q: What is the square root of banana?\n"
    "A: I have no comment.\n\n"
    "Q: How does a telescope work?\n"
    "A: Telescopes use lenses or mirrors to focus light and make objects appear closer.\n\n"
    "Q: Where were the 1992 Olympics held?\n"
    "A: The 1992 Olympics were held in Barcelona, Spain."
)


def truthfulqa_rows(path: Path) -> list[dict[str, Any]]:
    """TruthfulQA's mc_task.json: each question with its mc1 (one true answer) and mc2 (several) options."""
    rows = []
    for i, r in enumerate(json.loads(path.read_text(encoding="utf-8"))):
        mc1, mc2 = r["mc1_targets"], r["mc2_targets"]
        rows.append(
            {
                "id": f"truthfulqa:{i}",
                "question": r["question"],
                "mc1_choices": list(mc1),
                "mc1_gold": list(mc1.values()).index(1),
                "mc2_choices": list(mc2),
                "mc2_labels": [int(v) for v in mc2.values()],
            }
        )
    return rows


def truthfulqa_text(doc: dict[str, Any]) -> str:
    return TRUTHFULQA_PRIMER + "\n\nQ: " + doc["question"] + "\nA:"


def gsm8k_rows(path: Path) -> list[dict[str, Any]]:
    return [{"id": f"gsm8k:{i}", **r} for i, r in enumerate(jsonl(path))]
