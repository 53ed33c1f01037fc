"""Experiment 2's diagnosis: why the stack scores what it scores, read off its own chains and a teacher's.

    python benchmarks/exp2_diagnosis.py --stack runs/exp2-mc/stack --eval runs/exp2-mc/eval --data-dir DATA \\
        --out OUT [--teacher TEACHER.gguf --ceiling 200] [--traces 3]

From the eval's stage log (`EVAL/systems/stack.stages.jsonl`: every chain the stack wrote for a test question) and
its per-item correctness (`EVAL/results.json`), for each multiple-choice task evaluated:

- **names gold**: how often the student's earlier stages name the gold option's text (and how often a wrong
  option's), and the stack's accuracy on each side: does the answer stage follow its own reasoning?
- **ceiling** (with --teacher): on a seeded sample of --ceiling items, the teacher writes the earlier stages blind (joint
  mode, options hidden: what the student would have to write) and the student's answer stage scores the options
  after *those* notes, beside its score after its own chain on the same items (paired difference, bootstrap
  interval, McNemar), and how often each set of notes names the gold: how much a better chain would be worth to
  this answer stage;
- **traces**: a few chains the stack got right and wrong, as text;
- **taught** (with --train, the distilled files): how often the teacher's kept notes name the gold option's text or
  a wrong option's, per file: what the student was shown, beside what its own chains name;
- **gate under a cost cap** (with --gate, the gate row's eval folder): for each cap R on the chain rate (--caps), the
  τ the dev tuning would have picked under that cap (`fslm eval --gate-max-chain-rate`, from the tuning's per-τ dev
  accuracy and chain rate), and the test accuracy it gives, derived per item from the gate row (direct margin,
  direct-path correctness) and the chain row (the same greedy chains): a derived row, not a timed run; its seconds
  are an estimate, the single adapter's plus the test chain rate times the chain row's. At the tuned τ the
  derivation must reproduce the gate row's measured accuracy (`reproduces_gate_row`).

Writes OUT/diagnosis.json and OUT/diagnosis.md; the teacher's notes are cached in OUT/teacher-notes.jsonl (resumable).
Test items are only read here, never trained or tuned on.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

TASK_ROWS = {  # task -> (test file under the data dir, reader, question text as the eval poses it)
    "arc_easy": ("arc/ARC-Easy-Test.jsonl", "arc_rows", "arc_text"),
    "arc_challenge": ("arc/ARC-Challenge-Test.jsonl", "arc_rows", "arc_text"),
    "openbookqa": ("openbookqa/test.tsv", "openbookqa_rows", None),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stack", type=Path, required=True)
    p.add_argument("--eval", type=Path, required=True, help="the fslm eval report folder of the stack's row")
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--teacher", default=None, help="teacher GGUF for the ceiling (omit to skip it)")
    p.add_argument("--teacher-batch", type=int, default=16)
    p.add_argument("--ceiling", type=int, default=200, help="items per task for the ceiling (a seeded sample)")
    p.add_argument("--seed", type=int, default=0, help="the ceiling's sample and its bootstrap")
    p.add_argument("--traces", type=int, default=3, help="right and wrong chains shown per task")
    p.add_argument("--gate", type=Path, default=None, help="the fslm eval report folder of the stack's gate row")
    p.add_argument("--train", nargs="*", default=[], help="distilled files the stack trained on (for `taught`)")
    p.add_argument("--caps", default="0.05,0.1,0.2", help="chain-rate caps of the derived gate rows (with --gate)")
    return p.parse_args(argv)


def task_items(data_dir: Path, task: str) -> dict[str, dict[str, Any]]:
    """Question text (as the eval poses it) -> {id, choices, gold} for one multiple-choice test set."""
    from fslm import benchmark_files

    rel, reader, text = TASK_ROWS[task]
    rows = getattr(benchmark_files, reader)(data_dir / rel)
    pose = getattr(benchmark_files, text) if text else (lambda r: r["question_stem"])
    return {pose(r).strip(): {"id": r["id"], "choices": r["choices"], "gold": r["gold"]} for r in rows}


def names(text: str, option: str) -> bool:
    from fslm.data import normalise

    option = normalise(option)
    return bool(option) and f" {option} " in f" {normalise(text)} "


def chain_stats(
    chains: dict[str, dict[str, str]],
    items: dict[str, dict],
    correct: dict[str, float],
    others: dict[str, dict[str, float]] | None = None,
) -> dict:
    """Shares of chains that name the gold / a wrong option, and the stack's accuracy on each side. `others` (system
    -> item id -> correct) gives the other systems' accuracy on the same two sides: a control, since the chain may
    name the gold of items that are easy anyway."""
    rows = []
    for context, outputs in chains.items():
        item = items.get(context)
        if item is None or item["id"] not in correct:
            continue
        notes = " ".join(outputs.values())
        gold = item["choices"][item["gold"]]
        wrong = [c for i, c in enumerate(item["choices"]) if i != item["gold"]]
        rows.append((names(notes, gold), any(names(notes, w) for w in wrong), correct[item["id"]], item["id"]))

    def acc(selected: list[tuple], of: dict[str, float] | None = None) -> float | None:
        values = [r[2] if of is None else of[r[3]] for r in selected if of is None or r[3] in of]
        return round(sum(values) / len(values), 4) if values else None

    gold_named = [r for r in rows if r[0]]
    rest = [r for r in rows if not r[0]]
    return {
        "chains": len(rows),
        "name_gold": round(len(gold_named) / len(rows), 4) if rows else None,
        "name_a_wrong_option": round(sum(r[1] for r in rows) / len(rows), 4) if rows else None,
        "accuracy_when_gold_named": acc(gold_named),
        "accuracy_when_not": acc(rest),
        "others": {
            name: {"when_gold_named": acc(gold_named, of), "when_not": acc(rest, of)}
            for name, of in (others or {}).items()
        },
    }


def taught_stats(files: list[Path], stages: list[str]) -> dict[str, dict[str, Any]]:
    """What the student was taught: per distilled file, the share of kept records whose intermediate targets (every
    stage but the last) name the gold option's text, or a wrong option's: the teacher's notes, to set beside what the
    student's own chains name on test items."""
    from fslm.distilled import read_distilled

    out = {}
    for path in files:
        records = [r for r in read_distilled(path)[0] if r.extra.get("choices") and r.reference]
        if not records:
            continue
        gold = wrong = 0
        for r in records:
            notes = " ".join(r.targets.get(s) or "" for s in stages[:-1])
            gold += names(notes, r.reference)
            wrong += any(names(notes, c) for c in r.extra["choices"] if c != r.reference)
        out[path.name] = {"records": len(records), "name_gold": round(gold / len(records), 4),
                          "name_a_wrong_option": round(wrong / len(records), 4)}  # fmt: skip
    return out


