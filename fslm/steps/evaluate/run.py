"""`fslm eval`: base vs single adapter vs stack on offline benchmarks, through lm-evaluation-harness.

One `Stack` is loaded once on PyTorch (it scores); each system is an `FslmLM` view of it (lm_eval_model.py), and the
stack's stages 1..N-1 generate on the stage backend (stages.py: llama.cpp or a server when available). The tasks are
the offline YAMLs shipped in tasks/ (they read --data-dir). Every system sees the same seeded subset of items;
lm-eval's per-sample log gives each system's per-item correctness, from which every pair of systems gets a paired
difference with a bootstrap interval and McNemar's test (stats.py). The stack's ensemble and gate modes tune their
weight on each task's dev split first (tuning.py, scoring.py). Each finished system is saved under REPORT/systems/
(keyed by the options it depends on, rows.py: a stack-only option never recomputes the base row), and the stack's
stage texts are appended there as they are generated, so a killed run resumes where it stopped. What is checked
before a model loads is checks.py; what is written at the end, report.py.
"""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path
from typing import Any

from fslm.events import EventHandler, Progress, emit
from fslm.files import atomic_write_text, check_dir_target
from fslm.stack import Stack
from fslm.stackdir import StackDir
from fslm.steps.evaluate.checks import check_options, contamination_warnings, task_hashes
from fslm.steps.evaluate.harness import run_lm_eval, task_manager
from fslm.steps.evaluate.options import GENERATIVE, EvalOptions, EvalResult, tuning_needed
from fslm.steps.evaluate.report import results_json, write_report
from fslm.steps.evaluate.rows import (
    chain_key,
    row_key,
    row_name,
    setup,
    stack_details,
    system_row,
    tuning_chains_key,
)
from fslm.steps.evaluate.stages import load_stage_stack, resolve, stage_agreement
from fslm.steps.evaluate.tuning import tune_on_dev

log = logging.getLogger("fslm")


def evaluate(
    stack: str | Path, out: str | Path, options: EvalOptions, on_event: EventHandler | None = None
) -> EvalResult:
    """Run every system on every task; write results.json, report.md and accuracy_vs_cost.png under `out`."""
    directory, out = Path(stack), Path(out)
    check_dir_target(out, "--out")
    rows = check_options(directory, options)
    run = _Evaluation(directory, out, options, rows, on_event)
    try:
        systems = {row_name(system, ablated): run.row(system, ablated) for system, ablated in rows}
        results = results_json(directory, systems, run.setup, options, run.tuning, run.warnings)
        write_report(out, results)
    finally:
        run.close()
    return EvalResult(out=out, results=results)


