"""`fslm quickstart`: the whole pipeline on the embedded default model, offline (how long: the README's figure).

It composes the library's steps (init -> distill -> train -> run -> evaluate) with small settings, on data shipped
inside the package (`fslm/samples/`, see its NOTICE.md). Rerunning the same command continues where a killed run
stopped: distill resumes from its cache, finished adapters are kept, and the evaluation reuses finished rows.
Progress goes out as events (`step="quickstart"` for the five steps, and each step's own events); the CLI draws them.
"""

from __future__ import annotations

import csv
import logging
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import Field

from fslm import models
from fslm.backends.choose import llamacpp_runs
from fslm.config import update_config
from fslm.errors import FslmError
from fslm.events import EventHandler, Progress, emit
from fslm.files import atomic_write_text, sha256_file
from fslm.options import Options, Result
from fslm.stack import Stack, Trace
from fslm.stackdir import SINGLE, StackDir
from fslm.steps.distill import DistillOptions, distill
from fslm.steps.evaluate import EvalOptions, EvalResult, evaluate
from fslm.steps.export import refresh
from fslm.steps.init import InitOptions, init
from fslm.steps.train import TrainOptions, train
from fslm.teachers import TeacherSpec

INSTRUCTION = "Give three tips for staying healthy."
log = logging.getLogger("fslm")


class QuickstartOptions(Options):
    """Sizes that keep the quickstart to minutes on 2 CPU cores (README.md has the measured time)."""

    records: int = Field(16, ge=1, description="Instructions distilled from the shipped Self-Instruct seed tasks.")
    teacher_tokens: int = Field(
        48, ge=1, description="New tokens per stage: the teacher's, and the stack's own budgets in stack.yaml."
    )
    train_steps: int = Field(8, ge=1, description="Optimizer steps per adapter (4 stages + the single baseline).")
    batch_size: int = Field(4, ge=1, description="Training batch size.")
    eval_items: int = Field(20, ge=1, description="Shipped MMLU validation items scored by each system.")
    stage_tokens: int = Field(24, ge=1, description="New tokens of stages 1..N-1 during the evaluation.")
    base: str = Field(models.DEFAULT_BASE, description="Base model (and teacher): alias, HF directory or .gguf.")
    teacher_backend: str = Field("llamacpp", description="Teacher backend: llamacpp (needs a GGUF base) or torch.")
    filters: str = Field("empty,overlong,repetition", description="distill's quality filters (comma list or none).")


class QuickstartResult(Result):
    """Where the quickstart wrote the stack, its data and its report, the run it showed, and the evaluation."""

    stack: Path
    data: Path
    report: Path
    eval_data: Path
    trace: Trace
    evaluation: EvalResult

    @property
    def paths(self) -> dict[str, Path]:
        return {"stack": self.stack, "data": self.data, "report": self.report, "eval data": self.eval_data}


def sample_path(name: str) -> Path:
    return Path(str(resources.files("fslm.samples").joinpath(name)))


def write_eval_data(target: Path) -> Path:
    """Lay the shipped MMLU validation sample out as the offline mmlu task reads it (`mmlu/test/*_test.csv`).

    The items are validation items (never test items): the folder name is only the layout the task expects.
    """
    rows: dict[str, list[list[str]]] = {}
    with open(sample_path("mmlu_val_sample.csv"), newline="", encoding="utf-8") as f:
        for subject, *row in csv.reader(f):
            rows.setdefault(subject, []).append(row)
    folder = target / "mmlu" / "test"
    folder.mkdir(parents=True, exist_ok=True)
    for subject, items in rows.items():
        path = folder / f"{subject}_test.csv"
        if not path.exists():
            with open(path, "w", newline="", encoding="utf-8") as f:
                csv.writer(f).writerows(items)
    atomic_write_text(
        target / "README.md",
        "MMLU *validation* items shipped with fslm (fslm/samples/NOTICE.md), laid out as `mmlu/test/*_test.csv`\n"
        "because that is the layout the offline mmlu task reads. They are not MMLU test items.\n",
    )
    return target


def trained_on(stack: StackDir, names: list[str], data_sha: str) -> bool:
    """Every named adapter exists and was trained on this data (so a rerun can skip it)."""
    config = stack.load()
    for name in names:
        record = stack.training(config, name)
        if not stack.is_trained(name) or record is None or record.data_sha256 != data_sha:
            return False
    return True


