"""Experiment 2: with the answer-blind, checked recipe, does a stack beat a single and a multitask adapter?

One resumable command per regime (docs/experiments.md §2):

    python benchmarks/experiment2.py --regime mc --data-dir ../shared/data --out runs/exp2-mc        # regime A
    python benchmarks/experiment2.py --regime alpaca --data-dir ../shared/data --out runs/exp2-alpaca  # regime B

Regime A (`mc`): distil multiple-choice *train* questions (ARC-Easy, ARC-Challenge, OpenBookQA; seeded samples whose
sizes are flags) with `--reference hint-on-retry`, merge them into one training set, train the four stages (the
answer stage on the student's own earlier stages), the single adapter and the multitask adapter on it, then evaluate
base / single / multitask / stack zero-shot on the test sets. Regime B (`alpaca`): the same on Alpaca instructions
(the shards in DATA/alpaca/), reference `hidden`.

Every step is skipped when its output is complete, so rerunning the same command resumes a killed run; OUT/ledger.json
sums wall-clock seconds per step over all invocations and records seeds, data hashes and versions; OUT/summary.md is
the section for docs/experiments.md. The stage budgets are written into the stack before distillation (flags), so the
teacher, the training and the evaluation all use the same ones.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import signal
import sys
from pathlib import Path
from typing import Any

from fslm.provenance import Ledger

MC_SOURCES = {  # name -> (path under the data dir, format)
    "arc_easy_train": ("arc/ARC-Easy-Train.jsonl", "arc"),
    "arc_challenge_train": ("arc/ARC-Challenge-Train.jsonl", "arc"),
    "openbookqa_train": ("openbookqa/train.tsv", "openbookqa"),
}
ALPACA = "alpaca/alpaca_data_52k_shards/*.json"
REPO = Path(__file__).resolve().parent.parent
STEPS = ("init", "distill", "train", "eval", "gate", "teacher", "ablate")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--regime", choices=("mc", "alpaca"), required=True)
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--base", default="smollm2-135m-instruct")
    p.add_argument("--teacher", default=None, help="teacher model (default: the base)")
    p.add_argument("--teacher-backend", default="llamacpp")
    p.add_argument("--teacher-batch", type=int, default=16, help="records per teacher call")
    p.add_argument("--teacher-mode", choices=("stages", "joint"), default="joint", help="distill's --teacher-mode")
    p.add_argument("--options", choices=("hidden", "answer", "shown"), default="answer", help="distill's --options")
    p.add_argument(
        "--reference",
        default=None,
        help="distill's reference policy (default: hint-on-retry for mc, hidden for alpaca)",
    )
    p.add_argument("--arc-easy", type=int, default=1000, help="ARC-Easy train questions (regime mc)")
    p.add_argument("--arc-challenge", type=int, default=500, help="ARC-Challenge train questions (regime mc)")
    p.add_argument("--openbookqa", type=int, default=500, help="OpenBookQA train questions (regime mc)")
    p.add_argument("--alpaca", type=int, default=2000, help="Alpaca instructions (regime alpaca)")
    p.add_argument("--samples", type=int, default=1, help="chains per question")
    p.add_argument(
        "--filters",
        default="empty,overlong,repetition,leak,options",
        help="distill's quality filters (regime A's campaign ran without `options`, the default before 2026-12-07)",
    )
    p.add_argument(
        "--word-limits",
        action="store_true",
        help="fslm distill --word-limits: each teacher request states its stage's length in words (regime A ran "
        "without)",
    )
    p.add_argument("--alpaca-glob", default=ALPACA, help="Alpaca files under the data dir (regime alpaca)")
    p.add_argument("--budgets", default="intent=48,plan=64,reasoning=128,answer=48", help="stage max_new_tokens")
    p.add_argument(
        "--prompt",
        choices=("full", "compact"),
        default="full",
        help="the prompt form every adapter trains on and the stack then runs with (fslm train --prompt)",
    )
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument(
        "--train-precision",
        choices=("fp32", "bf16", "auto"),
        default="fp32",
        help="training compute, pinned: `auto` would train in bfloat16 on a machine with AMX and in float32 on one "
        "without, and a campaign resumed across machines would mix them",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the samples and of training")
    p.add_argument("--systems", default="base,single,multitask,stack")
    p.add_argument("--tasks", default="arc_easy,arc_challenge,openbookqa,mmlu")
    p.add_argument(
        "--eval-limit", type=int, default=1172, help="items per task (seeded; 1,172: all of ARC-Challenge's test split)"
    )
    p.add_argument("--eval-seed", type=int, default=1234)
    p.add_argument("--eval-extra", default="{}", help="JSON of further EvalOptions fields (scoring modes, ...)")
    p.add_argument("--publish", action="store_true", help="copy results to docs/results/ and data to data/ (real runs)")
    p.add_argument("--publish-root", type=Path, default=REPO, help="the checkout --publish copies into")
    p.add_argument(
        "--sync",
        type=Path,
        default=None,
        help="a folder (e.g. data/exp2-mc) that receives the distilled files every few minutes while they grow, the "
        "trained adapters (bfloat16, committed once final) once trained, and the eval folders as their rows "
        "land; a new OUT is seeded from it, so a campaign resumes from what was committed (and retrains the adapters "
        "where their weights are absent)",
    )
    p.add_argument(
        "--until", choices=STEPS, default=STEPS[-1], help="stop after this step (" + " -> ".join(STEPS) + ")"
    )
    p.add_argument(
        "--no-gate", dest="gate", action="store_false", help="skip the stack's gate row (τ tuned on each dev split)"
    )
    p.add_argument(
        "--no-teacher-row",
        dest="teacher_row",
        action="store_false",
        help="skip the teacher's own row (the teacher scored on the same items, on llama.cpp with the default "
        "--teacher-backend, else on PyTorch)",
    )
    p.add_argument(
        "--ablate-limit",
        type=int,
        default=200,
        help="items per task of the per-stage ablation (a stack row per stage, that stage on the bare base; "
        "seeded as the eval; 0 skips it)",
    )
    p.add_argument("--ablate-tasks", default="arc_easy,arc_challenge", help="tasks of the per-stage ablation")
    p.add_argument(
        "--plan",
        action="store_true",
        help="measure the rates (teacher, training, eval) in a few minutes and print the expected wall time of every "
        "step left; runs nothing long (OUT/plan.json, OUT/plan.md)",
    )
    p.add_argument(
        "--rows-from",
        type=Path,
        default=None,
        help="an earlier campaign's --sync folder (e.g. data/exp2-mc for regime B): its base row and the teacher's "
        "row, which read no adapter, are reused where the eval setup is the same (fslm eval checks each row's key: "
        "items, data hashes, options), and computed anew where it is not",
    )
    p.add_argument("--plan-questions", type=int, default=8, help="questions the plan's teacher probe distils")
    p.add_argument("--kept-share", type=float, default=None, help="plan: expected kept share (default: the probe's)")
    return p.parse_args(argv)


def budgets(text: str) -> dict[str, int]:
    return {k.strip(): int(v) for k, v in (part.split("=") for part in text.split(",") if part.strip())}


def merge(parts: list[Path], out: Path, data_dir: Path | None = None) -> dict[str, Any]:
    """Concatenate distilled files into one training set (ids are content hashes: a repeat is dropped). With
    `data_dir`, a record whose instruction appears in a benchmark test split is dropped too (ARC-Easy train repeats
    three test questions upstream): test items never reach training."""
    from fslm.files import atomic_write_text, sha256_file

    index = None
    if data_dir is not None:
        from fslm.contamination import BenchmarkIndex

        index = BenchmarkIndex.load(data_dir)
    seen: set[str] = set()
    lines, contaminated = [], []
    for part in parts:
        for line in part.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            row = json.loads(line)
            if row["id"] in seen:
                continue
            seen.add(row["id"])
            if index is not None and index.match(row["instruction"], row.get("input")):
                contaminated.append(row["id"])
                continue
            lines.append(line)
    atomic_write_text(out, "\n".join(lines) + "\n")
    manifests = {p.name: json.loads(p.with_name(p.name + ".manifest.json").read_text()) for p in parts}
    info = {
        "parts": {
            name: {"sha256": m.get("output_sha256"), "counts": m.get("counts"), "checks": m.get("checks")}
            for name, m in manifests.items()
        },  # fmt: skip
        "records": len(lines),
        "dropped_in_test_splits": contaminated,
        "sha256": sha256_file(out),
        "options": next(iter(manifests.values())).get("options"),
        "teacher": next(iter(manifests.values())).get("teacher"),
    }
    atomic_write_text(out.with_name(out.name + ".manifest.json"), json.dumps(info, indent=2) + "\n")
    return info


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)  # a stop (kill, a session's end) still adds the step's seconds
    from fslm.cli import EventView, err
    from fslm.config import update_config
    from fslm.errors import FslmError
    from fslm.files import sha256_file
    from fslm.stackdir import MULTITASK, SINGLE, StackDir
    from fslm.steps.distill import DistillOptions, distill
    from fslm.steps.evaluate import EvalOptions, evaluate
    from fslm.steps.evaluate.rows import adapter_hashes
    from fslm.steps.init import InitOptions, init
    from fslm.steps.train import TrainOptions, train
    from fslm.teachers import TeacherSpec

    out = args.out.expanduser()
    out.mkdir(parents=True, exist_ok=True)
    stack = StackDir(out / "stack")
    # What identifies the experiment: not where it writes, how far this invocation goes, or the eval's extra options
    # (the eval reuses only rows computed with its exact setup; the ledger records what it ran).
    # The ablation is a diagnosis beside the rows: its flags do not identify the experiment either.
    skip = ("out", "data_dir", "until", "publish", "publish_root", "eval_extra", "sync", "plan", "plan_questions",
            "kept_share", "ablate_limit", "ablate_tasks", "rows_from")  # fmt: skip
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k not in skip}
    # Committed files name this machine's places by what they are (OUT, DATA_DIR, ~), so another machine resumes.
    places = {str(out.resolve()): "OUT", str(args.data_dir.expanduser().resolve()): "DATA_DIR", str(Path.home()): "~"}
    if "/" in str(args.data_dir) and not args.data_dir.is_absolute():  # manifests spell it as given: ../shared/data
        places[str(args.data_dir)] = "DATA_DIR"
    if settings.get("teacher"):
        settings["teacher"] = portable(settings["teacher"], places)
    if args.sync is not None and not (out / "ledger.json").exists() and (args.sync / "ledger.json").is_file():
        (out / "ledger.json").write_bytes((args.sync / "ledger.json").read_bytes())  # seconds of earlier sittings
    else:
        name_places(out / "ledger.json", places)
    add_new_settings(out / "ledger.json", LATER_SETTINGS)
    try:
        ledger = Ledger(out / "ledger.json", settings)
    except FslmError as e:  # another experiment's --out: refuse before touching it
        err.print(f"[red]error:[/] {e}")
        return 2
    from fslm import heap

    allocators = ledger.data.setdefault("allocators", [])  # every sitting's malloc (training speed depends on it)
    if heap.allocator_in_use() not in allocators:
        allocators.append(heap.allocator_in_use())
    threads, cores = torch_threads()
    ledger.data.setdefault("torch_threads", [])  # every sitting's, as the allocators: the step rates depend on it
    if threads not in ledger.data["torch_threads"]:
        ledger.data["torch_threads"].append(threads)
    if threads < cores:
        err.print(f"[yellow]warning:[/] PyTorch runs on {threads} of the {cores} cores this process may use "
                  "(OMP_NUM_THREADS / MKL_NUM_THREADS); training and evaluation will be slower")  # fmt: skip
    sources = (
        {name: (args.data_dir / rel, fmt, getattr(args, name.removesuffix("_train"))) for name, (rel, fmt) in MC_SOURCES.items()}
        if args.regime == "mc"
        else {"alpaca": (args.data_dir / args.alpaca_glob, "alpaca", args.alpaca)}
    )  # fmt: skip
    policy = args.reference or ("hint-on-retry" if args.regime == "mc" else "hidden")
    data = out / "train.jsonl"

    def eval_handler(view: Any, folder: str) -> Any:
        """The progress view, plus the eval folder's rows and stage texts copied to --sync every few minutes."""
        if args.sync is None:
            return view
        return syncing(view, lambda: sync_tree(out / folder, args.sync / folder, places))

    def make_stack() -> None:
        if not stack.exists():
            init(stack.root, InitOptions(base=args.base))
            wanted = budgets(args.budgets)

            def edit(doc: Any) -> None:
                for stage in doc["stages"]:
                    if stage["name"] in wanted:
                        stage["generation"]["max_new_tokens"] = wanted[stage["name"]]

            update_config(stack.root, edit)
        have = {s.name: s.generation.max_new_tokens for s in stack.load().stages}
        differ = {n: (have.get(n), b) for n, b in budgets(args.budgets).items() if have.get(n) != b}
        if differ:  # e.g. a --plan made the stack with other budgets: training would silently use those
            raise FslmError(
                f"{stack.root / 'stack.yaml'}: stage budgets differ from --budgets ("
                + ", ".join(f"{n} {h} vs {b}" for n, (h, b) in differ.items())
                + "); use that stack's budgets or start from an empty --out"
            )

    def distil() -> None:
        parts = []
        for name, (path, fmt, n) in sources.items():
            part = out / f"distilled-{name}.jsonl"
            if args.sync is not None:
                seed_from(args.sync, part)
            options = DistillOptions(
                teacher=TeacherSpec(backend=args.teacher_backend, model=args.teacher, batch_size=args.teacher_batch),
                teacher_mode=args.teacher_mode,
                options=args.options,
                reference=policy,
                samples=args.samples,
                filters=args.filters,
                word_limits=args.word_limits,
                format=fmt,
                limit=n,
                seed=args.seed,
                data_dir=args.data_dir,
                cache=out / "teacher-cache.jsonl",
            )
            err.print(f"[bold]distil {name}[/]: {n} questions, {args.teacher_mode} teacher, reference {policy}")
            with EventView() as view:
                handler = (
                    view if args.sync is None else syncing(view, lambda part=part: sync_files(part, args.sync, places))
                )
                distill(path, stack.root, part, options, on_event=handler)
            if args.sync is not None:
                sync_files(part, args.sync, places)
            parts.append(part)
        ledger.data["distilled"] = merge(parts, data, args.data_dir)

    def train_all() -> None:
        # The same budget of optimizer steps for every adapter: `--epochs` over the stages' training records (the
        # multitask adapter, whose examples are every stage's, sees each of them fewer times).
        records = sum(1 for line in data.read_text(encoding="utf-8").splitlines() if line.strip())
        steps = max(1, math.ceil(args.epochs * math.floor(records * 0.9) / args.batch_size))
        ledger.data["steps_per_adapter"] = steps
        common = {"max_steps": steps, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
                  "prompt": args.prompt, "precision": args.train_precision}  # fmt: skip
        for label, extra in (("stages", {}), (SINGLE, {"single": True}), (MULTITASK, {"multitask": True})):
            names = stack.load().stage_names if label == "stages" else [label]
            trained = all(
                stack.is_trained(n) and (t := stack.training(stack.load(), n)) and t.data_sha256 == sha256_file(data)
                for n in names
            )
            if trained:
                err.print(f"{label}: already trained on this data")
                continue
            resume = (stack.train_state / "run.json").is_file()
            with EventView() as view:
                train(stack.root, data, TrainOptions(**common, **extra, resume=resume, fresh=not resume), on_event=view)
        halved = adapters_to_bf16(stack.adapters)  # before any eval: what is evaluated is what is synced
        ledger.data["adapters"] = {"dtype": "bfloat16", "sha256": adapter_hashes(stack.root)}
        if halved:
            err.print(f"adapters stored in bfloat16: {', '.join(halved)}")
        if args.sync is not None:
            sync_stack(stack.root, args.sync / "stack", places)

    def evaluate_all() -> None:
        options = EvalOptions(
            data_dir=args.data_dir,
            tasks=args.tasks,
            systems=args.systems,
            limit=args.eval_limit,
            seed=args.eval_seed,
            **json.loads(args.eval_extra),
        )
        with EventView() as view:
            result = evaluate(stack.root, out / "eval", options, on_event=eval_handler(view, "eval"))
        if args.sync is not None:
            sync_tree(out / "eval", args.sync / "eval", places)
        ledger.data["results"] = result.results
        ledger.data["eval_options"] = options.model_dump(mode="json")
        ledger.save()
        write_summary(out, ledger.data, args)

    def evaluate_gate() -> None:
        """The stack answering directly when sure and through its chain when not (τ tuned on each task's dev
        split); the chains the main eval generated are reused from its cache where the backend and budgets match."""
        if not args.gate:
            return
        extra = {**json.loads(args.eval_extra), "stack_scoring": "gate", "chains_from": out / "eval"}
        options = EvalOptions(data_dir=args.data_dir, tasks=args.tasks, systems=["stack"], limit=args.eval_limit,
                              seed=args.eval_seed, **extra)  # fmt: skip
        with EventView() as view:
            result = evaluate(stack.root, out / "eval-gate", options, on_event=eval_handler(view, "eval-gate"))
        if args.sync is not None:
            sync_tree(out / "eval-gate", args.sync / "eval-gate", places)
        ledger.data["results_gate"] = result.results

    def evaluate_teacher() -> None:
        """The teacher itself on the same items (base system of a stack whose base is the teacher): where the stack
        sits between its student and the model it learned from."""
        if not args.teacher_row or not args.teacher:
            return
        teacher_stack = out / "teacher-stack"
        if not (teacher_stack / "stack.yaml").is_file():
            init(teacher_stack, InitOptions(base=args.teacher))
        options = EvalOptions(data_dir=args.data_dir, tasks=args.tasks, systems=["base"], limit=args.eval_limit,
                              seed=args.eval_seed, backend=teacher_scoring(args))  # fmt: skip
        with EventView() as view:
            result = evaluate(teacher_stack, out / "eval-teacher", options, on_event=eval_handler(view, "eval-teacher"))
        if args.sync is not None:
            sync_tree(out / "eval-teacher", args.sync / "eval-teacher", places)
        ledger.data["results_teacher"] = result.results

    def evaluate_ablation() -> None:
        """Per-stage ablation (the diagnosis): each stage in turn on the bare base, the others trained, on a few
        hundred items; each row borrows the eval step's chains up to its ablated stage (the un-ablated row: all)."""
        if args.ablate_limit <= 0:
            return
        extra = {**json.loads(args.eval_extra), "chains_from": out / "eval"}
        options = EvalOptions(data_dir=args.data_dir, tasks=args.ablate_tasks, systems=["stack"], ablate=True,
                              limit=args.ablate_limit, seed=args.eval_seed, **extra)  # fmt: skip
        with EventView() as view:
            result = evaluate(stack.root, out / "eval-ablate", options, on_event=eval_handler(view, "eval-ablate"))
        if args.sync is not None:
            sync_tree(out / "eval-ablate", args.sync / "eval-ablate", places)
        ledger.data["results_ablation"] = result.results

    if args.plan:
        try:
            make_stack()
            report = plan(args, out, stack, sources, policy, ledger.data)
        except FslmError as e:
            err.print(f"[red]error:[/] {e}")
            return 2
        print(report["markdown"])
        return 0
    steps = (
        ("init", make_stack),
        ("distill", distil),
        ("train", train_all),
        ("eval", evaluate_all),
        ("gate", evaluate_gate),
        ("teacher", evaluate_teacher),
        ("ablate", evaluate_ablation),
    )
    outputs = {
        "init": stack.root / "stack.yaml",
        "distill": data,
        "train": stack.root / "adapters",
        "eval": out / "eval",
    }
    if args.sync is not None:  # a new machine: the trained stack and the eval rows of earlier sittings
        seed_stack(args.sync / "stack", stack.root)
        for folder in EVAL_FOLDERS:
            seed_tree(args.sync / folder, out / folder)
    if args.rows_from is not None:  # after --sync: a row this campaign already has is its own
        borrowed = borrow_rows(args.rows_from, out)
        if borrowed:
            ledger.data.setdefault("rows_from", {}).update(
                {"folder": portable(str(args.rows_from.resolve()), {str(REPO): "REPO", **places}), **borrowed}
            )
    for name, made in outputs.items():  # a ledger seeded from --sync: a step is done only where its output is here
        if ledger.done(name) and not made.exists():
            ledger.data["steps"][name]["finished"] = False
    for name in supersede_stale(ledger.data):
        err.print(f"[yellow]{name}: done on other adapters than today's; it runs again[/]")
    try:
        for name, fn in steps:
            if ledger.done(name):
                err.print(f"[dim]{name}: done[/]")
            else:
                err.print(f"[bold cyan]experiment2 ({args.regime}): {name}[/]")
                entry = ledger.data["steps"].setdefault(name, {"seconds": 0.0, "invocations": 0, "finished": False})
                if name in ON_ADAPTERS:
                    entry["adapters"] = adapters_fingerprint(ledger.data)
                ledger.step(name, fn)
                ledger.finish(name)
            if name == args.until:
                break
    except FslmError as e:
        err.print(f"[red]error:[/] {e}")
        return 2
    finally:  # also when stopped: the committed ledger then has the interrupted step's seconds too
        if args.sync is not None:  # and the eval rows and chains written since the last copy
            for folder in EVAL_FOLDERS:
                if (out / folder).is_dir():
                    sync_tree(out / folder, args.sync / folder, places)
        if args.sync is not None and (out / "ledger.json").is_file():
            args.sync.mkdir(parents=True, exist_ok=True)
            (args.sync / "ledger.json").write_text(portable((out / "ledger.json").read_text(), places))
    if ledger.done("eval"):
        write_summary(out, ledger.data, args)  # again: the ledger now counts the eval step's time too
        if args.publish:
            publish(out, ledger.data, args, places)
    return 0


