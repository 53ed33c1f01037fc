"""`fslm eval`: base vs single adapter vs stack on offline benchmarks, through lm-evaluation-harness.

One `Stack` is loaded once; each system is an `FslmLM` view of it (fslm/lm_eval_model.py), and the tasks are the
offline YAMLs shipped in fslm/tasks/ (they read --data-dir). Every system sees the same seeded subset of items.
Each finished system is saved under REPORT/systems/, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import resource
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from fslm.errors import FslmError
from fslm.events import EventHandler, Progress, emit
from fslm.files import atomic_write_bytes, atomic_write_text, sha256_file
from fslm.options import Options, comma_list
from fslm.provenance import versions
from fslm.stack import SYSTEMS
from fslm.stackdir import BASELINES, StackDir

log = logging.getLogger("fslm")

TASKS_DIR = Path(__file__).parent.parent / "tasks"
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
VERSIONED = ("fslm", "torch", "transformers", "peft", "lm_eval", "datasets")


def available_tasks() -> list[str]:
    from fslm.tasks.utils import FILES

    return list(FILES)


class EvalOptions(Options):
    """Everything `fslm eval` can be told besides its two paths; the CLI's flags and defaults come from here."""

    data_dir: Path = Field(description="Benchmark data directory (layout: docs/eval.md).")
    tasks: list[str] = Field(
        ["arc_easy", "arc_challenge", "mmlu"],
        description="Comma-separated: arc_easy, arc_challenge, mmlu, hellaswag, ...",
    )
    systems: list[str] = Field(["base", "single", "stack"], description=f"Comma-separated: {', '.join(SYSTEMS)}.")
    limit: int | None = Field(100, ge=1, description="Items per task (a seeded random subset).")
    seed: int = Field(1234, description="Seed of the subset and of lm-eval.")
    ablate: bool = Field(False, description="Add one stack row per stage, that stage on the bare base.")
    batch_size: int = Field(8, ge=1, description="Pinned scoring batch size.")
    stage_tokens: int | None = Field(
        None, ge=1, description="Cap new tokens of stages 1..N-1 (default: the manifest's)."
    )
    backend: str | None = None

    _lists = field_validator("tasks", "systems", mode="before")(comma_list)


@dataclass
class EvalResult:
    """Where the report went and what it says (`results` is results.json)."""

    out: Path
    results: dict[str, Any]

    @property
    def report(self) -> Path:
        return self.out / "report.md"


def _hash_task_files(data_dir: Path, task: str) -> dict[str, str]:
    from fslm.tasks.utils import FILES

    paths = sorted(data_dir.glob(FILES[task]))
    if not paths:
        raise FslmError(f"{data_dir / FILES[task]}: not found (task {task}; see the data README for the layout)")
    if len(paths) == 1:
        return {str(paths[0].relative_to(data_dir)): sha256_file(paths[0])}
    digest = hashlib.sha256("".join(f"{p.name}:{sha256_file(p)}\n" for p in paths).encode()).hexdigest()
    return {FILES[task]: digest}  # many files (MMLU): one hash over the sorted names + file hashes


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


def check_options(directory: Path, options: EvalOptions) -> list[tuple[str, str | None]]:
    """Validate before the model loads; returns the rows to run: (system, ablated stage)."""
    stack_dir = StackDir(directory)
    config = stack_dir.load()
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
    return rows


def contamination_warnings(directory: Path, options: EvalOptions) -> list[str]:
    """Warnings for training data (recorded in stack.yaml) that overlaps an evaluated test split."""
    from fslm.contamination import TEST_SPLITS, BenchmarkIndex
    from fslm.data import read_dataset

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


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024, 1)


def _metrics(task_result: dict[str, Any]) -> dict[str, Any]:
    """acc (or GSM8K's flexible exact match) + stderr + acc_norm when the task has it."""
    for key in ("acc,none", "exact_match,flexible-extract", "exact_match,strict-match"):
        if key in task_result:
            metric, filt = key.split(",")
            out = {
                "metric": metric if filt == "none" else f"{metric} ({filt})",
                "accuracy": task_result[key],
                "stderr": task_result.get(f"{metric}_stderr,{filt}"),
            }
            if "acc_norm,none" in task_result:
                out["acc_norm"] = task_result["acc_norm,none"]
                out["acc_norm_stderr"] = task_result.get("acc_norm_stderr,none")
            return out
    raise FslmError(f"lm-eval returned no accuracy metric ({', '.join(task_result)})")


def row_name(system: str, ablated: str | None) -> str:
    return f"stack-ablate-{ablated}" if ablated else system