def read_eval(eval_dir: Path) -> tuple[dict, dict[str, dict[str, str]]]:
    results = json.loads((eval_dir / "results.json").read_text())
    log = eval_dir / "systems" / "stack.stages.jsonl"
    chains = {}
    for line in log.read_text(encoding="utf-8").splitlines() if log.is_file() else []:
        row = json.loads(line)
        if row.get("chain") in (None, 0):  # the greedy chain (sampled ones are numbered)
            chains[row["context"].strip()] = row["outputs"]
    return results, chains


def capped_tau(tuning: dict[str, Any], cap: float | None) -> float:
    """The τ `fslm eval --gate-max-chain-rate cap` picks from a tuning record (its per-τ dev accuracy and chain rate)."""
    from fslm.steps.evaluate.scoring import pick_threshold

    grid = {float(k): v for k, v in tuning["grid"].items()}
    return pick_threshold(grid, {float(k): v for k, v in tuning["chain_rates"].items()}, cap)


def gate_at_caps(gate: dict, chain: dict, caps: list[float]) -> dict[str, Any]:
    """Per task: the gate's test accuracy and chain rate at the tuned τ and at each cap's τ, derived per item (module
    docstring). A task whose gate row lacks the per-item paths or whose tuning lacks chain rates is skipped."""
    from fslm.steps.evaluate.stats import paired

    g_row, c_row = gate["systems"]["stack"], chain["systems"]["stack"]
    single = chain["systems"].get("single")
    out: dict[str, Any] = {}
    for task, tuning in gate.get("tuning", {}).items():
        items = g_row["items"].get(task, {})
        if "direct_margin" not in items or "chain_rates" not in tuning:
            continue
        chain_acc = dict(zip(c_row["items"][task]["ids"], c_row["items"][task]["acc"], strict=True))
        ids = items["ids"]

        def at(tau: float, ids: list[str] = ids, items: dict = items, chain_acc: dict = chain_acc) -> tuple:
            picks = [m < tau for m in items["direct_margin"]]
            acc = [chain_acc[i] if c else d for i, c, d in zip(ids, picks, items["direct_acc"], strict=True)]
            return acc, sum(picks) / len(ids)

        tuned_acc, tuned_rate = at(float(tuning["value"]))
        entry: dict[str, Any] = {
            "items": len(ids),
            "tuned": {
                "tau": tuning["value"],
                "accuracy": round(sum(tuned_acc) / len(ids), 4),
                "chain_rate": round(tuned_rate, 4),
            },
            "reproduces_gate_row": [int(a) for a in tuned_acc] == [int(a) for a in items["acc"]],
            "caps": {},
        }
        for cap in caps:
            tau = capped_tau(tuning, cap)
            acc, rate = at(tau)
            row: dict[str, Any] = {"tau": tau, "dev_accuracy": tuning["grid"][str(tau)],
                                   "dev_chain_rate": tuning["chain_rates"][str(tau)],
                                   "accuracy": round(sum(acc) / len(ids), 4), "chain_rate": round(rate, 4)}  # fmt: skip
            if single is not None:
                s_acc = dict(zip(single["items"][task]["ids"], single["items"][task]["acc"], strict=True))
                diff = paired(task, "acc", "gate", [int(a) for a in acc], "single", [int(s_acc[i]) for i in ids])
                row["minus_single"] = {"difference": round(diff.diff, 4), "ci95": [round(diff.ci_low, 4),
                                       round(diff.ci_high, 4)], "mcnemar_p": diff.p_value}  # fmt: skip
                row["est_seconds_per_question"] = round(
                    single["seconds_per_query"] + rate * c_row["seconds_per_query"], 3
                )
                row["est_times_single"] = round(row["est_seconds_per_question"] / single["seconds_per_query"], 2)
            entry["caps"][str(cap)] = row
        out[task] = entry
    return out


