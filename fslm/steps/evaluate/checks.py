"""What `fslm eval` checks before any model loads: the options against the stack and the data directory, the
data's hashes (a row is reused only on the same files), and training data that overlaps an evaluated test split."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from fslm.benchmark_files import DEV_FILES, FILES
from fslm.contamination import TEST_SPLITS, BenchmarkIndex
from fslm.data import read_dataset
from fslm.errors import FslmError
from fslm.files import sha256_file
from fslm.stack import SYSTEMS
from fslm.stackdir import BASELINES, StackDir
from fslm.steps.evaluate.options import EvalOptions, tuning_needed

log = logging.getLogger("fslm")
# our task names -> the contamination module's split names (fslm/contamination.py TEST_SPLITS)
CONTAMINATION_SPLITS = {
    "arc_easy": ["arc_easy"],
    "arc_challenge": ["arc_challenge"],
    "mmlu": ["mmlu"],
    "gsm8k": ["gsm8k"],
    "openbookqa": ["openbookqa"],
    "truthfulqa_mc1": ["truthfulqa_mc_v0", "truthfulqa"],
    "truthfulqa_mc2": ["truthfulqa_mc_v0", "truthfulqa"],
}


def available_tasks() -> list[str]:
    return list(FILES)


def check_options(directory: Path, options: EvalOptions) -> list[tuple[str, str | None]]:
    """Validate before the model loads; returns the rows to run: (system, ablated stage)."""
    stack_dir = StackDir(directory)
    config = stack_dir.load()
    stack_dir.check_adapters(config)
    unknown = [t for t in options.tasks if t not in available_tasks()]
    if unknown:
        raise FslmError(f"--tasks: unknown {', '.join(unknown)} (available: {', '.join(available_tasks())})")
    if not options.data_dir.is_dir():
        raise FslmError(f"{options.data_dir}: --data-dir is not a directory")
    bad = [s for s in options.systems if s not in SYSTEMS]
    if bad or not options.systems:
        raise FslmError(f"--systems: unknown {', '.join(bad) or '(none)'} (available: {', '.join(SYSTEMS)})")
    for baseline in BASELINES:
        if baseline in options.systems:
            stack_dir.require_baseline(baseline)
    if "stack" in options.systems and not stack_dir.trained_stages(config):
        log.warning("no stage adapter under %s: system 'stack' runs every stage zero-shot", stack_dir.adapters)
    rows: list[tuple[str, str | None]] = [(s, None) for s in options.systems]
    if options.ablate:
        rows += [("stack", s.name) for s in config.stages]
    if options.gate_max_chain_rate is not None and not (options.stack_scoring == "gate" and tuning_needed(options)):
        log.warning(
            "--gate-max-chain-rate caps a τ tuned on dev: it has no effect without --stack-scoring gate, or with --gate-threshold"
        )
    needs = tuning_needed(options) if any(s == "stack" for s, _ in rows) else None
    if needs:
        flag = "--ensemble-weight" if needs == "weight" else "--gate-threshold"
        for task in options.tasks:
            if task not in DEV_FILES:
                raise FslmError(
                    f"--stack-scoring {options.stack_scoring}: task {task} has no dev split to tune on "
                    f"(tasks with one: {', '.join(DEV_FILES)}); give {flag} instead"
                )
            if not sorted(options.data_dir.glob(DEV_FILES[task])):
                raise FslmError(f"{options.data_dir / DEV_FILES[task]}: not found (the dev split that tunes {task})")
    return rows


def contamination_warnings(directory: Path, options: EvalOptions) -> list[str]:
    """Warnings for training data (recorded in stack.yaml) that overlaps an evaluated test split."""
    stack_dir = StackDir(directory)
    files = stack_dir.training_files(stack_dir.load())
    wanted = {name for t in options.tasks for name in CONTAMINATION_SPLITS.get(t, [])}
    splits = [s for s in TEST_SPLITS if s.name in wanted]
    if not files or not splits:
        return []
    warnings = []
    try:
        index = BenchmarkIndex.load(options.data_dir, splits)
    except FslmError as e:
        return [f"contamination check skipped: {e}"]
    for path in sorted(files):
        if not Path(path).is_file():
            warnings.append(f"contamination check skipped for {path}: the training file is gone")
            continue
        records = read_dataset(path).records
        report = index.check((r.id, r.instruction, r.input) for r in records)
        if report.total:
            warnings.append(f"training data {path}: {report.summary()}")
    return warnings


def task_hashes(data_dir: Path, task: str, split: str = "test") -> dict[str, str]:
    """The evaluated files of a task, hashed: {file: sha256}, or for many files (MMLU) {glob: one hash over them}."""
    files = FILES if split == "test" else DEV_FILES
    if task not in files:
        raise FslmError(f"--split {split}: task {task} has none (tasks with one: {', '.join(files)})")
    paths = sorted(data_dir.glob(files[task]))
    if not paths:
        raise FslmError(f"{data_dir / files[task]}: not found (task {task}; see the data README for the layout)")
    if len(paths) == 1:
        return {str(paths[0].relative_to(data_dir)): sha256_file(paths[0])}
    return {files[task]: _hash_together(paths)}


def hash_files(data_dir: Path, pattern: str, task: str) -> str:
    """One hash over the files a glob matches (a task's dev split)."""
    paths = sorted(data_dir.glob(pattern))
    if not paths:
        raise FslmError(f"{data_dir / pattern}: not found (task {task})")
    return _hash_together(paths)


def _hash_together(paths: list[Path]) -> str:
    """sha256 over the sorted names and file hashes."""
    return hashlib.sha256("".join(f"{p.name}:{sha256_file(p)}\n" for p in paths).encode()).hexdigest()
