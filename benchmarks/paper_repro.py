"""The first real experiment: does a fine-tuned 4-stage stack beat its base model and a single adapter?

One command runs the whole pipeline through fslm's own commands (the same functions the CLI calls), on data
passed by flag, and writes everything under --out:

    python benchmarks/paper_repro.py --alpaca ../shared/data/alpaca/alpaca_data_1k.json \
        --data-dir ../shared/data --out runs/paper-repro

    init     a paper4 stack on --base (default: the embedded SmolLM2-135M-Instruct)
    distill  the teacher writes intent/plan/reasoning for every Alpaca record; the answer target is the reference
    train    one LoRA per stage, then the single-adapter baseline (instruction -> reference answer)
    eval     base / single / stack on ARC-Easy, ARC-Challenge and MMLU test subsets (--eval-items each, fixed seed)

Rerunning the same command continues a killed run: distill resumes from its cache, trained adapters are kept
(interrupted training resumes from its checkpoints), and eval reuses finished systems. Wall-clock seconds of every
step are summed over all invocations in OUT/paper_repro.json, with seeds, data hashes, versions and the table;
OUT/paper_repro.md is the same as a Markdown section for docs/experiments.md.

A stronger teacher served by vLLM (or any OpenAI-compatible server) is one flag away: --teacher-url
http://HOST:8000/v1 --teacher-model NAME (see docs/experiments.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from fslm.provenance import Ledger

TASKS = "arc_easy,arc_challenge,mmlu"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--alpaca", type=Path, required=True, help="Alpaca JSON, e.g. DATA/alpaca/alpaca_data_1k.json")
    p.add_argument("--data-dir", type=Path, required=True, help="benchmark data directory (docs/eval.md)")
    p.add_argument("--out", type=Path, default=Path("runs/paper-repro"))
    p.add_argument("--base", default="smollm2-135m-instruct", help="student base model (alias, HF dir or .gguf)")
    p.add_argument("--teacher-backend", default="llamacpp", help="llamacpp, torch or openai")
    p.add_argument("--teacher-model", default=None, help="teacher (default: the base; with --teacher-url: served name)")
    p.add_argument("--teacher-url", default=None, help="OpenAI-compatible server, e.g. vLLM: http://HOST:8000/v1")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight to --teacher-url (vLLM: 32)")
    p.add_argument("--teacher-tokens", type=int, default=48, help="teacher's new tokens per stage")
    p.add_argument("--filters", default="empty,overlong,repetition", help="distill's quality filters")
    p.add_argument("--limit", type=int, default=None, help="distil a seeded sample of N records (default: all)")
    p.add_argument("--train-steps", type=int, default=60, help="optimizer steps per adapter")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--seed", type=int, default=0, help="seed of distill sampling and of training")
    p.add_argument("--tasks", default=TASKS)
    p.add_argument("--eval-items", type=int, default=200, help="items per task (a seeded random subset)")
    p.add_argument("--eval-seed", type=int, default=1234)
    p.add_argument("--stage-tokens", type=int, default=48, help="new tokens of stages 1..N-1 during eval")
    return p.parse_args(argv)


def distilled_diagnostics(path: Path) -> dict[str, dict[str, float]]:
    """How much each stage's target says something of its own: a weak teacher copies the reference into every stage."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    stages = list(rows[0]["targets"]) if rows else []
    counts = {s: {"chars": 0, "equals_reference": 0, "contains_reference_start": 0, "equals_previous_stage": 0}
              for s in stages}  # fmt: skip
    for r in rows:
        ref = (r.get("reference") or "").strip()
        previous = None
        for stage in stages:
            text = r["targets"][stage].strip()
            c = counts[stage]
            c["chars"] += len(text)
            c["equals_reference"] += text == ref
            c["contains_reference_start"] += bool(ref) and ref[:40] in text
            c["equals_previous_stage"] += text == previous
            previous = text
    n = max(len(rows), 1)
    return {
        stage: {"mean_chars": round(c.pop("chars") / n, 1), **{k: round(v / n, 3) for k, v in c.items()}}
        for stage, c in counts.items()
    }


