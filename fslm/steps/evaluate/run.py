"""`fslm eval`: base vs single adapter vs stack on offline benchmarks, through lm-evaluation-harness.

One `Stack` is loaded once on PyTorch (it scores); each system is an `FslmLM` view of it (fslm/steps/evaluate/lm_eval_model.py),
and the stack's stages 1..N-1 generate on the stage backend (fslm/steps/evaluate/stages.py: llama.cpp or a server when
available). The tasks are the offline YAMLs shipped in fslm/steps/evaluate/tasks/ (they read --data-dir). Every system sees the same
seeded subset of items; lm-eval's per-sample log gives each system's per-item correctness, from which every pair of
systems gets a paired difference with a bootstrap interval and McNemar's test (fslm/steps/evaluate/stats.py). The
stack's ensemble and gate modes tune their weight on each task's dev split first (fslm/steps/evaluate/scoring.py).
Each finished system is saved under REPORT/systems/ (keyed by the options it depends on: a stack-only option never
recomputes the base row), and the stack's stage texts are appended there as they are generated, so a killed run
resumes where it stopped.
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
from typing import Any, Literal

from pydantic import Field, field_validator

from fslm.benchmark_files import DEV_FILES, FILES
from fslm.errors import FslmError
from fslm.events import EventHandler, Progress, emit
from fslm.files import atomic_write_bytes, atomic_write_text, sha256_file
from fslm.options import Options, comma_list
from fslm.precision import resolve as resolve_precision
from fslm.provenance import versions
from fslm.stack import SYSTEMS
from fslm.stackdir import BASELINES, StackDir

log = logging.getLogger("fslm")

TASKS_DIR = Path(__file__).parent / "tasks"
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
VERSIONED = ("fslm", "torch", "transformers", "peft", "lm_eval", "datasets", "llama_cpp_python")
# tasks with a generative variant (fslm_<task>_gen): multiple choice whose answer can be read off free text
GENERATIVE = ("arc_easy", "arc_challenge", "mmlu", "openbookqa")


def available_tasks() -> list[str]:
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
    batch_size: int = Field(
        8,
        ge=1,
        description="Batch of requests scored in full (too long to share their context) and of stages on torch.",
    )
    stage_tokens: int | None = Field(
        None, ge=1, description="Cap new tokens of stages 1..N-1 (default: the manifest's)."
    )
    stage_backend: Literal["auto", "torch", "llamacpp", "openai"] = Field(
        "auto",
        description="Where stages 1..N-1 generate: auto (llama.cpp when the base exports to GGUF, a server when "
        "stack.yaml runs on one, else torch), torch, llamacpp, openai. The final stage scores on torch.",
    )
    stage_batch: int | None = Field(
        None,
        ge=1,
        description="Questions per stage-generation call (default: 32 on llama.cpp/openai, else --batch-size).",
    )
    stage_check: int = Field(
        0, ge=0, description="Questions whose greedy stage text is also generated on torch, to measure agreement."
    )
    stack_scoring: Literal["chain", "ensemble", "gate"] = Field(
        "chain",
        description="How the stack scores choices: chain (greedy chain), ensemble (direct path + K sampled "
        "chains, weight λ), gate (chain only when the direct path is unsure, threshold τ).",
    )
    chains: int = Field(3, ge=1, le=64, description="Sampled chains per question (ensemble).")
    chain_temperature: float = Field(0.7, ge=0.0, le=5.0, description="Sampling temperature of the ensemble's chains.")
    ensemble_weight: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="λ, the direct path's weight (ensemble); default: tuned on each task's dev split.",
    )
    gate_threshold: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="τ, the direct margin below which the chain runs (gate); default: tuned on dev.",
    )
    tune_limit: int = Field(100, ge=1, description="Dev questions per task that tune λ / τ (a seeded subset).")
    generative: bool = Field(
        False, description="Also let each system answer freely and read the option off its text (metric gen)."
    )
    gen_tokens: int | None = Field(None, ge=1, description="New tokens of a generative answer (default: 32).")
    bootstrap: int = Field(10_000, ge=100, description="Paired bootstrap resamples for the difference intervals.")
    precision: Literal["fp32", "bf16", "auto"] = Field(
        "fp32",
        description="PyTorch compute precision of scoring (and of stages generating on torch): fp32 (default: "
        "system=base matches lm-eval's hf model), bf16 (autocast), auto (bf16 where the hardware computes it natively).",
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


def tuning_needed(options: EvalOptions) -> str | None:
    """Which stack-scoring parameter must be tuned on dev first: "weight" (λ), "threshold" (τ) or None."""
    if options.stack_scoring == "ensemble" and options.ensemble_weight is None:
        return "weight"
    if options.stack_scoring == "gate" and options.gate_threshold is None:
        return "threshold"
    return None


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


def _item_records(samples: list[dict[str, Any]], gen_samples: list[dict[str, Any]] | None) -> dict[str, Any]:
    """Per-item correctness of one task, columnar: ids and one 0/1 (or score) list per metric.

    lm-eval logs one sample per document and filter; GSM8K's flexible-extract filter is its reported metric, as in
    `_metrics`. Ids come from the documents (fslm.benchmark_files gives every row a stable `id`)."""
    filters = {s.get("filter") for s in samples}
    keep = "flexible-extract" if "flexible-extract" in filters else ("none" if "none" in filters else None)
    rows = sorted((s for s in samples if keep is None or s.get("filter") == keep), key=lambda s: s["doc_id"])
    ids = [str(s["doc"].get("id", s["doc_id"])) for s in rows]
    out: dict[str, Any] = {"ids": ids}
    for metric, source in (("acc", "acc"), ("acc_norm", "acc_norm"), ("acc", "exact_match")):
        if rows and source in rows[0] and metric not in out:
            out[metric] = [round(float(s[source]), 4) for s in rows]
    if gen_samples:
        by_id = {str(s["doc"].get("id", s["doc_id"])): s for s in gen_samples}
        out["gen"] = [round(float(by_id[i]["gen"]), 4) if i in by_id else 0.0 for i in ids]
        out["answered"] = [round(float(by_id[i]["answered"]), 4) if i in by_id else 0.0 for i in ids]
    return out


def row_name(system: str, ablated: str | None) -> str:
    return f"stack-ablate-{ablated}" if ablated else system


# Options that only the stack rows read: changing one must not recompute the base and single rows.
STACK_ONLY = ("stage_tokens", "stage_backend", "stage_batch", "stack_scoring")


def row_key(setup: dict[str, Any], system: str, stages: list[str]) -> str:
    """The part of the eval setup a row of `system` depends on, hashed: a saved row is reused only under its key."""
    uses = stages if system == "stack" else [] if system == "base" else [system]
    own = {k: v for k, v in setup.items() if system == "stack" or k not in STACK_ONLY}
    own["adapters"] = {a: h for a, h in setup["adapters"].items() if a in uses}
    return hashlib.sha256(json.dumps(own, sort_keys=True).encode()).hexdigest()[:16]


def _adapter_hashes(directory: Path) -> dict[str, str]:
    """sha256 of every adapter's weights: a retrained adapter must not reuse a finished row."""
    adapters = StackDir(directory).adapters
    if not adapters.is_dir():
        return {}
    return {p.parent.name: sha256_file(p) for p in sorted(adapters.glob("*/adapter_model.safetensors"))}