def train_all(stack: StackDir, data: Path, options: TrainOptions, on_event: EventHandler | None = None) -> None:
    """Train every stage, then the single baseline, skipping what is already trained on this data.

    An interrupted run leaves checkpoints in the stack's training state: continue from them, and start afresh only
    when they belong to another run (train refuses to resume those).
    """
    sha = sha256_file(data)
    stages = stack.load().stage_names
    for single, names in ((False, stages), (True, [SINGLE])):
        if trained_on(stack, names, sha):
            log.info("adapters %s already trained on this data: kept", ", ".join(names))
            continue
        resume = (stack.train_state / "run.json").is_file()
        chosen = options.model_copy(update={"single": single, "resume": resume})
        try:
            train(stack.root, data, chosen, on_event)
        except FslmError:
            if not resume:
                raise
            log.info("the interrupted training in %s belongs to another run: starting over", stack.train_state)
            train(stack.root, data, chosen.model_copy(update={"resume": False, "fresh": True}), on_event)


def quickstart(
    out: str | Path, options: QuickstartOptions | None = None, on_event: EventHandler | None = None
) -> QuickstartResult:
    """Run the five steps into `out`; events report each step and each step's own progress."""
    options = options or QuickstartOptions()
    out = Path(out).expanduser()
    stack = StackDir(out / "stack")
    data, report, eval_data = out / "distilled.jsonl", out / "eval", out / "eval-data"
    state: dict[str, object] = {}

    def make_stack() -> None:
        if stack.exists():
            log.info("reusing the stack in %s", stack.root)
        else:
            init(stack.root, InitOptions(base=options.base))
            # The stages learn targets of at most teacher_tokens: their budgets say so too, so the answer stage
            # trains on (and the run shows) earlier stages as long as the ones it learned from, not the recipe's
            # 64-160 tokens.
            update_config(stack.root, stage_budgets(options.teacher_tokens))

    def distil() -> None:
        teacher = TeacherSpec(backend=options.teacher_backend)  # type: ignore[arg-type]
        settings = DistillOptions(
            teacher=teacher,
            filters=options.filters,
            limit=options.records,
            seed=0,
            max_new_tokens=options.teacher_tokens,
        )
        distill(sample_path("self_instruct_seed_tasks.jsonl"), stack.root, data, settings, on_event)

    def train_step() -> None:
        train_all(stack, data, TrainOptions(max_steps=options.train_steps, batch_size=options.batch_size), on_event)

    def run() -> None:
        # One export of the trained stack for this step and the next: the run and the eval's stages then both go
        # through llama.cpp, and the eval finds the export current instead of writing it again.
        if llamacpp_runs(stack, stack.load()):
            refresh(stack.root)
        state["trace"] = Stack.load(stack.root).run(INSTRUCTION)

    def evaluate_step() -> None:
        write_eval_data(eval_data)
        settings = EvalOptions(
            data_dir=eval_data,
            tasks=["mmlu"],
            systems=["base", "single", "stack"],
            limit=options.eval_items,
            stage_tokens=options.stage_tokens,
        )
        state["evaluation"] = evaluate(stack.root, report, settings, on_event)

    # Each step with its share of the wall time, for the "time left" estimate (2026-12-07, 2 cores: 54, 236, 33 and
    # 71 s of 394, init within distill's).
    steps: list[tuple[str, float, Callable[[], None]]] = [
        ("init: write the stack directory", 0.015, make_stack),
        (
            f"distill: the base model as teacher ({options.teacher_backend}) writes {options.records} records",
            0.12,
            distil,
        ),
        (f"train: 4 stage adapters + the single baseline, {options.train_steps} steps each", 0.6, train_step),
        (f"run: {INSTRUCTION!r} through the trained stack", 0.085, run),
        (f"eval: base vs single vs stack on {options.eval_items} MMLU validation items", 0.18, evaluate_step),
    ]
    start = time.perf_counter()
    done_share = 0.0
    for i, (title, share, fn) in enumerate(steps, 1):
        elapsed = time.perf_counter() - start
        info = {"elapsed": _minutes(elapsed)}
        if done_share > 0.05:
            info["left"] = _minutes(elapsed / done_share * (1 - done_share))
        emit(on_event, Progress("quickstart", title, i, len(steps), info))
        fn()
        done_share += share
    emit(
        on_event,
        Progress("quickstart", "done", len(steps), len(steps), {"elapsed": _minutes(time.perf_counter() - start)}),
    )
    trace, evaluation = state["trace"], state["evaluation"]
    assert isinstance(trace, Trace) and isinstance(evaluation, EvalResult)
    return QuickstartResult(
        stack=stack.root, data=data, report=report, eval_data=eval_data, trace=trace, evaluation=evaluation
    )


def stage_budgets(tokens: int) -> Callable[[Any], None]:
    """A stack.yaml edit: every stage generates at most `tokens` new tokens."""

    def edit(doc: Any) -> None:
        for stage in doc["stages"]:
            stage["generation"]["max_new_tokens"] = tokens

    return edit


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"