def evaluate(
    stack: str | Path, out: str | Path, options: EvalOptions, on_event: EventHandler | None = None
) -> EvalResult:
    """Run every system on every task; write results.json, report.md and accuracy_vs_cost.png under `out`."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from fslm.stack import Stack
    from fslm.steps.lm_eval_model import FslmLM

    directory, out = Path(stack), Path(out)
    rows = check_options(directory, options)
    data_hashes = {t: _hash_task_files(options.data_dir, t) for t in options.tasks}
    warnings = contamination_warnings(directory, options)
    for w in warnings:
        log.warning(w)
    setup = {
        "tasks": options.tasks,
        "limit": options.limit,
        "seed": options.seed,
        "batch_size": options.batch_size,
        "stage_tokens": options.stage_tokens,
        "data_hashes": data_hashes,
    }
    key = hashlib.sha256(json.dumps(setup, sort_keys=True).encode()).hexdigest()[:16]
    saved = out / "systems"
    saved.mkdir(parents=True, exist_ok=True)

    loaded = None
    manager = TaskManager(
        include_path=str(TASKS_DIR),
        include_defaults=False,
        metadata={"data_dir": str(options.data_dir.resolve()), "subset": options.limit, "seed": options.seed},
    )
    systems: dict[str, Any] = {}
    for system, ablated in rows:
        name = row_name(system, ablated)
        done = saved / f"{name}.json"
        if done.is_file():
            previous = json.loads(done.read_text(encoding="utf-8"))
            if previous.get("key") == key:
                log.info("%s: already evaluated (%s), reusing", name, done)
                systems[name] = previous["result"]
                continue
        if loaded is None:
            loaded = Stack.load(directory, backend=options.backend)

        def report(what: str, n: int, total: int, name: str = name) -> None:
            emit(on_event, Progress("eval", f"{name}: {what}", n, total))

        lm = FslmLM(
            loaded,
            system=system,
            ablate=ablated,
            batch_size=options.batch_size,
            stage_tokens=options.stage_tokens,
            progress=report,
        )
        start = time.perf_counter()
        with quiet_lm_eval():
            result = lm_eval.simple_evaluate(
                model=lm,
                tasks=[f"fslm_{t}" for t in options.tasks],
                task_manager=manager,
                num_fewshot=None,
                log_samples=False,
                random_seed=options.seed,
                numpy_random_seed=options.seed,
                torch_random_seed=options.seed,
                fewshot_random_seed=options.seed,
            )
        seconds = time.perf_counter() - start
        tasks = {}
        queries = 0
        for t in options.tasks:
            r = result["results"][f"fslm_{t}"]
            n = int(result.get("n-samples", {}).get(f"fslm_{t}", {}).get("effective", r.get("sample_len", 0)))
            tasks[t] = {**_metrics(r), "n": n}
            queries += n
        systems[name] = {
            "system": system,
            "ablated_stage": ablated,
            "adapters": lm.adapters,
            "tasks": tasks,
            "seconds": round(seconds, 2),
            "seconds_per_query": round(seconds / max(queries, 1), 4),
            "peak_rss_mb": _peak_rss_mb(),
            "parameters_per_query": lm.parameters_per_query(),
            "earlier_stage_runs": lm.stage_calls,
        }
        atomic_write_text(done, json.dumps({"key": key, "result": systems[name]}, indent=2) + "\n")

    results = {
        "stack": str(directory.resolve()),
        "systems": systems,
        **setup,
        "data_dir": str(options.data_dir.resolve()),
        "prompt_format": "see docs/eval.md (lm-eval prompts; stack/single wrap the context in the final stage prompt)",
        "pinned": {"batch_size": options.batch_size, "padding_side": "right (scoring)", "logprob_dtype": "float32"},
        "contamination_warnings": warnings,
        "versions": versions(VERSIONED),
        "peak_rss_note": "peak RSS of the whole process so far (ru_maxrss), so it can only grow from row to row",
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    atomic_write_text(out / "report.md", report_markdown(results))
    atomic_write_bytes(out / "accuracy_vs_cost.png", plot_png(results))
    return EvalResult(out, results)


def report_markdown(results: dict[str, Any]) -> str:
    tasks = results["tasks"]
    head = "| system | " + " | ".join(tasks) + " | mean | s/query | params/query | peak RSS MB |"
    lines = [
        f"# fslm eval: {results['stack']}",
        "",
        f"Zero-shot accuracy ± stderr on a seeded subset (limit {results['limit']}, seed {results['seed']}).",
        "",
        head,
        "|" + "---|" * (len(tasks) + 5),
    ]
    for name, s in results["systems"].items():
        cells = [
            f"{s['tasks'][t]['accuracy']:.3f} ± {s['tasks'][t]['stderr'] or 0:.3f} (n={s['tasks'][t]['n']})"
            for t in tasks
        ]
        mean = sum(s["tasks"][t]["accuracy"] for t in tasks) / len(tasks)
        lines.append(
            f"| {name} | " + " | ".join(cells) + f" | {mean:.3f} | {s['seconds_per_query']:.3f} | "
            f"{s['parameters_per_query']:,} | {s['peak_rss_mb']} |"
        )
    if results["contamination_warnings"]:
        lines += ["", "**Contamination warnings:**", ""] + [f"- {w}" for w in results["contamination_warnings"]]
    versions = ", ".join(f"{k} {v}" for k, v in results["versions"].items())
    lines += ["", f"Versions: {versions}.", "", "![accuracy vs cost](accuracy_vs_cost.png)", ""]
    return "\n".join(lines)


def plot_png(results: dict[str, Any]) -> bytes:
    """Mean accuracy against seconds per query, one point per system."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for name, s in results["systems"].items():
        mean = sum(t["accuracy"] for t in s["tasks"].values()) / len(s["tasks"])
        ax.scatter(s["seconds_per_query"], mean)
        ax.annotate(name, (s["seconds_per_query"], mean), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("seconds per query (wall, this machine)")
    ax.set_ylabel(f"mean accuracy over {', '.join(results['tasks'])}")
    ax.set_title("fslm eval: accuracy vs cost")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
