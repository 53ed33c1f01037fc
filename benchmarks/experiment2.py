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
import shutil
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
    p.add_argument("--filters", default="empty,overlong,repetition,leak", help="distill's quality filters")
    p.add_argument("--alpaca-glob", default=ALPACA, help="Alpaca files under the data dir (regime alpaca)")
    p.add_argument("--budgets", default="intent=48,plan=64,reasoning=128,answer=48", help="stage max_new_tokens")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--seed", type=int, default=0, help="seed of the samples and of training")
    p.add_argument("--systems", default="base,single,multitask,stack")
    p.add_argument("--tasks", default="arc_easy,arc_challenge,openbookqa,mmlu")
    p.add_argument("--eval-limit", type=int, default=1000, help="items per task (seeded); full set when smaller")
    p.add_argument("--eval-seed", type=int, default=1234)
    p.add_argument("--eval-extra", default="{}", help="JSON of further EvalOptions fields (scoring modes, ...)")
    p.add_argument("--publish", action="store_true", help="copy results to docs/results/ and data to data/ (real runs)")
    p.add_argument(
        "--sync",
        type=Path,
        default=None,
        help="a folder (e.g. data/exp2-mc) that receives the distilled files every few minutes while they grow, and "
        "from which a new OUT is seeded, so a campaign resumes from what was committed",
    )
    p.add_argument("--until", choices=("init", "distill", "train", "eval"), default="eval", help="stop after this step")
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
    from fslm.cli import EventView, err
    from fslm.config import update_config
    from fslm.errors import FslmError
    from fslm.files import sha256_file
    from fslm.stackdir import MULTITASK, SINGLE, StackDir
    from fslm.steps.distill import DistillOptions, distill
    from fslm.steps.evaluate import EvalOptions, evaluate
    from fslm.steps.init import InitOptions, init
    from fslm.steps.train import TrainOptions, train
    from fslm.teachers import TeacherSpec

    out = args.out.expanduser()
    out.mkdir(parents=True, exist_ok=True)
    stack = StackDir(out / "stack")
    # What identifies the experiment: not where it writes, how far this invocation goes, or the eval's extra options
    # (the eval reuses only rows computed with its exact setup; the ledger records what it ran).
    skip = ("out", "data_dir", "until", "publish", "eval_extra", "sync")
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k not in skip}
    if args.sync is not None and not (out / "ledger.json").exists() and (args.sync / "ledger.json").is_file():
        (out / "ledger.json").write_bytes((args.sync / "ledger.json").read_bytes())  # seconds of earlier sittings
    try:
        ledger = Ledger(out / "ledger.json", settings)
    except FslmError as e:  # another experiment's --out: refuse before touching it
        err.print(f"[red]error:[/] {e}")
        return 2
    sources = (
        {name: (args.data_dir / rel, fmt, getattr(args, name.removesuffix("_train"))) for name, (rel, fmt) in MC_SOURCES.items()}
        if args.regime == "mc"
        else {"alpaca": (args.data_dir / args.alpaca_glob, "alpaca", args.alpaca)}
    )  # fmt: skip
    policy = args.reference or ("hint-on-retry" if args.regime == "mc" else "hidden")
    data = out / "train.jsonl"

    def make_stack() -> None:
        if not stack.exists():
            init(stack.root, InitOptions(base=args.base))
            wanted = budgets(args.budgets)

            def edit(doc: Any) -> None:
                for stage in doc["stages"]:
                    if stage["name"] in wanted:
                        stage["generation"]["max_new_tokens"] = wanted[stage["name"]]

            update_config(stack.root, edit)

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
                format=fmt,
                limit=n,
                seed=args.seed,
                data_dir=args.data_dir,
                cache=out / "teacher-cache.jsonl",
            )
            err.print(f"[bold]distil {name}[/]: {n} questions, {args.teacher_mode} teacher, reference {policy}")
            with EventView() as view:
                handler = view if args.sync is None else syncing(view, part, args.sync)
                distill(path, stack.root, part, options, on_event=handler)
            if args.sync is not None:
                sync_files(part, args.sync)
            parts.append(part)
        ledger.data["distilled"] = merge(parts, data, args.data_dir)

    def train_all() -> None:
        common = {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed}
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
            result = evaluate(stack.root, out / "eval", options, on_event=view)
        ledger.data["results"] = result.results
        ledger.data["eval_options"] = options.model_dump(mode="json")

    steps = (("init", make_stack), ("distill", distil), ("train", train_all), ("eval", evaluate_all))
    outputs = {
        "init": stack.root / "stack.yaml",
        "distill": data,
        "train": stack.root / "adapters",
        "eval": out / "eval",
    }
    for name, made in outputs.items():  # a ledger seeded from --sync: a step is done only where its output is here
        if ledger.done(name) and not made.exists():
            ledger.data["steps"][name]["finished"] = False
    try:
        for name, fn in steps:
            if ledger.done(name):
                err.print(f"[dim]{name}: done[/]")
                continue
            err.print(f"[bold cyan]experiment2 ({args.regime}): {name}[/]")
            ledger.step(name, fn)
            ledger.finish(name)
            if args.sync is not None:
                args.sync.mkdir(parents=True, exist_ok=True)
                (args.sync / "ledger.json").write_text((out / "ledger.json").read_text())
            if name == args.until:
                break
    except FslmError as e:
        err.print(f"[red]error:[/] {e}")
        return 2
    if args.publish and ledger.done("eval"):
        publish(out, ledger.data, args)
    return 0