def teacher_scoring(args: argparse.Namespace) -> str:
    """The backend that scores the teacher's row: the one it distilled on where that can score (llama.cpp scores
    the GGUF in its own quantisation, the model that wrote the targets; PyTorch would run it de-quantised to fp32)."""
    return "llamacpp" if args.teacher_backend == "llamacpp" else "torch"


def write_summary(out: Path, ledger: dict[str, Any], args: argparse.Namespace) -> None:
    """OUT/summary.md: the section for docs/experiments.md (data, the eval's report, where the time went)."""
    from fslm.files import atomic_write_text

    distilled = ledger.get("distilled", {})
    lines = [f"Command: `python benchmarks/experiment2.py --regime {args.regime} ...` (settings in ledger.json)", ""]
    lines += ["| distilled part | selected | kept | teacher blind accuracy | rejected |", "|---|---:|---:|---:|---|"]
    for name, part in distilled.get("parts", {}).items():
        counts, checks = part.get("counts") or {}, part.get("checks") or {}
        rejected = ", ".join(f"{k} {v}" for k, v in (counts.get("filtered") or {}).items() if v) or "-"
        lines.append(
            f"| {name} | {counts.get('selected', '-')} | {counts.get('written_records', '-')} | "
            f"{checks.get('teacher_blind_accuracy', '-')} | {rejected} |"
        )
    dropped = distilled.get("dropped_in_test_splits") or []
    lines += ["", f"Training set: {distilled.get('records', '-')} records (sha256 `{distilled.get('sha256', '-')}`), "
              f"{len(dropped)} dropped because their question is in a test split; "
              f"{ledger.get('steps_per_adapter', '-')} optimizer steps per adapter.", ""]  # fmt: skip
    for folder, title in (("eval", None), ("eval-gate", "The stack's gate row"), ("eval-teacher", "The teacher's row"),
                          ("eval-ablate", "Per-stage ablation")):  # fmt: skip
        report = out / folder / "report.md"
        if report.is_file():
            lines += ([f"### {title}", ""] if title else []) + [report.read_text(encoding="utf-8").strip(), ""]
    borrowed = dict(ledger.get("rows_from") or {})
    folder = borrowed.pop("folder", "")
    for rel, key in borrowed.items():
        row = out / rel
        same = row.is_file() and json.loads(row.read_text(encoding="utf-8")).get("key") == key
        how = (
            f"reused from `{folder}` (the same key: items, data and options)"
            if same
            else "computed anew (its setup differed)"
        )
        lines += [f"Row `{rel}`: {how}.", ""]
    lines += ["| step | wall-clock | invocations |", "|---|---:|---:|"]
    for name, step in ledger.get("steps", {}).items():
        lines.append(f"| {name} | {step['seconds'] / 3600:.2f} h | {step['invocations']} |")
    atomic_write_text(out / "summary.md", "\n".join(lines) + "\n")