class _Evaluation:
    """One `fslm eval` run: the setup every row is keyed by, the rows saved by an earlier run, and what loads at
    first need (the scoring stack, the stage stack, the dev-split tuning)."""

    def __init__(
        self,
        directory: Path,
        out: Path,
        options: EvalOptions,
        rows: list[tuple[str, str | None]],
        on_event: EventHandler | None,
    ) -> None:
        self.directory, self.options, self.on_event = directory, options, on_event
        self.stack_dir = StackDir(directory)
        has_stack = any(s == "stack" for s, _ in rows)
        stage_backend = resolve(self.stack_dir, options.stage_backend) if has_stack else "none"
        data_hashes = {t: task_hashes(options.data_dir, t, options.split) for t in options.tasks}
        self.warnings = contamination_warnings(directory, options) if options.split == "test" else []
        for w in self.warnings:
            log.warning(w)
        self.setup = setup(directory, options, stage_backend, data_hashes)
        self.stage_names = self.stack_dir.load().stage_names
        self.stack_key = row_key(self.setup, "stack", self.stage_names)
        self.saved = out / "systems"
        self.saved.mkdir(parents=True, exist_ok=True)
        self.loaded: Stack | None = None
        self.runner: Stack | None = None
        self.tuning = self._saved_tuning()
        self.manager = task_manager(options, options.split, options.limit)
        self.gen_tasks = [t for t in options.tasks if options.generative and t in GENERATIVE]
        if options.generative and not self.gen_tasks:
            log.warning(
                "--generative: none of %s has a generative variant (%s)",
                ", ".join(options.tasks),
                ", ".join(GENERATIVE),
            )

    def row(self, system: str, ablated: str | None) -> dict[str, Any]:
        """One system's row: read back when an earlier run saved it under the same key, else scored now and saved."""
        name = row_name(system, ablated)
        done = self.saved / f"{name}.json"
        key = row_key(self.setup, system, self.stage_names)
        if done.is_file():
            previous = json.loads(done.read_text(encoding="utf-8"))
            if previous.get("key") == key:
                log.info("%s: already evaluated (%s), reusing", name, done)
                return previous["result"]
        lm = self._model(system, ablated, name, key)
        start = time.perf_counter()
        task_names = [f"fslm_{t}" for t in self.options.tasks] + [f"fslm_{t}_gen" for t in self.gen_tasks]
        result = run_lm_eval(lm, task_names, self.manager, self.options.seed)
        seconds = time.perf_counter() - start + lm.resumed_seconds
        backend = self.setup.get("backend", "torch")  # a llama.cpp row computes in its GGUF's own formats
        precision = self.setup["precision"] if backend == "torch" else f"{backend}: the model file's own formats"
        row = system_row(lm, result, self.options.tasks, self.gen_tasks, seconds, precision)
        del result  # the per-sample log holds every request; keep only the per-item records
        if system == "stack":
            row.update(stack_details(lm, self.setup, self.tuning, self.options))
            if self.options.stage_check and self.runner is not self.loaded:
                row["stage_agreement"] = _stage_agreement(lm, self.loaded, self.options)
        row["items"] = row.pop("items")  # last: the per-item lists are long
        atomic_write_text(done, json.dumps({"key": key, "result": row}) + "\n")
        lm.close()
        return row

    def _model(self, system: str, ablated: str | None, name: str, key: str) -> Any:
        """The system as an lm-eval model over the one scoring stack (loaded, with the stage stack and the tuning
        the stack rows need, at first need)."""
        from fslm.steps.evaluate.lm_eval_model import FslmLM  # imports lm-eval (slow): only when a row runs

        options = self.options
        if self.loaded is None:
            self.loaded = Stack.load(self.directory, backend=options.backend or "torch")
            self.loaded.backend.set_precision(self.setup["precision"], "eval scoring")
        if system == "stack" and self.runner is None:
            self.runner = load_stage_stack(self.stack_dir, self.setup["stage_backend"], self.loaded)
        if system == "stack" and tuning_needed(options) and not self.tuning:
            self.tuning = tune_on_dev(
                self.loaded,
                self.runner,
                options,
                self.on_event,
                stage_log=self.saved / "tuning.stages.jsonl",
                stage_log_key=tuning_chains_key(self.setup, self.stage_names, options),
            )
            tuning = json.dumps({"key": self.stack_key, "tuning": self.tuning}, indent=2)
            atomic_write_text(self.saved / "tuning.json", tuning + "\n")

        def report(what: str, n: int, total: int) -> None:
            emit(self.on_event, Progress("eval", f"{name}: {what}", n, total))

        tuned = {f"fslm_{t}": v["value"] for t, v in self.tuning.items()} or None
        return FslmLM.for_options(
            self.loaded,
            options,
            report,
            system=system,
            stages=self.runner,
            ablate=ablated,
            weight=options.ensemble_weight if options.ensemble_weight is not None else tuned,
            threshold=options.gate_threshold if options.gate_threshold is not None else tuned,
            gen_tokens=options.gen_tokens,
            stage_log=self.saved / f"{name}.stages.jsonl" if system == "stack" else None,
            stage_log_key=key,
            chain_key=chain_key(self.setup, self.stage_names),
            chains_from=options.chains_from / "systems" / "stack.stages.jsonl"
            if options.chains_from is not None and system == "stack"
            else None,
        )

    def _saved_tuning(self) -> dict[str, Any]:
        """λ / τ tuned by an earlier run of the same stack setup."""
        tuning_file = self.saved / "tuning.json"
        if tuning_file.is_file():
            previous = json.loads(tuning_file.read_text(encoding="utf-8"))
            if previous.get("key") == self.stack_key:
                return previous["tuning"]
        return {}

    def close(self) -> None:
        """Free the stage backend when it is not the scoring stack's own."""
        if self.runner is not None and self.runner is not self.loaded:
            self.runner.backend.close()


def _stage_agreement(lm: Any, reference: Any, options: EvalOptions) -> dict[str, Any]:
    """Greedy stage text of the fast path vs PyTorch on a seeded sample of the questions this row ran."""
    greedy = lm.greedy_outputs()
    pool = sorted(greedy) or sorted({c for c, _ in lm.prefix_cache})
    chosen = sorted(random.Random(options.seed).sample(pool, min(options.stage_check, len(pool))))
    if not chosen:
        return {"questions": 0}
    update = {"max_new_tokens": options.stage_tokens} if options.stage_tokens else {}
    n = len(reference.config.stages) - 1
    fast_outputs = [greedy[c] for c in chosen] if all(c in greedy for c in chosen) else None
    return stage_agreement(
        lm.stages,
        reference,
        [c.strip() for c in chosen],
        lm.adapters,
        n,
        update,
        fast_outputs=fast_outputs,
        batch=options.batch_size,
    )
