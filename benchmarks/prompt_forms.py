"""Full vs compact stage prompts on the same distilled records: tokens per stack query, seconds per question and
accuracy on ARC-Easy *dev* (never test) for each form, against today's recipe (full prompts at 48 tokens a stage).

    python benchmarks/prompt_forms.py --data d.jsonl --data-dir DATA --out OUT [--steps 40 --dev 200 --speed 100]

For each form, a stack is made by `fslm init` (the budgets of --budgets), its four stages and the single adapter are
trained on --data with the same steps, batch and seed (`fslm train --prompt FORM`); then on ARC-Easy dev:

- tokens per stack query: prompt + new tokens of stages 1..N-1 plus the final stage's prompt, summed over the
  first --speed dev questions run through the chain (llama.cpp when the stack exports, as eval runs it);
- accuracy and seconds per question of the stack (chain), the single adapter and the stack's gate (τ tuned on dev
  items disjoint from the scored ones is not possible with one dev split here, so τ is fixed by --gate-threshold),
  from `fslm eval --split dev --limit --dev`.

The reference row "full @48" is the full-form stack evaluated with every stage capped at 48 new tokens, the setting
the 1,000-question ARC-Easy run used (docs/results/2026-11-26b). Writes OUT/prompt_forms.json and prints a table.
Resumable: trained stacks and finished eval rows are reused.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True, help="distilled JSONL (multiple choice: ARC train)")
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--base", default="smollm2-135m-instruct")
    p.add_argument("--budgets", default="intent=48,plan=64,reasoning=128,answer=48")
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per adapter")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dev", type=int, default=200, help="ARC-Easy dev items scored")
    p.add_argument("--speed", type=int, default=50, help="dev questions whose stack tokens are counted")
    p.add_argument("--gate-threshold", type=float, default=0.3)
    return p.parse_args(argv)


def make_stack(root: Path, base: str, budgets: str) -> None:
    from fslm.config import update_config
    from fslm.steps.init import InitOptions, init

    if (root / "stack.yaml").is_file():
        return
    init(root, InitOptions(base=base))
    wanted = {k: int(v) for k, v in (x.split("=") for x in budgets.split(","))}

    def edit(doc):
        for stage in doc["stages"]:
            if stage["name"] in wanted:
                stage["generation"]["max_new_tokens"] = wanted[stage["name"]]

    update_config(root, edit)


def train_form(root: Path, data: Path, form: str, args: argparse.Namespace) -> None:
    from fslm.files import sha256_file
    from fslm.stackdir import SINGLE, StackDir
    from fslm.steps.train import TrainOptions, train

    stack = StackDir(root)
    common = {"max_steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed, "prompt": form}
    for label, extra in (("stages", {}), (SINGLE, {"single": True})):
        names = stack.load().stage_names if label == "stages" else [label]
        done = all(
            stack.is_trained(n) and (t := stack.training(stack.load(), n)) and t.data_sha256 == sha256_file(data)
            for n in names
        )
        if not done:
            train(root, data, TrainOptions(**common, **extra, fresh=True))


def stack_tokens(root: Path, data_dir: Path, n: int, stage_tokens: int | None) -> dict:
    """Prompt and new tokens of a stack query on the first `n` ARC-Easy dev questions (the eval's prompt form)."""
    from fslm.benchmark_files import arc_rows, arc_text
    from fslm.stack import Stack

    rows = arc_rows(data_dir / "arc" / "ARC-Easy-Dev.jsonl")[:n]
    questions = [arc_text(r) for r in rows]
    stack = Stack.load(root, backend="auto")
    try:
        overrides = {"max_new_tokens": stage_tokens} if stage_tokens else None
        traces = stack.run_batch(questions, stages=len(stack.config.stages) - 1, overrides=overrides)
        final = stack.config.final_stage
        form = stack.prompt_form(stack.stage_adapter(final.name))
        answer_prompts = [
            stack.backend.count_tokens(stack.render_prompt(final, t.instruction, None, t.outputs, form=form))
            for t in traces
        ]
    finally:
        stack.backend.close()
    prompt = sum(s.prompt_tokens for t in traces for s in t.stages) + sum(answer_prompts)
    new = sum(s.output_tokens for t in traces for s in t.stages)
    per_stage = {
        s.name: round(sum(t.stages[i].prompt_tokens for t in traces) / len(traces), 1)
        for i, s in enumerate(traces[0].stages)
    }
    return {
        "questions": len(traces),
        "tokens_per_query": round((prompt + new) / len(traces), 1),
        "prompt_tokens_per_query": round(prompt / len(traces), 1),
        "new_tokens_per_query": round(new / len(traces), 1),
        "prompt_tokens_per_stage": {**per_stage, final.name: round(sum(answer_prompts) / len(traces), 1)},
    }


def evaluate_form(root: Path, out: Path, args: argparse.Namespace, stage_tokens: int | None, systems: list[str]):
    from fslm.steps.evaluate import EvalOptions, evaluate

    rows = {}
    for scoring in ("chain", "gate"):
        wanted = systems if scoring == "chain" else ["stack"]
        # the gate row takes the chain row's stage texts (--chains-from; their seconds count in its own)
        extra = {"gate_threshold": args.gate_threshold, "chains_from": out / "eval-chain"} if scoring == "gate" else {}
        options = EvalOptions(
            data_dir=args.data_dir, tasks=["arc_easy"], systems=wanted, limit=args.dev, seed=args.seed + 1234,
            split="dev", stage_tokens=stage_tokens, stack_scoring=scoring, stage_check=0, **extra,
        )  # fmt: skip
        result = evaluate(root, out / f"eval-{scoring}", options).results
        for name, row in result["systems"].items():
            task = row["tasks"]["arc_easy"]
            label = name if scoring == "chain" else "stack (gate)"
            rows[label] = {
                "accuracy": task["accuracy"],
                "stderr": task["stderr"],
                "seconds_per_question": row["seconds_per_query"],
                "items": row["items"]["arc_easy"],
            }
            if scoring == "gate":
                rows[label]["questions_with_chain"] = row.get("stack_scoring", {}).get("questions_with_chain")
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from fslm.files import sha256_file
    from fslm.provenance import versions

    out = args.out.expanduser()
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for form in ("full", "compact"):
        root = out / form
        make_stack(root, args.base, args.budgets)
        train_form(root, args.data, form, args)
        results[form] = {
            "tokens": stack_tokens(root, args.data_dir, args.speed, None),
            "eval": evaluate_form(root, out / f"eval-{form}", args, None, ["single", "stack"]),
        }
    results["full @48"] = {
        "tokens": stack_tokens(out / "full", args.data_dir, args.speed, 48),
        "eval": evaluate_form(out / "full", out / "eval-full-48", args, 48, ["stack"]),
    }
    print("| prompts | tokens/query (prompt + new) | stack acc (dev) | stack s/q | gate acc | gate s/q | single s/q |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        t, e = r["tokens"], r["eval"]
        single = e.get("single", {}).get("seconds_per_question")
        print(
            f"| {name} | {t['tokens_per_query']} ({t['prompt_tokens_per_query']} + {t['new_tokens_per_query']}) | "
            f"{e['stack']['accuracy']:.3f} ± {e['stack']['stderr']:.3f} | {e['stack']['seconds_per_question']:.2f} | "
            f"{e['stack (gate)']['accuracy']:.3f} | {e['stack (gate)']['seconds_per_question']:.2f} | "
            f"{'-' if single is None else f'{single:.2f}'} |"
        )
    report = {
        "command": "python benchmarks/prompt_forms.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "data_sha256": sha256_file(args.data),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k not in ("out",)},
        "results": results,
        "versions": versions(),
    }
    (out / "prompt_forms.json").write_text(without_machine_paths(json.dumps(report, indent=2), args) + "\n")
    return 0


def without_machine_paths(text: str, args: argparse.Namespace) -> str:
    """A report as it is committed: the data file by its name (its sha256 is beside it), the data dir and the output
    folder by what they are, never this machine's absolute paths."""
    places = {str(args.data): args.data.name, str(args.data_dir): "DATA_DIR", str(args.out): "OUT"}
    for path in sorted(places, key=len, reverse=True):
        text = text.replace(path, places[path])
    return text


if __name__ == "__main__":
    from fslm import heap

    heap.restart_under_allocator()  # it trains in-process: under tcmalloc as `fslm train` is (docs/train.md)
    sys.exit(main())