# --- the plan ------------------------------------------------------------------------------------------------------

ADAPTERS = ("stages", "single", "multitask")
LORA_OVERHEAD = 1.2  # a system with a LoRA adapter scores ~1.2x the bare base's time (README, "Measured")


def done_so_far(out: Path, sources: dict[str, Any]) -> dict[str, int]:
    """Questions of each source already distilled (written or rejected), from OUT's files."""
    done = {}
    for name in sources:
        part = out / f"distilled-{name}.jsonl"
        rows = [part, part.with_name(part.name + ".rejected.jsonl")]
        done[name] = len({json.loads(x)["id"] for f in rows if f.is_file() for x in f.read_text().splitlines() if x})
    return done


def probe_teacher(args: argparse.Namespace, out: Path, stack: Any, sources: dict[str, Any], policy: str) -> dict:
    """Distil `--plan-questions` questions of the first source (own files and cache): seconds a question, kept share."""
    from fslm.steps.distill import DistillOptions, distill
    from fslm.teachers import TeacherSpec

    name, (path, fmt, _) = next(iter(sources.items()))
    target = out / "plan" / f"probe-{name}.jsonl"
    target.parent.mkdir(parents=True, exist_ok=True)
    options = DistillOptions(
        teacher=TeacherSpec(backend=args.teacher_backend, model=args.teacher, batch_size=args.teacher_batch),
        teacher_mode=args.teacher_mode,
        options=args.options,
        reference=policy,
        filters=args.filters,
        word_limits=args.word_limits,
        format=fmt,
        limit=args.plan_questions,
        seed=args.seed + 7919,  # another sample than the campaign's
        overwrite=True,
    )
    r = distill(path, stack.root, target, options)
    return {
        "source": name,
        "questions": r.selected - r.resumed,
        "seconds": round(r.seconds, 1),
        "seconds_per_question": round(r.seconds / max(r.selected - r.resumed, 1), 2),
        "kept_share": round(r.written_records / max(r.selected, 1), 3),
        "cache_hits": r.cache_hits,  # 0: every question was timed
        "file": target,
    }


