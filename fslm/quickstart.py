"""`fslm quickstart`: the whole pipeline on the embedded default model, offline, in minutes on a laptop CPU.

It composes the real commands (init -> distill -> train -> run -> eval) with small settings, on data shipped
inside the package (`fslm/samples/`, see its NOTICE.md), so what it prints is what those commands print.
Rerunning the same command continues where a killed run stopped: distill resumes from its cache, finished
adapters are kept, and the evaluation reuses finished rows.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from fslm.config import load_config
from fslm.errors import FslmError
from fslm.files import atomic_write_text

INSTRUCTION = "Give three tips for staying healthy."


@dataclass(frozen=True)
class Budget:
    """Sizes that keep the quickstart near 10 minutes on 2 CPU cores (measured time in README.md)."""

    records: int = 16  # instructions distilled from the shipped Self-Instruct seed tasks
    teacher_tokens: int = 48  # new tokens per stage for the teacher
    train_steps: int = 12  # optimizer steps per adapter (4 stages + the single baseline)
    batch_size: int = 4
    eval_items: int = 20  # shipped MMLU validation items scored by each system
    stage_tokens: int = 24  # new tokens of stages 1..N-1 during the evaluation


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


def trained_on(stack_dir: Path, names: list[str], data_sha: str) -> bool:
    """Every named adapter exists and was trained on this data (so a rerun can skip it)."""
    config = load_config(stack_dir)
    shas = {s.name: s.training.data_sha256 if s.training else None for s in config.stages}
    shas["single"] = (config.metadata.get("single_training") or {}).get("data_sha256")
    return all(
        (stack_dir / "adapters" / name / "adapter_config.json").is_file() and shas.get(name) == data_sha
        for name in names
    )


def train_stack_and_single(
    stack_dir: Path, data: Path, train_cmd: Callable[..., None], say: Callable[[str], None], **kwargs: Any
) -> None:
    """Train every stage, then the single baseline, skipping what is already trained on this data.

    An interrupted run leaves checkpoints in DIR/.fslm-train/: continue from them, and start afresh only when they
    belong to another run (train refuses to resume those).
    """
    from fslm.files import sha256_file

    sha = sha256_file(data)
    stages = load_config(stack_dir).stage_names
    for single, names in ((False, stages), (True, ["single"])):
        if trained_on(stack_dir, names, sha):
            say(f"adapters {', '.join(names)} already trained on this data: kept")
            continue
        resume = (stack_dir / ".fslm-train" / "run.json").is_file()
        try:
            train_cmd(stack_dir, data=data, resume=resume, single=single, **kwargs)
        except FslmError:
            if not resume:
                raise
            train_cmd(stack_dir, data=data, resume=False, single=single, **kwargs)


def quickstart(
    out: Path,
    budget: Budget,
    say: Callable[[str], None],
    commands: Any,
    base: str | None = None,
    teacher_backend: str = "llamacpp",
    filters: str = "empty,overlong,repetition",
) -> dict[str, Path]:
    """Run the five steps; `commands` is the CLI module (its command functions do the work and the printing).

    `base`, `teacher_backend` and `filters` exist for tests on tiny random models (which never stop by
    themselves, so every teacher text counts as cut); the command uses the embedded default.
    """
    out = out.expanduser()
    stack_dir, data, report, eval_data = out / "stack", out / "distilled.jsonl", out / "eval", out / "eval-data"
    # The CLI's command functions, undecorated: they raise FslmError, which the quickstart command reports once.
    init_cmd, distill_cmd, train_cmd, run_cmd, eval_cmd = (
        getattr(f, "__wrapped__", f)
        for f in (commands.init, commands.distill, commands.train, commands.run, commands.eval_cmd)
    )

    def init() -> None:
        if (stack_dir / "stack.yaml").is_file():
            say(f"reusing the stack in {stack_dir}")
        else:
            init_cmd(stack_dir, **({"base": base} if base else {}))

    def distill() -> None:
        distill_cmd(
            sample_path("self_instruct_seed_tasks.jsonl"),
            stack=stack_dir,
            out_path=data,
            teacher_backend=teacher_backend,
            filters=filters,
            limit=budget.records,
            seed=0,
            max_new_tokens=budget.teacher_tokens,
        )

    def train() -> None:
        train_stack_and_single(
            stack_dir, data, train_cmd, say, max_steps=budget.train_steps, batch_size=budget.batch_size
        )

    def run() -> None:
        run_cmd(stack_dir, INSTRUCTION)

    def evaluate() -> None:
        write_eval_data(eval_data)
        eval_cmd(
            stack_dir,
            data_dir=eval_data,
            out_dir=report,
            tasks="mmlu",
            systems="base,single,stack",
            limit=budget.eval_items,
            stage_tokens=budget.stage_tokens,
        )

    # Each step with its rough share of the wall time (measured on 2 cores), for the "time left" estimate.
    steps: list[tuple[str, float, Callable[[], None]]] = [
        ("init: write the stack directory", 0.01, init),
        (f"distill: the base model as teacher ({teacher_backend}) writes {budget.records} records", 0.12, distill),
        (f"train: 4 stage adapters + the single baseline, {budget.train_steps} steps each", 0.55, train),
        (f"run: {INSTRUCTION!r} through the trained stack", 0.07, run),
        (f"eval: base vs single vs stack on {budget.eval_items} MMLU validation items", 0.25, evaluate),
    ]
    start = time.perf_counter()
    done_share = 0.0
    for i, (title, share, fn) in enumerate(steps, 1):
        elapsed = time.perf_counter() - start
        left = f", about {_minutes(elapsed / done_share * (1 - done_share))} left" if done_share > 0.05 else ""
        say(f"[bold cyan]step {i}/{len(steps)}[/] {title}  [dim]({_minutes(elapsed)} elapsed{left})[/]")
        fn()
        done_share += share
    say(f"[bold green]done[/] in {_minutes(time.perf_counter() - start)}")
    return {"stack": stack_dir, "data": data, "report": report, "eval data": eval_data}


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"