def _lm_eval(lm: Any, tasks: list[str], manager: Any, seed: int) -> dict[str, Any]:
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


def _task_manager(options: EvalOptions, split: str = "test", limit: int | None = None) -> Any:
    from lm_eval.tasks import TaskManager

    metadata = {"data_dir": str(options.data_dir.resolve()), "subset": limit, "seed": options.seed, "split": split}
    return TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata=metadata)


def tune_on_dev(
    loaded: Any, runner: Any, options: EvalOptions, on_event: EventHandler | None = None
) -> dict[str, dict[str, Any]]:
    """λ (ensemble) or τ (gate) per task, from every path's scores on a seeded subset of the task's dev split.

    The stack scores each dev question on the direct path and on the chains the mode uses (all of them: the value
    is not known yet); a grid of values is then evaluated offline on those scores (fslm/steps/evaluate/scoring.py).
    The test items are never seen here."""
    from fslm.steps.evaluate import scoring as eval_scoring
    from fslm.steps.evaluate.lm_eval_model import FslmLM

    def report(what: str, n: int, total: int) -> None:
        emit(on_event, Progress("eval", f"tune on dev: {what}", n, total))

    lm = FslmLM(
        loaded,
        system="stack",
        batch_size=options.batch_size,
        stage_tokens=options.stage_tokens,
        progress=report,
        stages=runner,
        stage_batch=options.stage_batch,
        scoring=options.stack_scoring,
        chains=options.chains,
        temperature=options.chain_temperature,
        seed=options.seed,
    )
    start = time.perf_counter()
    result = _lm_eval(
        lm, [f"fslm_{t}" for t in options.tasks], _task_manager(options, "dev", options.tune_limit), options.seed
    )
    tuned = {}
    for t in options.tasks:
        samples = sorted(result["samples"][f"fslm_{t}"], key=lambda s: s["doc_id"])
        questions = [lm.records[(f"fslm_{t}", s["doc_id"])] for s in samples]
        golds = [int(s["doc"]["gold"]) for s in samples]
        if options.stack_scoring == "ensemble":
            choice = eval_scoring.tune_weight(questions, golds)
        else:
            choice = eval_scoring.tune_threshold(questions, golds)
        tuned[t] = {
            "parameter": "ensemble_weight" if options.stack_scoring == "ensemble" else "gate_threshold",
            **choice,
            "split": DEV_FILES[t],
            "data_hash": _hash_files(options.data_dir, DEV_FILES[t], t),
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


def _hash_files(data_dir: Path, pattern: str, task: str) -> str:
    paths = sorted(data_dir.glob(pattern))
    if not paths:
        raise FslmError(f"{data_dir / pattern}: not found (task {task})")
    return hashlib.sha256("".join(f"{p.name}:{sha256_file(p)}\n" for p in paths).encode()).hexdigest()


def _setup(directory: Path, options: EvalOptions, stage_backend: str, data_hashes: dict[str, Any]) -> dict[str, Any]:
    """Everything a row's numbers depend on: saved in results.json and hashed into each row's resume key."""
    ensemble = {"chains": options.chains, "temperature": options.chain_temperature, "weight": options.ensemble_weight}
    return {
        "precision": resolve_precision(options.precision, "eval scoring"),
        "tasks": options.tasks,
        "limit": options.limit,
        "seed": options.seed,
        "batch_size": options.batch_size,
        "stage_tokens": options.stage_tokens,
        "data_hashes": data_hashes,
        "stage_backend": stage_backend,
        "stage_batch": options.stage_batch,
        "stack_scoring": {
            "mode": options.stack_scoring,
            **(ensemble if options.stack_scoring == "ensemble" else {}),
            **({"threshold": options.gate_threshold} if options.stack_scoring == "gate" else {}),
            **({"tune_limit": options.tune_limit} if tuning_needed(options) else {}),
        },
        "generative": options.generative,
        "gen_tokens": options.gen_tokens,
        "adapters": _adapter_hashes(directory),
    }


def _row(
    lm: Any, result: dict[str, Any], tasks: list[str], gen_tasks: list[str], seconds: float, precision: str
) -> dict[str, Any]:
    """One system's row: metrics per task, cost, and the per-item records the paired statistics read."""
    metrics, items, queries = {}, {}, 0
    samples = result.get("samples", {})
    for t in tasks:
        r = result["results"][f"fslm_{t}"]
        n = int(result.get("n-samples", {}).get(f"fslm_{t}", {}).get("effective", r.get("sample_len", 0)))
        metrics[t] = {**_metrics(r), "n": n}
        if t in gen_tasks:
            g = result["results"][f"fslm_{t}_gen"]
            metrics[t].update(gen=g["gen,none"], gen_stderr=g.get("gen_stderr,none"), answered=g.get("answered,none"))
        items[t] = _item_records(samples.get(f"fslm_{t}", []), samples.get(f"fslm_{t}_gen"))
        queries += n
    return {
        "system": lm.system,
        "ablated_stage": lm.ablate,
        "adapters": lm.adapters,
        "tasks": metrics,
        "seconds": round(seconds, 2),
        "seconds_per_query": round(seconds / max(queries, 1), 4),
        "peak_rss_mb": _peak_rss_mb(),
        "parameters_per_query": lm.parameters_per_query(),
        "earlier_stage_runs": lm.stage_calls,
        "precision": precision,
        "items": items,
    }


def _results(
    directory: Path,
    systems: dict[str, Any],
    setup: dict[str, Any],
    options: EvalOptions,
    tuning: dict[str, Any],
    warnings: list[str],
) -> dict[str, Any]:
    """results.json: the rows, the setup, every pair of systems compared on the same items, and versions."""
    from fslm.steps.evaluate.stats import system_pairs

    return {
        "stack": str(directory.resolve()),
        "systems": systems,
        **setup,
        "data_dir": str(options.data_dir.resolve()),
        "prompt_format": "see docs/eval.md (lm-eval prompts; stack/single wrap the context in the final stage prompt)",
        "pinned": {
            "batch_size": options.batch_size,
            "padding_side": "right (scoring)",
            "logprob_dtype": "float32",
            "compute": "bfloat16 autocast" if setup["precision"] == "bf16" else "float32",
        },
        "tuning": tuning,
        "paired": [r.to_dict() for r in system_pairs(systems, options.tasks, options.bootstrap, options.seed)],
        "paired_settings": {
            "bootstrap_resamples": options.bootstrap,
            "seed": options.seed,
            "interval": "95 % percentile, paired bootstrap over items",
            "test": "McNemar: exact binomial below 25 discordant items, else chi-square with continuity correction",
        },
        "contamination_warnings": warnings,
        "versions": versions(VERSIONED),
        "peak_rss_note": "peak RSS of the whole process so far (ru_maxrss), so it can only grow from row to row",
    }


def evaluate(
    stack: str | Path, out: str | Path, options: EvalOptions, on_event: EventHandler | None = None
) -> EvalResult:
    """Run every system on every task; write results.json, report.md and accuracy_vs_cost.png under `out`."""
    from fslm.stack import Stack
    from fslm.steps.evaluate import stages as eval_stages
    from fslm.steps.evaluate.lm_eval_model import FslmLM

    directory, out = Path(stack), Path(out)
    stack_dir = StackDir(directory)
    rows = check_options(directory, options)
    has_stack = any(s == "stack" for s, _ in rows)
    stage_backend = eval_stages.resolve(stack_dir, options.stage_backend) if has_stack else "none"
    data_hashes = {t: _hash_task_files(options.data_dir, t) for t in options.tasks}
    warnings = contamination_warnings(directory, options)
    for w in warnings:
        log.warning(w)
    setup = _setup(directory, options, stage_backend, data_hashes)
    stage_names = stack_dir.load().stage_names
    key = row_key(setup, "stack", stage_names)
    saved = out / "systems"
    saved.mkdir(parents=True, exist_ok=True)

    loaded = runner = None
    tuning: dict[str, Any] = {}
    tuning_file = saved / "tuning.json"
    if tuning_file.is_file():
        previous = json.loads(tuning_file.read_text(encoding="utf-8"))
        if previous.get("key") == key:
            tuning = previous["tuning"]
    manager = _task_manager(options, "test", options.limit)
    gen_tasks = [t for t in options.tasks if options.generative and t in GENERATIVE]
    if options.generative and not gen_tasks:
        log.warning(
            "--generative: none of %s has a generative variant (%s)", ", ".join(options.tasks), ", ".join(GENERATIVE)
        )
    systems: dict[str, Any] = {}
    for system, ablated in rows:
        name = row_name(system, ablated)
        done = saved / f"{name}.json"
        row_setup_key = row_key(setup, system, stage_names)
        if done.is_file():
            previous = json.loads(done.read_text(encoding="utf-8"))
            if previous.get("key") == row_setup_key:
                log.info("%s: already evaluated (%s), reusing", name, done)
                systems[name] = previous["result"]
                continue
        if loaded is None:
            loaded = Stack.load(directory, backend=options.backend or "torch")
            loaded.backend.set_precision(setup["precision"], "eval scoring")
        if system == "stack" and runner is None:
            runner = eval_stages.load_stage_stack(stack_dir, stage_backend, loaded)
        if system == "stack" and tuning_needed(options) and not tuning:
            tuning = tune_on_dev(loaded, runner, options, on_event)
            atomic_write_text(tuning_file, json.dumps({"key": key, "tuning": tuning}, indent=2) + "\n")

        def report(what: str, n: int, total: int, name: str = name) -> None:
            emit(on_event, Progress("eval", f"{name}: {what}", n, total))

        tuned = {f"fslm_{t}": v["value"] for t, v in tuning.items()}
        lm = FslmLM(
            loaded,
            system=system,
            ablate=ablated,
            batch_size=options.batch_size,
            stage_tokens=options.stage_tokens,
            progress=report,
            stages=runner if system == "stack" else None,
            stage_batch=options.stage_batch,
            scoring=options.stack_scoring if system == "stack" else "chain",
            chains=options.chains,
            temperature=options.chain_temperature,
            weight=options.ensemble_weight if options.ensemble_weight is not None else tuned or None,
            threshold=options.gate_threshold if options.gate_threshold is not None else tuned or None,
            seed=options.seed,
            gen_tokens=options.gen_tokens,
            stage_log=saved / f"{name}.stages.jsonl" if system == "stack" else None,
            stage_log_key=row_setup_key,
        )
        start = time.perf_counter()
        task_names = [f"fslm_{t}" for t in options.tasks] + [f"fslm_{t}_gen" for t in gen_tasks]
        result = _lm_eval(lm, task_names, manager, options.seed)
        seconds = time.perf_counter() - start + lm.resumed_seconds
        row = _row(lm, result, options.tasks, gen_tasks, seconds, setup["precision"])
        del result  # the per-sample log holds every request; keep only the per-item records
        if system == "stack":
            row["stage_backend"] = lm.stage_backend
            row["stage_seconds"] = round(lm.stage_seconds, 2)
            if lm.resumed_chains:
                row["stage_chains_resumed"] = lm.resumed_chains  # from a killed run; their seconds are included
            row["stack_scoring"] = {
                **setup["stack_scoring"],
                **({"tuned": {t: v["value"] for t, v in tuning.items()}} if tuning else {}),
                "questions_with_chain": lm.chain_questions if options.stack_scoring != "chain" else None,
            }
            if options.stage_check and runner is not loaded:
                row["stage_agreement"] = _stage_agreement(lm, loaded, options)
        row["items"] = row.pop("items")  # last: the per-item lists are long
        systems[name] = row
        atomic_write_text(done, json.dumps({"key": row_setup_key, "result": row}) + "\n")
        lm.close()

    results = _results(directory, systems, setup, options, tuning, warnings)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.json", json.dumps(results, indent=1) + "\n")
    atomic_write_text(out / "report.md", report_markdown(results))
    atomic_write_bytes(out / "accuracy_vs_cost.png", plot_png(results))
    if runner is not None and runner is not loaded:
        runner.backend.close()
    return EvalResult(out, results)


def _stage_agreement(lm: Any, reference: Any, options: EvalOptions) -> dict[str, Any]:
    """Greedy stage text of the fast path vs PyTorch on a seeded sample of the questions this row ran."""
    import random

    from fslm.steps.evaluate.stages import stage_agreement

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


def report_markdown(results: dict[str, Any]) -> str:
    from fslm.steps.evaluate.stats import markdown_table

    tasks = results["tasks"]
    head = "| system | " + " | ".join(tasks) + " | mean | s/query | params/query | peak RSS MB |"
    lines = [
        f"# fslm eval: {results['stack']}",
        "",
        f"Zero-shot accuracy ± stderr on a seeded subset (limit {results['limit']}, seed {results['seed']}), "
        f"scored in {results.get('pinned', {}).get('compute', 'float32')}.",
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
    extra = [
        (name, t, s["tasks"][t])
        for name, s in results["systems"].items()
        for t in tasks
        if "acc_norm" in s["tasks"][t] or "gen" in s["tasks"][t]
    ]
    if extra:
        lines += ["", "| system | task | acc | acc_norm | gen (answered) |", "|---|---|---|---|---|"]
        for name, t, m in extra:
            gen = f"{m['gen']:.3f} ({m.get('answered') or 0:.0%})" if "gen" in m else "-"
            norm = f"{m['acc_norm']:.3f}" if "acc_norm" in m else "-"
            lines.append(f"| {name} | {t} | {m['accuracy']:.3f} | {norm} | {gen} |")
    stack_rows = {n: s for n, s in results["systems"].items() if s.get("system") == "stack"}
    if stack_rows:
        lines += ["", "## Stack", ""]
        for name, s in stack_rows.items():
            mode = s.get("stack_scoring", {})
            text = f"- {name}: stages 1..N-1 on **{s.get('stage_backend', 'torch')}** "
            text += (
                f"({s.get('stage_seconds', 0):.0f} s of {s['seconds']:.0f} s); scoring **{mode.get('mode', 'chain')}**"
            )
            settings = ", ".join(f"{k} {v}" for k, v in mode.items() if k not in ("mode", "tuned") and v is not None)
            if settings:
                text += f" ({settings})"
            if mode.get("tuned"):
                text += "; tuned on dev: " + ", ".join(f"{t} {v}" for t, v in mode["tuned"].items())
            lines.append(text)
            agreement = s.get("stage_agreement")
            if agreement and agreement.get("questions"):
                per = ", ".join(f"{k} {v:.0%}" for k, v in agreement["stage_text_equal"].items())
                lines.append(
                    f"  - greedy stage text equal to PyTorch's on {agreement['questions']} questions: {per}; "
                    f"whole chain {agreement['chain_text_equal']:.0%}"
                )
    if results.get("tuning"):
        lines += ["", "Tuning (dev splits only; never the test items):", ""]
        for t, v in results["tuning"].items():
            lines.append(
                f"- {t}: {v['parameter']} = {v['value']} (dev accuracy {v['dev_accuracy']:.3f} on {v['n']} items of "
                f"{v['split']})"
            )
    if results.get("paired"):
        settings = results.get("paired_settings", {})
        lines += [
            "",
            "## Paired differences",
            "",
            f"Same items for both systems; 95 % paired bootstrap interval ({settings.get('bootstrap_resamples')} "
            f"resamples, seed {settings.get('seed')}); McNemar's test ({settings.get('test')}).",
            "",
            *markdown_table(results["paired"]),
        ]
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