def probe_train(stack: Any, data: Path, batch_size: int, steps: int = 3, form: str = "full") -> dict:
    """Example lengths per adapter (from the probe's records) and seconds of one optimizer step on the answer stage's
    longest examples, as `fslm train` takes it (LoRA, the sliced loss, and the micro-batches and checkpointing its
    default `--gradient-checkpointing auto` picks at the default memory budget), on PyTorch."""
    import time

    import torch
    from peft import get_peft_model

    from fslm import heap
    from fslm.distilled import read_distilled
    from fslm.errors import FslmError
    from fslm.stack import Stack
    from fslm.stackdir import MULTITASK, SINGLE
    from fslm.steps.train.batches import PadCollator
    from fslm.steps.train.examples import build_examples
    from fslm.steps.train.loss import target_token_loss
    from fslm.steps.train.memory import plan_step
    from fslm.steps.train.options import TrainOptions
    from fslm.steps.train.trainer import lora_config

    loaded = Stack.load(stack.root, backend="torch")
    records, _ = read_distilled(data)
    lengths = {}
    for name in [*loaded.config.stage_names, SINGLE, MULTITASK]:
        examples = build_examples(loaded, records, [], name, form=form).train
        lengths[name] = {"examples_per_record": round(len(examples) / max(len(records), 1), 2),
                         "tokens_per_example": round(sum(len(e["input_ids"]) for e in examples) / max(len(examples), 1), 1)}  # fmt: skip
    examples = build_examples(loaded, records, [], loaded.config.final_stage.name, form=form).train
    if not examples:
        raise FslmError(f"{data}: the teacher probe kept no record to time training on; raise --plan-questions")
    batch_examples = sorted(examples, key=lambda e: -len(e["input_ids"]))[:batch_size]
    while len(batch_examples) < batch_size:  # fewer records than a batch: repeat them
        batch_examples += batch_examples[: batch_size - len(batch_examples)]
    tok = loaded.backend.tokenizer
    batch = PadCollator(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)(batch_examples)
    model = get_peft_model(loaded.backend.release_adapters(), lora_config(loaded.config.lora))
    heap.return_free_memory()
    budget = TrainOptions().memory_budget
    plan = plan_step(
        model.config, [len(e["input_ids"]) for e in examples], batch_size, budget, loaded.config.lora.dropout
    )
    if plan.every_n_layers is not None:
        model.activation_checkpointing_enable({"use_reentrant": False}, every_n_layers=plan.every_n_layers)
        model.enable_input_require_grads()
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    head = model.get_output_embeddings()
    micro = [{k: v[i : i + plan.micro_batch] for k, v in batch.items()} for i in range(0, batch_size, plan.micro_batch)]
    targets = int(batch["labels"][:, 1:].ne(-100).sum())
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        for part in micro:  # gradients accumulate to the whole batch's, as the Trainer's
            loss, _ = target_token_loss(model, head, part, num_items_in_batch=targets)
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - start)
    tokens = int(batch["attention_mask"].sum())
    step = sum(seconds[1:]) / max(len(seconds) - 1, 1)
    return {"lengths": lengths, "batch_tokens": tokens, "seconds_per_step": round(step, 2),
            "tokens_per_second": round(tokens / step, 1), "step_plan": plan.describe(batch_size)}  # fmt: skip