def part_files(part: Path) -> list[Path]:
    """A distilled part and what resumes it: the rows, the rejected rows, the manifest (the cache is optional)."""
    return [part, part.with_name(part.name + ".rejected.jsonl"), part.with_name(part.name + ".manifest.json")]


def sync_files(part: Path, folder: Path) -> None:
    """Copy a distilled part's files into `folder` (atomically each, so a commit never sees half a file)."""
    from fslm.files import atomic_write_text

    folder.mkdir(parents=True, exist_ok=True)
    for f in part_files(part):
        if f.is_file():
            atomic_write_text(folder / f.name, f.read_text(encoding="utf-8"))


def seed_from(folder: Path, part: Path) -> None:
    """Start a part from `folder`'s copy when OUT has none yet: a new machine resumes from what was committed."""
    if part.exists() or not (folder / part.name).is_file():
        return
    for f in part_files(part):
        source = folder / f.name
        if source.is_file():
            f.write_bytes(source.read_bytes())
    print(f"resuming {part.name} from {folder}", file=sys.stderr)


def syncing(view: Any, part: Path, folder: Path, every: float = 300.0) -> Any:
    """The progress view, plus a copy of the part's files to `folder` at most every `every` seconds."""
    import time

    last = time.monotonic()

    def handler(event: Any) -> None:
        nonlocal last
        view(event)
        if time.monotonic() - last >= every:
            sync_files(part, folder)
            last = time.monotonic()

    return handler


def publish(out: Path, ledger: dict[str, Any], args: argparse.Namespace) -> None:
    """Copy the small outputs where they are committed: results JSON to docs/results/, distilled data to data/."""
    repo = Path(__file__).resolve().parent.parent
    tag = f"exp2-{args.regime}"
    results = repo / "docs" / "results" / tag
    results.mkdir(parents=True, exist_ok=True)
    for f in (out / "eval").glob("*.json"):
        shutil.copy2(f, results / f.name)
    shutil.copy2(out / "ledger.json", results / "ledger.json")
    data = repo / "data" / tag
    data.mkdir(parents=True, exist_ok=True)
    for f in [out / "train.jsonl", out / "train.jsonl.manifest.json", *out.glob("distilled-*.manifest.json")]:
        shutil.copy2(f, data / f.name)
    print(f"published: {results}, {data}")


if __name__ == "__main__":
    sys.exit(main())
