"""lm-evaluation-harness as `fslm eval` calls it: fslm's offline tasks (tasks/, they read --data-dir), one
`simple_evaluate` per system with every seed pinned, and lm-eval's own chatter kept off the screen."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fslm.errors import FslmError
from fslm.steps.evaluate.options import EvalOptions

TASKS_DIR = Path(__file__).parent / "tasks"
# Where fslm's tasks find their data when no `data_dir` is given (`fslm eval --data-dir` defaults to it too).
DATA_DIR_ENV = "FSLM_DATA_DIR"


@contextlib.contextmanager
def quiet_lm_eval() -> Iterator[None]:
    """Keep lm-eval's own chatter off fslm eval's screen, which shows one progress bar per system instead.

    lm-eval (0.4.13) prints, per task and system, a warning about `--metadata` (fslm's tasks take their data
    directory that way on purpose), a tqdm bar while it builds requests, and git's "fatal: not a git repository"
    when run outside a repository (it records the cwd's commit; fslm records versions itself). Its errors still show.
    """
    import lm_eval.api.task as task_module
    import lm_eval.evaluator as evaluator_module

    logger = logging.getLogger("lm_eval")
    level, tqdm, git_hash = logger.level, task_module.tqdm, evaluator_module.get_git_commit_hash
    logger.setLevel(logging.ERROR)
    task_module.tqdm = functools.partial(tqdm, disable=True)
    evaluator_module.get_git_commit_hash = lambda: None
    try:
        yield
    finally:
        logger.setLevel(level)
        task_module.tqdm, evaluator_module.get_git_commit_hash = tqdm, git_hash


def run_lm_eval(lm: Any, tasks: list[str], manager: Any, seed: int) -> dict[str, Any]:
    import lm_eval

    with quiet_lm_eval():
        return lm_eval.simple_evaluate(
            model=lm,
            tasks=tasks,
            task_manager=manager,
            num_fewshot=None,
            log_samples=True,  # per-item correctness for the paired statistics
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )


def task_manager(options: EvalOptions, split: str = "test", limit: int | None = None) -> Any:
    from lm_eval.tasks import TaskManager

    metadata = {"data_dir": str(options.data_dir.resolve()), "subset": limit, "seed": options.seed, "split": split}
    return TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata=metadata)


def fslm_tasks() -> list[str]:
    """The names of fslm's offline lm-eval tasks (one YAML each in tasks/, named as its task)."""
    return sorted(p.stem for p in TASKS_DIR.glob("fslm_*.yaml"))


def check_lm_eval_args(argv: list[str]) -> None:
    """What `fslm lm-eval ARGS` can tell wrong before lm-eval starts (and loads a model): an fslm task name that does
    not exist, and fslm's tasks without a data directory (neither `data_dir` in --metadata nor $FSLM_DATA_DIR)."""
    ours = [t for t in _task_args(argv) if t.startswith("fslm_")]
    known = fslm_tasks()
    unknown = [t for t in ours if t not in known and not any(c in t for c in "*?[/")]
    if unknown:
        raise FslmError(f"--tasks: no task {', '.join(unknown)} (fslm's offline tasks: {', '.join(known)})")
    where = os.environ.get(DATA_DIR_ENV)
    if ours and not where and not any("data_dir" in a for a in argv):
        raise FslmError(
            f"--tasks {ours[0]}: fslm's tasks read a benchmark data directory: set {DATA_DIR_ENV}=DIR or pass "
            '--metadata \'{"data_dir": "DIR"}\''
        )
    if ours and where and not any("data_dir" in a for a in argv) and not Path(where).is_dir():
        raise FslmError(f"{where}: ${DATA_DIR_ENV} is not a directory")


@contextlib.contextmanager
def only_fslm_tasks(argv: list[str]) -> Iterator[None]:
    """When every task `fslm lm-eval ARGS` names is one of fslm's, lm-eval indexes fslm's tasks alone, as `fslm eval`
    does: its CLI reads its own ~14,000 task files first, whatever is asked (15-18 s on 2 busy cores), for nothing here."""
    names = _task_args(argv)
    if not names or not set(names) <= set(fslm_tasks()):
        yield
        return
    import lm_eval.tasks as tasks_module

    everything = tasks_module.TaskManager

    class FslmTaskManager(everything):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **{**kwargs, "include_defaults": False})

    tasks_module.TaskManager = FslmTaskManager
    try:
        yield
    finally:
        tasks_module.TaskManager = everything


def _task_args(argv: list[str]) -> list[str]:
    """The task names of lm-eval's `--tasks A,B C` / `-t A` / `--tasks=A` (space or comma separated)."""
    names: list[str] = []
    taking = False
    for a in argv:
        if a.startswith("-"):
            taking = a in ("--tasks", "-t")
            key, _, value = a.partition("=")
            if key in ("--tasks", "-t") and value:
                names += value.split(",")
            continue
        if taking:
            names += a.split(",")
    return [n.strip() for n in names if n.strip()]