def probe_eval(args: argparse.Namespace, out: Path, stack: Any, stage_tokens: int) -> dict:
    """Seconds a question of the base and of the (untrained) stack's chain on a few ARC-Easy items, stages capped at
    the distilled targets' mean length (a trained stage stops about there). Only the time is kept."""
    from fslm.steps.evaluate import EvalOptions, evaluate

    options = EvalOptions(
        data_dir=args.data_dir, tasks=["arc_easy"], systems=["base", "stack"], limit=8, seed=args.eval_seed + 1,
        stage_tokens=stage_tokens, stage_check=0,
    )  # fmt: skip
    rows = evaluate(stack.root, out / "plan" / "eval", options).results["systems"]
    return {
        "base_seconds_per_question": rows["base"]["seconds_per_query"],
        "stack_seconds_per_question": rows["stack"]["seconds_per_query"],
        "stage_tokens": stage_tokens,
    }


def probe_teacher_row(args: argparse.Namespace, out: Path) -> dict:
    """Seconds a question of the teacher's own row (the campaign's teacher stack, its backend) on the same few
    ARC-Easy items as `probe_eval`."""
    from fslm.steps.evaluate import EvalOptions, evaluate
    from fslm.steps.init import InitOptions, init

    teacher_stack = out / "teacher-stack"
    if not (teacher_stack / "stack.yaml").is_file():
        init(teacher_stack, InitOptions(base=args.teacher))
    backend = teacher_scoring(args)
    options = EvalOptions(data_dir=args.data_dir, tasks=["arc_easy"], systems=["base"], limit=8,
                          seed=args.eval_seed + 1, backend=backend)  # fmt: skip
    row = evaluate(teacher_stack, out / "plan" / "eval-teacher", options).results["systems"]["base"]
    return {"teacher_seconds_per_question": row["seconds_per_query"], "teacher_backend": backend}