def teacher_notes(args: argparse.Namespace, config: Any, task: str, items: list[tuple[str, dict]]) -> dict:
    """The teacher's blind earlier stages for these questions (cached by question in OUT/teacher-notes.jsonl)."""
    from fslm.data import DatasetRecord
    from fslm.files import JsonlLog
    from fslm.steps.distill.prompts import joint_messages, split_sections
    from fslm.teachers import TeacherSpec, make_teacher

    log = JsonlLog(args.out / "teacher-notes.jsonl").open()
    known = {r["context"]: r["outputs"] for r in log.rows}
    todo = [(c, item) for c, item in items if c not in known]
    if todo:
        spec = TeacherSpec(backend="llamacpp", model=args.teacher, batch_size=args.teacher_batch)
        teacher = make_teacher(spec, config.base, args.stack)
        settings = config.final_stage.generation.model_copy(update={"max_new_tokens": 320, "repetition_penalty": 1.0})
        for i in range(0, len(todo), args.teacher_batch):
            chunk = todo[i : i + args.teacher_batch]
            records = [DatasetRecord(c, None, None, task, 0, 0) for c, _ in chunk]
            outs = teacher.generate([joint_messages(config, r) for r in records], settings, label="joint")
            rows = []
            for (context, _), out in zip(chunk, outs, strict=True):
                sections = split_sections(out.text, config)
                earlier = {s.name: sections.targets.get(s.name, "") for s in config.stages[:-1]}
                rows.append({"task": task, "context": context, "outputs": earlier, "ok": sections.problem is None})
            log.append(rows)
            known.update((r["context"], r["outputs"]) for r in rows)
        teacher.backend.close()
    log.close()
    return known


