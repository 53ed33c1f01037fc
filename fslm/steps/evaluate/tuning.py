"""The stack's ensemble weight λ or gate threshold τ, tuned per task on its dev split before the test items run."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from fslm.benchmark_files import DEV_FILES
from fslm.events import EventHandler, Progress, emit
from fslm.steps.evaluate.checks import hash_files
from fslm.steps.evaluate.harness import run_lm_eval, task_manager
from fslm.steps.evaluate.options import EvalOptions
from fslm.steps.evaluate.scoring import tune_threshold, tune_weight

log = logging.getLogger("fslm")


def tune_on_dev(
    loaded: Any,
    runner: Any,
    options: EvalOptions,
    on_event: EventHandler | None = None,
    stage_log: Path | None = None,
    stage_log_key: str = "",
) -> dict[str, dict[str, Any]]:
    """λ (ensemble) or τ (gate) per task, from every path's scores on a seeded subset of the task's dev split.

    The stack scores each dev question on the direct path and on the chains the mode uses (all of them: the value
    is not known yet); a grid of values is then evaluated offline on those scores (fslm/steps/evaluate/scoring.py).
    The test items are never seen here. The dev chains' stage texts go to `stage_log` as they are written (under
    `stage_log_key`), so a tuning killed half-way resumes without writing them again."""
    from fslm.steps.evaluate.lm_eval_model import FslmLM  # imports lm-eval: only when a row runs

    def report(what: str, n: int, total: int) -> None:
        emit(on_event, Progress("eval", f"tune on dev: {what}", n, total))

    lm = FslmLM.for_options(loaded, options, report, stages=runner, stage_log=stage_log, stage_log_key=stage_log_key)
    start = time.perf_counter()
    try:
        result = run_lm_eval(
            lm, [f"fslm_{t}" for t in options.tasks], task_manager(options, "dev", options.tune_limit), options.seed
        )
    finally:
        lm.close()
    tuned = {}
    for t in options.tasks:
        samples = sorted(result["samples"][f"fslm_{t}"], key=lambda s: s["doc_id"])
        questions = [lm.records[(f"fslm_{t}", s["doc_id"])] for s in samples]
        golds = [int(s["doc"]["gold"]) for s in samples]
        if options.stack_scoring == "ensemble":
            choice = tune_weight(questions, golds)
        else:
            choice = tune_threshold(questions, golds, max_chain_rate=options.gate_max_chain_rate)
        tuned[t] = {
            "parameter": "ensemble_weight" if options.stack_scoring == "ensemble" else "gate_threshold",
            **choice,
            "split": DEV_FILES[t],
            "data_hash": hash_files(options.data_dir, DEV_FILES[t], t),
            "n": len(samples),
            "limit": options.tune_limit,
            "seed": options.seed,
        }
    log.info(
        "tuned on dev in %.0f s: %s",
        time.perf_counter() - start,
        ", ".join(f"{t} {v['parameter']}={v['value']}" for t, v in tuned.items()),
    )
    return tuned
