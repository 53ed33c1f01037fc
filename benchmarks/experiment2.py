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
import signal
import sys
from pathlib import Path
from typing import Any

from fslm.provenance import Ledger

sys.path.insert(0, str(Path(__file__).resolve().parent))  # its parts beside it, also when loaded by path (tests)
from exp2_plan import distill_options, plan, teacher_scoring, torch_threads  # noqa: E402
from exp2_sync import (  # noqa: E402
    EVAL_FOLDERS,
    adapters_to_bf16,
    borrow_rows,
    name_places,
    portable,
    publish,
    seed_from,
    seed_stack,
    seed_tree,
    sync_files,
    sync_stack,
    sync_tree,
    syncing,
)

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
    p.add_argument(
        "--fit-overlong",
        action="store_true",
        help="fslm distill --fit-overlong: a target longer than its stage's budget is trimmed to it, not dropped "
        "(regime A ran without)",
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
    from fslm.steps.distill import distill
    from fslm.steps.evaluate import EvalOptions, evaluate
    from fslm.steps.evaluate.rows import adapter_hashes
    from fslm.steps.init import InitOptions, init
    from fslm.steps.train import TrainOptions, train

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
            options = distill_options(
                args, policy, fmt, n, args.seed, data_dir=args.data_dir, cache=out / "teacher-cache.jsonl"
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


# Settings added after ledgers were written, at what the older code did.
LATER_SETTINGS = {"prompt": "full", "train_precision": "auto", "word_limits": False, "fit_overlong": False}


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


if __name__ == "__main__":
    from fslm import heap

    heap.restart_under_allocator()  # it trains in-process: under tcmalloc as `fslm train` is (docs/train.md)
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the ledger has the step's seconds, the parts resume
        print("experiment2: interrupted; the same command resumes", file=sys.stderr)
        sys.exit(130)
