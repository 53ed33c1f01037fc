"""lm-evaluation-harness as `fslm eval` calls it: fslm's offline tasks (tasks/, they read --data-dir), one
`simple_evaluate` per system with every seed pinned, and lm-eval's own chatter kept off the screen."""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fslm.steps.evaluate.options import EvalOptions

TASKS_DIR = Path(__file__).parent / "tasks"


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