def answer_correct(lm: Any, items: list[tuple[str, dict]], outputs: dict[str, dict[str, str]]) -> list[int]:
    """Per item, whether the answer stage's most likely option (acc) after the given earlier-stage texts is gold."""
    pairs = [(context, " " + choice) for context, item in items for choice in item["choices"]]
    scores = lm._score(pairs, {c: outputs[c] for c, _ in items})
    right, k = [], 0
    for _, item in items:
        n = len(item["choices"])
        mine = [s for s, _ in scores[k : k + n]]
        right.append(int(max(range(n), key=mine.__getitem__) == item["gold"]))
        k += n
    return right


def answer_accuracy(lm: Any, items: list[tuple[str, dict]], outputs: dict[str, dict[str, str]]) -> float:
    right = answer_correct(lm, items, outputs)
    return round(sum(right) / len(right), 4)


def ceiling(args: argparse.Namespace, config: Any, lm: Any, task: str, mine: dict, items: dict) -> dict[str, Any]:
    """The answer stage after the teacher's blind notes against after its own chain, on the same seeded sample of
    the task's evaluated items (paired: difference, 95 % bootstrap interval, McNemar), and what each set of notes
    names: how much better notes would be worth to this answer stage."""
    import random

    from fslm.steps.evaluate.stats import paired

    contexts = sorted(c for c in mine if c in items)
    contexts = sorted(random.Random(args.seed).sample(contexts, min(args.ceiling, len(contexts))))
    chosen = [(c, items[c]) for c in contexts]
    notes = teacher_notes(args, config, task, chosen)
    own, taught = answer_correct(lm, chosen, mine), answer_correct(lm, chosen, notes)
    test = paired(task, "acc", "teacher_notes", taught, "own_chain", own, seed=args.seed)

    def naming(chains: dict[str, dict[str, str]]) -> float:
        stats = chain_stats({c: chains[c] for c in contexts}, items, {items[c]["id"]: 0 for c in contexts})
        return stats["name_gold"]

    return {
        "items": len(chosen),
        "sample": f"seeded (seed {args.seed}) from the task's {len(mine)} evaluated chains",
        "answer_after_student_chain": round(sum(own) / len(own), 4) if own else None,
        "answer_after_teacher_chain": round(sum(taught) / len(taught), 4) if taught else None,
        "paired_teacher_minus_own": test.to_dict(),
        "ids": [items[c]["id"] for c in contexts],
        "name_gold": {"own_chain": naming(mine), "teacher_notes": naming(notes)},
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from fslm.config import load_config

    args.out.mkdir(parents=True, exist_ok=True)
    results, chains = read_eval(args.eval)
    stack_row = results["systems"]["stack"]
    config = load_config(args.stack)
    report: dict[str, Any] = {"eval": str(args.eval.name), "tasks": {}}
    lines = ["# Experiment 2: diagnosis", ""]
    lm = None
    for task in [t for t in results["tasks"] if t in TASK_ROWS]:
        items = task_items(args.data_dir, task)
        per_item = stack_row["items"][task]
        correct = dict(zip(per_item["ids"], per_item["acc"], strict=True))
        mine = {c: o for c, o in chains.items() if c in items}
        others = {
            name: dict(zip(row["items"][task]["ids"], row["items"][task]["acc"], strict=True))
            for name, row in results["systems"].items()
            if name != "stack" and task in row.get("items", {})
        }
        entry: dict[str, Any] = {"names": chain_stats(mine, items, correct, others)}
        if args.teacher:
            from fslm.steps.evaluate.lm_eval_model import FslmLM

            lm = lm or FslmLM(stack=str(args.stack), system="stack")
            entry["ceiling"] = ceiling(args, config, lm, task, mine, items)
        entry["traces"] = traces(mine, items, correct, args.traces)
        report["tasks"][task] = entry
        lines += task_lines(task, entry)
    if args.train:
        report["taught"] = taught_stats([Path(f) for f in args.train], config.stage_names)
        lines += taught_lines(report["taught"])
    if args.gate is not None:
        gate = json.loads((args.gate / "results.json").read_text())
        report["gate_caps"] = gate_at_caps(gate, results, [float(c) for c in args.caps.split(",")])
        lines += gate_lines(report["gate_caps"])
    (args.out / "diagnosis.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "diagnosis.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def traces(chains: dict, items: dict, correct: dict, n: int) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {"right": [], "wrong": []}
    for context, outputs in chains.items():
        item = items[context]
        side = "right" if correct.get(item["id"]) else "wrong"
        if item["id"] in correct and len(out[side]) < n:
            out[side].append({"id": item["id"], "question": context, "gold": item["choices"][item["gold"]], **outputs})
    return out


def task_lines(task: str, entry: dict) -> list[str]:
    s = entry["names"]
    lines = [f"## {task}", "", f"{s['chains']} chains: the earlier stages name the gold option in {s['name_gold']}, a "
             f"wrong option in {s['name_a_wrong_option']}; stack accuracy {s['accuracy_when_gold_named']} when the "
             f"gold is named, {s['accuracy_when_not']} when not.", ""]  # fmt: skip
    if s.get("others"):
        lines += ["| system | acc where the chain names the gold | acc where it does not |", "|---|---:|---:|",
                  f"| stack | {s['accuracy_when_gold_named']} | {s['accuracy_when_not']} |"]  # fmt: skip
        lines += [f"| {name} | {o['when_gold_named']} | {o['when_not']} |" for name, o in s["others"].items()] + [""]
    if "ceiling" in entry:
        c = entry["ceiling"]
        d, names_gold = c["paired_teacher_minus_own"], c["name_gold"]
        lines += [f"Ceiling on {c['items']} items ({c['sample']}): the answer stage scores "
                  f"{c['answer_after_student_chain']} after its own chain, {c['answer_after_teacher_chain']} after the "
                  f"teacher's blind notes: {100 * d['diff']:+.1f} points (95 % CI {100 * d['ci_low']:+.1f} to "
                  f"{100 * d['ci_high']:+.1f}, McNemar p {d['p_value']:.3g}). The notes name the gold in "
                  f"{names_gold['own_chain']} (its own) and {names_gold['teacher_notes']} "
                  "(the teacher's).", ""]  # fmt: skip
    for side in ("right", "wrong"):
        for t in entry["traces"][side]:
            lines += [f"**{side}** `{t['id']}`: {t['question']!r} (gold: {t['gold']})", ""]
            lines += [f"- {k}: {v!r}" for k, v in t.items() if k not in ("id", "question", "gold")] + [""]
    return lines


def taught_lines(taught: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["## What the student was taught (the teacher's kept notes, training records)", "",
             "| file | records | notes name the gold | notes name a wrong option |", "|---|---:|---:|---:|"]  # fmt: skip
    lines += [f"| {f} | {t['records']} | {t['name_gold']} | {t['name_a_wrong_option']} |" for f, t in taught.items()]
    return [*lines, ""]


def gate_lines(caps: dict[str, Any]) -> list[str]:
    lines = ["## The gate under a cost cap (derived per item, τ picked on dev; seconds estimated)", ""]
    lines += ["| task | cap R | τ | dev acc | dev chain rate | test acc | test chain rate | − single [95 % CI] | ≈ × single |",
              "|---|---:|---:|---:|---:|---:|---:|---|---:|"]  # fmt: skip
    for task, entry in caps.items():
        tuned = entry["tuned"]
        lines.append(
            f"| {task} | none (tuned) | {tuned['tau']} | | | {tuned['accuracy']} | {tuned['chain_rate']} | | |"
        )
        for cap, r in entry["caps"].items():
            d = r.get("minus_single")
            diff = f"{d['difference']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]" if d else "-"
            lines.append(f"| {task} | {cap} | {r['tau']} | {r['dev_accuracy']} | {r['dev_chain_rate']} | "
                         f"{r['accuracy']} | {r['chain_rate']} | {diff} | {r.get('est_times_single', '-')} |")  # fmt: skip
        if not entry["reproduces_gate_row"]:
            lines.append(
                f"| {task} | **the derivation does not reproduce the gate row at the tuned τ** | | | | | | | |"
            )
    return [*lines, ""]


if __name__ == "__main__":
    sys.exit(main())