def markdown(ledger: dict[str, Any], results: dict[str, Any], tasks: list[str], command: str) -> str:
    lines = [f"Command: `{command}`", "", "| system | " + " | ".join(tasks) + " | mean | s/query |"]
    lines.append("|---" * (len(tasks) + 3) + "|")
    for name, s in results["systems"].items():
        accs = [s["tasks"][t]["accuracy"] for t in tasks]
        cells = [f"{s['tasks'][t]['accuracy']:.3f} ± {s['tasks'][t]['stderr'] or 0:.3f}" for t in tasks]
        lines.append(
            f"| {name} | " + " | ".join(cells) + f" | {sum(accs) / len(accs):.3f} | {s['seconds_per_query']:.3f} |"
        )
    lines += ["", "| step | wall-clock | invocations |", "|---|---|---|"]
    for step, e in ledger["steps"].items():
        lines.append(f"| {step} | {e['seconds'] / 60:.1f} min | {e['invocations']} |")
    lines += ["", "| distilled target | mean chars | = reference | holds reference start | = previous stage |"]
    lines.append("|---|---|---|---|---|")
    for stage, d in ledger["distilled"].items():
        lines.append(
            f"| {stage} | {d['mean_chars']:.0f} | {d['equals_reference']:.0%} | {d['contains_reference_start']:.0%} "
            f"| {d['equals_previous_stage']:.0%} |"
        )
    lines += ["", "Hashes and seeds:", ""]
    for key, value in ledger["hashes"].items():
        lines.append(f"- {key}: `{value}`")
    s = ledger["settings"]
    lines.append(f"- seeds: distill/train {s['seed']}, eval subset and lm-eval {s['eval_seed']}")
    lines.append("- versions: " + ", ".join(f"{k} {v}" for k, v in ledger["versions"].items()))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from fslm.cli import EventView, _setup_logging, err
    from fslm.config import ServerSettings
    from fslm.errors import FslmError
    from fslm.files import atomic_write_text, sha256_file
    from fslm.stackdir import StackDir
    from fslm.steps.distill import DistillOptions, distill
    from fslm.steps.evaluate import EvalOptions, evaluate
    from fslm.steps.init import InitOptions, init
    from fslm.steps.quickstart import train_all
    from fslm.steps.train import TrainOptions
    from fslm.teachers import TeacherSpec

    _setup_logging()  # fslm's info lines ("already trained ...: kept", "already evaluated") as the CLI shows them
    out = args.out.expanduser()
    out.mkdir(parents=True, exist_ok=True)
    stack_dir, data, report = out / "stack", out / "distilled.jsonl", out / "eval"
    settings = {
        k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k not in ("out", "concurrency")
    }
    settings["alpaca_sha256"] = sha256_file(args.alpaca)
    for key in ("alpaca", "data_dir"):  # paths differ between machines; the hashes identify the data
        settings.pop(key)
    try:
        ledger = Ledger(out / "paper_repro.json", settings)
    except FslmError as e:  # another experiment's --out: refuse before touching it
        err.print(f"[red]error:[/] {e}")
        return 2

    def say(text: str) -> None:
        err.print(text)

    def make_stack() -> None:
        if not (stack_dir / "stack.yaml").is_file():
            init(stack_dir, InitOptions(base=args.base))

    def distil(view: EventView) -> None:
        server = ServerSettings(url=args.teacher_url, concurrency=args.concurrency) if args.teacher_url else None
        backend = "openai" if args.teacher_url else args.teacher_backend
        options = DistillOptions(
            teacher=TeacherSpec(backend=backend, model=args.teacher_model, server=server),
            max_new_tokens=args.teacher_tokens,
            filters=args.filters,
            limit=args.limit,
            seed=args.seed,
            data_dir=args.data_dir,
        )
        distill(args.alpaca, stack_dir, data, options, on_event=view)

    def train(view: EventView) -> None:
        options = TrainOptions(max_steps=args.train_steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
        train_all(StackDir(stack_dir), data, options, on_event=view)

    def evaluate_all(view: EventView) -> None:
        options = EvalOptions(
            data_dir=args.data_dir,
            tasks=args.tasks,
            systems=["base", "single", "stack"],
            limit=args.eval_items,
            seed=args.eval_seed,
            stage_tokens=args.stage_tokens,
        )
        evaluate(stack_dir, report, options, on_event=view)

    steps = (("init", lambda _: make_stack()), ("distill", distil), ("train", train), ("eval", evaluate_all))
    try:
        for name, fn in steps:
            say(f"[bold cyan]paper_repro: {name}[/]")
            with EventView() as view:
                ledger.step(name, lambda fn=fn, view=view: fn(view))
            ledger.finish(name)
    except FslmError as e:
        say(f"[red]error:[/] {e}")
        return 2

    results = json.loads((report / "results.json").read_text())
    distilled = json.loads(Path(f"{data}.manifest.json").read_text())
    ledger.data["hashes"] = {
        "alpaca": settings["alpaca_sha256"],
        "distilled": sha256_file(data),
        "distilled records written": (distilled.get("counts") or {}).get("written"),
        **{f"benchmark {k}": v for t in results["data_hashes"].values() for k, v in t.items()},
    }
    ledger.data["distilled"] = distilled_diagnostics(data)
    ledger.data["results"] = {
        name: {t: s["tasks"][t] for t in s["tasks"]} | {"seconds_per_query": s["seconds_per_query"]}
        for name, s in results["systems"].items()
    }
    ledger.save()
    command = "python benchmarks/paper_repro.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = markdown(ledger.data, results, args.tasks.split(","), command)
    atomic_write_text(out / "paper_repro.md", text)
    print(text)
    print(f"written: {out / 'paper_repro.json'}, {out / 'paper_repro.md'}, {report}/report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
