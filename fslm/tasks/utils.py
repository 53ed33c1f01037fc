"""Offline loaders and prompt helpers for fslm's lm-eval tasks (`fslm/tasks/*.yaml`).

Each YAML names a loader here as `custom_dataset`; lm-eval calls it with the task metadata, which carries
`data_dir` (set by `fslm eval --data-dir`, or `--metadata '{"data_dir": ...}'` / env FSLM_DATA_DIR with
`fslm lm-eval`) and optionally `subset` + `seed` (a fixed random subset, the same for every system and run) and
`split` (`test`, the default, or `dev`: the task's dev/validation file in DEV_FILES, which tunes the stack's scoring
weights; the loaded split is still called `test` inside lm-eval). Every row carries an `id` that is stable across
runs and subsets (the file's own id, else file + row number), so per-item results of two runs can be paired.
Nothing is fetched from the hub: the files are the layouts described in the shared data README.
"""

from __future__ import annotations

import csv
import json
import os
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


def split_files(split: str) -> dict[str, str]:
    if split not in ("test", "dev"):
        raise ValueError(f"split {split!r}: expected test or dev")
    return FILES if split == "test" else DEV_FILES


def _task_file(kwargs: dict[str, Any], task: str) -> Path:
    split = kwargs.get("split") or "test"
    files = split_files(split)
    if task not in files:
        raise ValueError(f"task {task} has no {split} split in the data layout")
    return _file(kwargs, files[task])


def _data_dir(kwargs: dict[str, Any]) -> Path:
    where = kwargs.get("data_dir") or os.environ.get("FSLM_DATA_DIR")
    if not where:
        raise ValueError("fslm tasks need a data directory: fslm eval --data-dir, or --metadata '{\"data_dir\": ...}'")
    path = Path(where)
    if not path.is_dir():
        raise ValueError(f"{path}: the data directory does not exist")
    return path


def _file(kwargs: dict[str, Any], rel: str) -> Path:
    path = _data_dir(kwargs) / rel
    if not path.is_file():
        raise ValueError(f"{path}: missing (see the data README for the layout)")
    return path


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _dataset(rows: list[dict[str, Any]], kwargs: dict[str, Any]) -> Any:
    """A DatasetDict with one `test` split; a fixed random subset when `subset` is given (seeded, order kept)."""
    import datasets

    subset = kwargs.get("subset")
    if subset and int(subset) < len(rows):
        rng = random.Random(int(kwargs.get("seed", 1234)))
        keep = sorted(rng.sample(range(len(rows)), int(subset)))
        rows = [rows[i] for i in keep]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


# --- loaders (one per task) --------------------------------------------------------------------------


def _arc(path: Path) -> list[dict[str, Any]]:
    rows = []
    for r in _jsonl(path):
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


def arc_rows(path: Path) -> list[dict[str, Any]]:
    """ARC rows (id, question, choices, gold): what the eval scores, and what distillation reads (fslm.choices)."""
    return _arc(path)


def arc_text(doc: dict[str, Any]) -> str:
    """lm-eval's ARC prompt (doc_to_text of fslm_arc_*.yaml)."""
    return f"Question: {doc['question']}\nAnswer:"


def arc_easy(**kwargs: Any) -> Any:
    return _dataset(_arc(_task_file(kwargs, "arc_easy")), kwargs)


def arc_challenge(**kwargs: Any) -> Any:
    return _dataset(_arc(_task_file(kwargs, "arc_challenge")), kwargs)


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


def mmlu(**kwargs: Any) -> Any:
    split = kwargs.get("split") or "test"
    pattern = split_files(split)["mmlu"]
    paths = sorted(_data_dir(kwargs).glob(pattern))
    if not paths:
        raise ValueError(f"{_data_dir(kwargs) / pattern}: no such files")
    return _dataset([row for path in paths for row in mmlu_rows(path)], kwargs)


