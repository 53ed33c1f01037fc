"""The hooks fslm's lm-eval tasks (`*.yaml` here) name as `!function utils.NAME`: loaders and prompt helpers.

Each YAML names a loader here as `custom_dataset`; lm-eval calls it with the task metadata, which carries
`data_dir` (set by `fslm eval --data-dir`, or `--metadata '{"data_dir": ...}'` / env FSLM_DATA_DIR with
`fslm lm-eval`) and optionally `subset` + `seed` (a fixed random subset, the same for every system and run) and
`split` (`test`, the default, or `dev`: the task's dev/validation file in DEV_FILES, which tunes the stack's scoring
weights; the loaded split is still called `test` inside lm-eval). The files themselves are read by
`fslm.benchmark_files`, which distillation uses too; this module only finds them and hands lm-eval a dataset.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

from fslm import benchmark_files as files
from fslm.benchmark_files import mmlu_text, truthfulqa_text
from fslm.errors import FslmError

__all__ = [
    "arc_challenge",
    "arc_easy",
    "boolq",
    "gsm8k",
    "hellaswag",
    "mmlu",
    "mmlu_text",
    "openbookqa",
    "piqa",
    "truthfulqa",
    "truthfulqa_mc2_results",
    "truthfulqa_text",
    "winogrande",
    "winogrande_choices",
    "winogrande_target",
    "winogrande_text",
]


def _data_dir(kwargs: dict[str, Any]) -> Path:
    where = kwargs.get("data_dir") or os.environ.get("FSLM_DATA_DIR")
    if not where:  # FslmError: the CLI shows one line, not lm-eval's traceback
        raise FslmError(
            "fslm tasks need a data directory: set FSLM_DATA_DIR=DIR, or fslm eval --data-dir DIR, or fslm lm-eval "
            '--metadata \'{"data_dir": "DIR"}\''
        )
    path = Path(where)
    if not path.is_dir():
        raise FslmError(f"{path}: the data directory does not exist")
    return path


def _file(kwargs: dict[str, Any], rel: str) -> Path:
    path = _data_dir(kwargs) / rel
    if not path.is_file():
        raise FslmError(f"{path}: missing (see the data README for the layout)")
    return path


def _task_file(kwargs: dict[str, Any], task: str) -> Path:
    split = kwargs.get("split") or "test"
    paths = files.split_files(split)
    if task not in paths:
        raise FslmError(f"task {task} has no {split} split in the data layout")
    return _file(kwargs, paths[task])


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


def arc_easy(**kwargs: Any) -> Any:
    return _dataset(files.arc_rows(_task_file(kwargs, "arc_easy")), kwargs)


def arc_challenge(**kwargs: Any) -> Any:
    return _dataset(files.arc_rows(_task_file(kwargs, "arc_challenge")), kwargs)


def mmlu(**kwargs: Any) -> Any:
    split = kwargs.get("split") or "test"
    pattern = files.split_files(split)["mmlu"]
    paths = sorted(_data_dir(kwargs).glob(pattern))
    if not paths:
        raise FslmError(f"{_data_dir(kwargs) / pattern}: no such files")
    return _dataset([row for path in paths for row in files.mmlu_rows(path)], kwargs)


def hellaswag(**kwargs: Any) -> Any:
    return _dataset(files.hellaswag_rows(_file(kwargs, files.FILES["hellaswag"])), kwargs)


def winogrande(**kwargs: Any) -> Any:
    return _dataset(files.winogrande_rows(_file(kwargs, files.FILES["winogrande"])), kwargs)


def piqa(**kwargs: Any) -> Any:
    return _dataset(files.piqa_rows(_file(kwargs, files.PIQA_DOCS), _file(kwargs, files.PIQA_LABELS)), kwargs)


def boolq(**kwargs: Any) -> Any:
    return _dataset(files.boolq_rows(_file(kwargs, files.FILES["boolq"])), kwargs)


def openbookqa(**kwargs: Any) -> Any:
    return _dataset(files.openbookqa_rows(_task_file(kwargs, "openbookqa")), kwargs)


def truthfulqa(**kwargs: Any) -> Any:
    return _dataset(files.truthfulqa_rows(_file(kwargs, files.FILES["truthfulqa_mc1"])), kwargs)


def gsm8k(**kwargs: Any) -> Any:
    return _dataset(files.gsm8k_rows(_file(kwargs, files.FILES["gsm8k"])), kwargs)


# --- how lm-eval reads a document ---------------------------------------------------------------------


def winogrande_text(doc: dict[str, Any]) -> int:
    """Partial scoring as in lm-eval: the contexts differ per option, the continuation is shared."""
    return doc["gold"]


def winogrande_choices(doc: dict[str, Any]) -> list[str]:
    return list(doc["options"])


def winogrande_target(doc: dict[str, Any]) -> str:
    return doc["continuation"]


def truthfulqa_mc2_results(doc: dict[str, Any], results: list[Any]) -> dict[str, float]:
    """lm-eval's mc2: normalised probability mass on the true answers."""
    import numpy as np

    lls = np.array([r[0] for r in results])
    labels = np.array(doc["mc2_labels"])
    p = np.exp(lls - lls.max())
    p_true, p_false = p[labels == 1].sum(), p[labels == 0].sum()
    return {"acc": float(p_true / (p_true + p_false))}