def eval_items(args: argparse.Namespace, tasks: str | None = None) -> dict[str, int]:
    """Test items per task the eval will score (its seeded subset, or the whole split when smaller)."""
    sizes = {"arc_easy": 2376, "arc_challenge": 1172, "openbookqa": 500, "mmlu": 14079}
    return {t: min(args.eval_limit, sizes.get(t, args.eval_limit)) for t in (tasks or args.tasks).split(",")}


def torch_threads() -> tuple[int, int]:
    """PyTorch's intra-op threads and the cores this process may run on. MKL_NUM_THREADS=1 beside OMP_NUM_THREADS=2
    (a common way to quiet numpy) also holds PyTorch to one thread: a campaign sitting once trained at half speed so."""
    import os

    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return torch.get_num_threads(), cores


def plan(args: argparse.Namespace, out: Path, stack: Any, sources: dict[str, Any], policy: str, ledger: dict) -> dict:
    """Expected wall time of every step left, from rates measured now (module docstring: --plan)."""
    import shutil

    from fslm.files import atomic_write_text
    from fslm.steps.evaluate import EvalOptions

    shutil.rmtree(
        out / "plan", ignore_errors=True
    )  # every rate measured now: an earlier plan's caches would time nothing
    done = done_so_far(out, sources)
    teacher = probe_teacher(args, out, stack, sources, policy)
    kept_share = args.kept_share if args.kept_share is not None else max(teacher["kept_share"], 0.05)
    train = probe_train(stack, teacher["file"], args.batch_size, form=args.prompt)
    manifest = json.loads(teacher["file"].with_name(teacher["file"].name + ".manifest.json").read_text())
    targets = manifest.get("target_tokens") or {}
    earlier = [s for s in stack.load().stage_names[:-1] if s in targets]
    stage_tokens = max(8, round(sum(targets[s]["mean"] for s in earlier) / max(len(earlier), 1)))
    ev = probe_eval(args, out, stack, stage_tokens)
    lent = {r for r in BORROWABLE if args.rows_from is not None and (args.rows_from / r).is_file()}
    if args.teacher_row and args.teacher and "eval-teacher/systems/base.json" not in lent:
        ev.update(probe_teacher_row(args, out))

    rows = []
    questions = sum(n for _, _, n in sources.values())
    left = {name: max(0, n - done.get(name, 0)) for name, (_, _, n) in sources.items()}
    finished = ledger.get("steps", {})
    distill_h = sum(left.values()) * teacher["seconds_per_question"] / 3600
    rows.append(
        (
            "distill",
            f"{sum(left.values())} of {questions} questions left",
            f"{teacher['seconds_per_question']} s/question",
            distill_h,
        )
    )
    kept = round(questions * kept_share)
    train_records = math.floor(kept * 0.9)  # 10 % held out for validation
    steps = math.ceil(args.epochs * train_records / args.batch_size)
    step_tokens = args.batch_size * train["lengths"][stack.load().final_stage.name]["tokens_per_example"]
    train_h = 0.0
    for name, length in train["lengths"].items():
        per_step = args.batch_size * length["tokens_per_example"] / train["tokens_per_second"]
        hours = steps * per_step / 3600
        train_h += hours
        rows.append(
            (
                f"train {name}",
                f"{steps} steps x {args.batch_size} examples of ~{length['tokens_per_example']:.0f} tokens",
                f"{train['tokens_per_second']} tokens/s",
                hours,
            )
        )
    student_h = kept * (ev["stack_seconds_per_question"] - ev["base_seconds_per_question"]) / 3600
    rows.append(
        (
            "train: student's earlier stages",
            f"{kept} records",
            f"{ev['stack_seconds_per_question'] - ev['base_seconds_per_question']:.2f} s/record",
            student_h,
        )
    )
    items = eval_items(args)
    per_system = {"base": ev["base_seconds_per_question"], "single": ev["base_seconds_per_question"] * LORA_OVERHEAD,
                  "multitask": ev["base_seconds_per_question"] * LORA_OVERHEAD,
                  "stack": ev["stack_seconds_per_question"] + ev["base_seconds_per_question"] * (LORA_OVERHEAD - 1)}  # fmt: skip
    n_items = sum(items.values())
    eval_h = 0.0
    for system in args.systems.split(","):
        sec = per_system.get(system, per_system["stack"])
        reused = system == "base" and "eval/systems/base.json" in lent
        hours = 0.0 if reused else n_items * sec / 3600
        eval_h += hours
        rows.append(
            (
                f"eval {system}",
                f"{n_items} test items ({', '.join(f'{t} {n}' for t, n in items.items())})"
                + (f"; reused from {args.rows_from} where its key matches" if reused else ""),
                f"{sec:.2f} s/question",
                hours,
            )
        )
    if args.gate:
        # Test items: direct scoring, and scoring after the chain for the unsure share (here: all); the chains
        # themselves come from the eval step (--chains-from). Dev items that tune τ: direct + a chain generated.
        sec = 2 * per_system["single"]
        tune = EvalOptions.model_fields["tune_limit"].default * len(items)
        tune_sec = per_system["single"] + per_system["stack"]
        rows.append(
            (
                "gate stack",
                f"{n_items} test items, the eval step's chains reused; {tune} dev items tune τ",
                f"<= {sec:.2f} s/test question, {tune_sec:.2f} s/dev question",
                (n_items * sec + tune * tune_sec) / 3600,
            )
        )
    if args.teacher_row and args.teacher and "eval-teacher/systems/base.json" in lent:
        rows.append(
            ("teacher row", f"{n_items} test items, reused from {args.rows_from} where its key matches", "-", 0.0)
        )
    elif args.teacher_row and args.teacher:
        sec = ev["teacher_seconds_per_question"]
        rows.append(
            (
                "teacher row",
                f"{n_items} test items, the teacher on {ev['teacher_backend']}",
                f"{sec:.2f} s/question",
                n_items * sec / 3600,
            )
        )
    if args.ablate_limit > 0:
        stages = stack.load().stage_names
        ablate_items = sum(min(args.ablate_limit, n) for n in eval_items(args, args.ablate_tasks).values())
        # Each row borrows the eval's chain up to its ablated stage: stage k of n generates n-1-k of the n-1 earlier
        # stages (the answer's ablation none): the n rows generate n/2 whole chains a question and score n times.
        earlier = max(len(stages) - 1, 1)
        chains = sum(earlier - k for k in range(earlier)) / earlier
        generate = per_system["stack"] - per_system["single"]
        rows.append(
            (
                "ablate stages",
                f"{len(stages)} rows x {ablate_items} test items ({args.ablate_tasks}), the eval's chains borrowed "
                f"up to the ablated stage: {chains:g} chains generated a question",
                f"{per_system['single']:.2f} s/question scoring, {generate:.2f} a chain",
                ablate_items * (len(stages) * per_system["single"] + chains * generate) / 3600,
            )
        )
    for name in STEPS:
        if finished.get(name, {}).get("finished"):
            rows = [r for r in rows if not r[0].startswith(name)]
    total = sum(r[3] for r in rows)
    lines = [
        f"Plan of `experiment2.py --regime {args.regime}` (measured {teacher['questions']} teacher questions, "
        f"{train['batch_tokens']}-token training steps ({train['step_plan']}), 8 eval questions per system on this machine, PyTorch on {torch_threads()[0]} threads; kept share "
        f"{kept_share:.0%} {'given' if args.kept_share is not None else 'from the probe'}; {steps} optimizer steps "
        f"per adapter = {args.epochs} epoch of {train_records} records):",
        "",
        "| step | work | rate | hours |",
        "|---|---|---|---:|",
        *(f"| {a} | {b} | {c} | {h:.2f} |" for a, b, c, h in rows),
        f"| **total** | | | **{total:.1f}** |",
    ]
    report = {
        "rows": [{"step": a, "work": b, "rate": c, "hours": round(h, 3)} for a, b, c, h in rows],
        "total_hours": round(total, 4),
        "teacher": {k: v for k, v in teacher.items() if k != "file"},
        "train": train,
        "eval": ev,
        "done": done,
        "kept_share": kept_share,
        "steps_per_adapter": steps,
        "step_tokens": step_tokens,
        "markdown": "\n".join(lines),
    }
    atomic_write_text(out / "plan.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(out / "plan.md", report["markdown"] + "\n")
    return report


def part_files(part: Path) -> list[Path]:
    """A distilled part and what resumes it: the rows, the rejected rows, the manifest (the cache is optional)."""
    return [part, part.with_name(part.name + ".rejected.jsonl"), part.with_name(part.name + ".manifest.json")]


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


# The steps whose rows read the trained adapters (the teacher row reads none: its rows stay valid on any adapters).
ON_ADAPTERS = ("eval", "gate", "ablate")


def adapters_fingerprint(ledger: dict[str, Any]) -> str | None:
    """One hash of the trained adapters' sha256s (the ledger's `adapters`), or None before training."""
    import hashlib

    hashes = (ledger.get("adapters") or {}).get("sha256")
    return hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()[:16] if hashes else None


def supersede_stale(ledger: dict[str, Any]) -> list[str]:
    """The steps whose rows read the adapters (ON_ADAPTERS) and ran on other adapters than today's (retrained on a
    new machine), or on adapters they did not record (a ledger from before this check), are not done: their entries
    move to `superseded`, so a step's seconds count the current adapters' run only. Returns the steps moved."""
    today, moved = adapters_fingerprint(ledger), []
    for name in ON_ADAPTERS:
        entry = ledger.get("steps", {}).get(name)
        if entry is not None and entry.get("adapters") != today:
            ledger.setdefault("superseded", []).append({"step": name, **entry})
            del ledger["steps"][name]
            moved.append(name)
    return moved


def portable(text: str, places: dict[str, str]) -> str:
    """`text` with this machine's paths named by what they are (`places`: path -> name, the longest path first),
    each only as a whole path or a path's start: `../shared/data` names a place, `x../shared/database` does not."""
    for path in sorted(places, key=len, reverse=True):
        text = re.sub(rf"(?<![\w.~/-]){re.escape(path)}(?![\w.-])", lambda _m, name=places[path]: name, text)
    return text


# Settings added after ledgers were written, at what the older code did.
LATER_SETTINGS = {"prompt": "full", "train_precision": "auto", "word_limits": False}


def add_new_settings(ledger: Path, later: dict[str, Any]) -> None:
    """Give a ledger written before a setting existed that setting's old behaviour, so it resumes; a run that
    asks for another value is then refused like any other change of settings."""
    from fslm.files import atomic_write_text

    if ledger.is_file():
        data = json.loads(ledger.read_text(encoding="utf-8"))
        missing = {k: v for k, v in later.items() if k not in data.get("settings", {})}
        if missing and "settings" in data:
            data["settings"].update(missing)
            atomic_write_text(ledger, json.dumps(data, indent=2) + "\n")


def name_places(ledger: Path, places: dict[str, str]) -> None:
    """Rewrite a ledger written before paths were named by place (its settings would differ from today's only in
    how the teacher's path is spelt, and the ledger would refuse to resume)."""
    from fslm.files import atomic_write_text

    if ledger.is_file():
        text = ledger.read_text(encoding="utf-8")
        if portable(text, places) != text:
            atomic_write_text(ledger, portable(text, places))


def sync_files(part: Path, folder: Path, places: dict[str, str]) -> None:
    """Copy a distilled part's files into `folder` (atomically each, so a commit never sees half a file), the
    manifest's machine paths named by `places` (the resume check compares no paths)."""
    from fslm.files import atomic_write_text

    folder.mkdir(parents=True, exist_ok=True)
    for f in part_files(part):
        if f.is_file():
            text = f.read_text(encoding="utf-8")
            atomic_write_text(folder / f.name, text if f.suffix == ".jsonl" else portable(text, places))


def seed_from(folder: Path, part: Path) -> None:
    """Start a part from `folder`'s copy when OUT has none yet: a new machine resumes from what was committed."""
    if part.exists() or not (folder / part.name).is_file():
        return
    for f in part_files(part):
        source = folder / f.name
        if source.is_file():
            f.write_bytes(source.read_bytes())
    print(f"resuming {part.name} from {folder}", file=sys.stderr)


def syncing(view: Any, act: Any, every: float = 300.0) -> Any:
    """The progress view, plus `act()` (a copy to --sync) at most every `every` seconds."""
    import time

    last = time.monotonic()

    def handler(event: Any) -> None:
        nonlocal last
        view(event)
        if time.monotonic() - last >= every:
            act()
            last = time.monotonic()

    return handler


EVAL_FOLDERS = ("eval", "eval-gate", "eval-teacher", "eval-ablate")
STACK_FILES = ("stack.yaml", "README.md")


def adapters_to_bf16(adapters: Path) -> list[str]:
    """Store each adapter's float32 weights in bfloat16, in place: half the bytes to keep, copy to --sync and commit
    (6 adapters, ~59 MB), and the eval then runs on exactly the synced bytes. LoRA factors lose nothing that shows:
    PEFT and the GGUF export read them back as float32 (bfloat16 is the top half of a float32)."""
    import torch
    from safetensors.torch import load_file, save

    from fslm.files import atomic_write_bytes

    done = []
    for weights in sorted(adapters.glob("*/adapter_model.safetensors")):
        tensors = load_file(weights)
        if not any(t.dtype == torch.float32 for t in tensors.values()):
            continue
        halved = {k: t.to(torch.bfloat16) if t.dtype == torch.float32 else t for k, t in tensors.items()}
        atomic_write_bytes(weights, save(halved, metadata={"format": "pt"}))
        done.append(weights.parent.name)
    return done


def sync_stack(stack: Path, folder: Path, places: dict[str, str]) -> None:
    """The trained stack into `folder`: stack.yaml (machine paths named by `places`), the model card, every adapter
    folder, so a new machine evaluates the same adapters instead of training again."""
    from fslm.files import atomic_write_text

    folder.mkdir(parents=True, exist_ok=True)
    for name in STACK_FILES:
        if (stack / name).is_file():
            atomic_write_text(folder / name, portable((stack / name).read_text(encoding="utf-8"), places))
    sync_tree(stack / "adapters", folder / "adapters", places)


def seed_stack(folder: Path, stack: Path) -> None:
    """Start OUT's stack from `folder`'s trained one when OUT has no trained adapter yet (a new machine); stack.yaml
    keeps the place names sync_stack gave its paths (they only say where the training data was)."""
    import shutil

    if not any(folder.glob("adapters/*/adapter_model.safetensors")) or any(
        stack.glob("adapters/*/adapter_model.safetensors")
    ):
        return
    stack.mkdir(parents=True, exist_ok=True)
    for name in STACK_FILES:
        if (folder / name).is_file():
            shutil.copyfile(folder / name, stack / name)
    shutil.copytree(folder / "adapters", stack / "adapters", dirs_exist_ok=True)
    print(f"resuming the trained stack from {folder}", file=sys.stderr)


def sync_tree(source: Path, folder: Path, places: dict[str, str]) -> None:
    """Copy a folder's files (an eval's, the adapters) into `folder`, each atomically; JSON and reports with machine paths named by
    `places` (stage texts byte for byte: a resumed eval reads them back)."""
    from fslm.files import atomic_write_bytes, atomic_write_text

    for f in sorted(p for p in source.rglob("*") if p.is_file()):
        target = folder / f.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        if f.suffix in (".json", ".md"):
            atomic_write_text(target, portable(f.read_text(encoding="utf-8"), places))
        else:
            atomic_write_bytes(target, f.read_bytes())


BORROWABLE = ("eval/systems/base.json", "eval-teacher/systems/base.json")  # rows that read no adapter


def borrow_rows(folder: Path, out: Path) -> dict[str, str]:
    """Copy another campaign's rows that read no adapter (BORROWABLE) into OUT where OUT has none; returns each
    copied row's key, so the summary can tell a reused row (same key after the eval) from one computed anew."""
    borrowed = {}
    for rel in BORROWABLE:
        source, target = folder / rel, out / rel
        if source.is_file() and not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(source.read_bytes())
            borrowed[rel] = json.loads(source.read_text(encoding="utf-8")).get("key", "")
            print(f"borrowing {rel} from {folder}", file=sys.stderr)
    return borrowed


def seed_tree(folder: Path, target: Path) -> None:
    """Start an eval folder from `folder`'s copy when OUT has none: its rows resume where the copy stopped (a row is
    reused by its key, hashes of data and adapters, not by any path)."""
    import shutil

    if folder.is_dir() and not target.exists():
        shutil.copytree(folder, target)
        print(f"resuming {target.name} from {folder}", file=sys.stderr)


def publish(out: Path, ledger: dict[str, Any], args: argparse.Namespace, places: dict[str, str]) -> None:
    """Copy the small outputs where they are committed (machine paths named by `places`): results JSON to
    docs/results/, distilled data to data/."""
    repo = args.publish_root
    tag = f"exp2-{args.regime}"
    results = repo / "docs" / "results" / tag
    data = repo / "data" / tag
    copies = {f: results / f.name for f in [*(out / "eval").glob("*.json"), out / "ledger.json", out / "summary.md"]}
    for f in [out / "train.jsonl", out / "train.jsonl.manifest.json", *out.glob("distilled-*.jsonl*")]:
        if not f.name.endswith((".cache.jsonl", ".lock")):
            copies[f] = data / f.name
    for source, target in copies.items():
        target.parent.mkdir(parents=True, exist_ok=True)
        text = source.read_text(encoding="utf-8")  # rows stay byte for byte (their manifests hold their sha256)
        target.write_text(text if source.suffix == ".jsonl" else portable(text, places), encoding="utf-8")
    print(f"published: {results}, {data}")


if __name__ == "__main__":
    from fslm import heap

    heap.restart_under_allocator()  # it trains in-process: under tcmalloc as `fslm train` is (docs/train.md)
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the ledger has the step's seconds, the parts resume
        print("experiment2: interrupted; the same command resumes", file=sys.stderr)
        sys.exit(130)