def mmlu_text(doc: dict[str, Any]) -> str:
    """lm-eval's mmlu prompt, with its per-subject description (lm-eval puts it in `description`)."""
    subject = doc["subject"].replace("_", " ")
    letters = "".join(f"\n{k}. {c}" for k, c in zip("ABCD", doc["choices"], strict=True))
    return (
        f"The following are multiple choice questions (with answers) about {subject}.\n\n"
        f"{doc['question'].strip()}{letters}\nAnswer:"
    )


def _hellaswag_clean(text: str) -> str:
    """lm-eval's hellaswag.preprocess."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag(**kwargs: Any) -> Any:
    rows = []
    for r in _jsonl(_file(kwargs, FILES["hellaswag"])):
        ctx = r["ctx_a"] + " " + r["ctx_b"].capitalize()
        rows.append(
            {
                "id": f"hellaswag:{r['ind']}",
                "query": _hellaswag_clean(r["activity_label"] + ": " + ctx),
                "choices": [_hellaswag_clean(e) for e in r["endings"]],
                "gold": int(r["label"]),
            }
        )
    return _dataset(rows, kwargs)


def winogrande(**kwargs: Any) -> Any:
    rows = [
        {
            "id": f"winogrande:{i}",
            "options": r["context_options"],
            "continuation": r["continuation"],
            "gold": int(r["gold"]),
        }
        for i, r in enumerate(_jsonl(_file(kwargs, FILES["winogrande"])))
    ]
    return _dataset(rows, kwargs)


def winogrande_text(doc: dict[str, Any]) -> int:
    """Partial scoring as in lm-eval: the contexts differ per option, the continuation is shared."""
    return doc["gold"]


def winogrande_choices(doc: dict[str, Any]) -> list[str]:
    return list(doc["options"])


def winogrande_target(doc: dict[str, Any]) -> str:
    return doc["continuation"]


def piqa(**kwargs: Any) -> Any:
    docs = _jsonl(_file(kwargs, "piqa/valid.jsonl"))
    labels = _file(kwargs, "piqa/valid-labels.lst").read_text(encoding="utf-8").split()
    if len(labels) != len(docs):
        raise ValueError(f"piqa: {len(docs)} items but {len(labels)} labels")
    rows = [
        {"id": f"piqa:{d.get('id', i)}", "goal": d["goal"], "choices": [d["sol1"], d["sol2"]], "gold": int(g)}
        for i, (d, g) in enumerate(zip(docs, labels, strict=True))
    ]
    return _dataset(rows, kwargs)


def boolq(**kwargs: Any) -> Any:
    rows = [
        {
            "id": f"boolq:{r.get('idx', i)}",
            "passage": r["passage"],
            "question": r["question"],
            "gold": int(bool(r["label"])),
        }
        for i, r in enumerate(_jsonl(_file(kwargs, FILES["boolq"])))
    ]
    return _dataset(rows, kwargs)


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


def openbookqa(**kwargs: Any) -> Any:
    return _dataset(openbookqa_rows(_task_file(kwargs, "openbookqa")), kwargs)


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


def truthfulqa(**kwargs: Any) -> Any:
    data = json.loads(_file(kwargs, FILES["truthfulqa_mc1"]).read_text(encoding="utf-8"))
    rows = []
    for i, r in enumerate(data):
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
    return _dataset(rows, kwargs)


def truthfulqa_text(doc: dict[str, Any]) -> str:
    return TRUTHFULQA_PRIMER + "\n\nQ: " + doc["question"] + "\nA:"


def truthfulqa_mc2_results(doc: dict[str, Any], results: list[Any]) -> dict[str, float]:
    """lm-eval's mc2: normalised probability mass on the true answers."""
    import numpy as np

    lls = np.array([r[0] for r in results])
    labels = np.array(doc["mc2_labels"])
    p = np.exp(lls - lls.max())
    p_true, p_false = p[labels == 1].sum(), p[labels == 0].sum()
    return {"acc": float(p_true / (p_true + p_false))}


def gsm8k(**kwargs: Any) -> Any:
    rows = [{"id": f"gsm8k:{i}", **r} for i, r in enumerate(_jsonl(_file(kwargs, FILES["gsm8k"])))]
    return _dataset(rows, kwargs)
