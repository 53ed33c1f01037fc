"""Teacher modes and recipes side by side: cost and kept rate of `fslm distill` on the same seeded questions.

    python benchmarks/distill_modes.py --data DATA/arc/ARC-Easy-Train.jsonl --limit 100 \\
        --teacher-model "$(python benchmarks/get_teacher.py)" --out OUT \\
        --runs "joint/shown/hidden,stages/shown/hidden,joint/shown/hint-on-retry"

Each run is `teacher_mode/options/reference` (trailing `/words` adds `--word-limits`, `/fit` `--fit-overlong`), into
OUT/<run>.jsonl on a stack made by `fslm init` (the default recipe, stage budgets from --budgets) with its own teacher
cache, so no run profits from another's answers. Prints one table (questions/h, kept/h, kept share, teacher calls and
tokens per question, why records were dropped) and writes OUT/distill_modes.json. Resumable: a finished run is read
back from its manifest, not redone. `--against OUT.jsonl` pairs each run with an earlier distill output over the same
questions (kept in both, only here, only there, and why).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True, help="a multiple-choice train file (ARC JSONL, OpenBookQA TSV)")
    p.add_argument("--teacher-model", required=True, help="teacher GGUF (benchmarks/get_teacher.py)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--budgets", default="intent=48,plan=64,reasoning=96,answer=48", help="stage max_new_tokens")
    p.add_argument("--runs", default="joint/shown/hidden,stages/shown/hidden")
    p.add_argument("--base", default="smollm2-135m-instruct", help="the student (its tokenizer counts targets)")
    p.add_argument("--filters", default=None, help="fslm distill --filters (default: distill's own)")
    p.add_argument(
        "--against",
        type=Path,
        default=None,
        help="an earlier distill output (OUT.jsonl, its .rejected.jsonl beside it) over these questions: each run is "
        "paired with it question by question (kept in both, only here, only there; why there)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from fslm.config import update_config
    from fslm.steps.distill import DistillOptions, distill
    from fslm.steps.init import InitOptions, init
    from fslm.teachers import TeacherSpec

    out = args.out.expanduser()
    out.mkdir(parents=True, exist_ok=True)
    stack = out / "stack"
    if not (stack / "stack.yaml").is_file():
        init(stack, InitOptions(base=args.base))
        wanted = dict((k, int(v)) for k, v in (x.split("=") for x in args.budgets.split(",")))

        def edit(doc):
            for stage in doc["stages"]:
                if stage["name"] in wanted:
                    stage["generation"]["max_new_tokens"] = wanted[stage["name"]]

        update_config(stack, edit)
    rows = []
    for run in args.runs.split(","):
        mode, shown, reference, *extra = run.split("/")
        if set(extra) - {"words", "fit"}:
            print(
                f"distill_modes: unknown run part {'/'.join(extra)!r} in {run!r} (known: words, fit)", file=sys.stderr
            )
            return 2
        name = run.replace("/", "-")
        target = out / f"{name}.jsonl"
        manifest_path = target.with_name(target.name + ".manifest.json")
        manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
        if manifest.get("status") != "complete":
            options = DistillOptions(
                teacher=TeacherSpec(backend="llamacpp", model=args.teacher_model, batch_size=args.batch_size),
                teacher_mode=mode,
                options=shown,
                reference=reference,
                word_limits="words" in extra,
                fit_overlong="fit" in extra,
                **({"filters": args.filters} if args.filters is not None else {}),
                limit=args.limit,
                seed=args.seed,
            )
            start = time.perf_counter()
            distill(args.data, stack, target, options)
            print(f"{run}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
            manifest = json.loads(manifest_path.read_text())
        last, counts, checks = manifest["last_run"], manifest["counts"], manifest["checks"]
        hours = last["seconds"] / 3600
        selected = counts["selected"]
        rows.append(
            {
                "run": run,
                "questions": selected,
                "seconds": last["seconds"],
                "questions_per_hour": round(last["records"] / hours, 1) if hours else None,
                "kept": counts["written_records"],
                "kept_share": round(counts["written_records"] / selected, 3),
                "kept_per_hour": round(counts["written_records"] / hours, 1) if hours else None,
                "teacher_calls_per_question": round(last["teacher_calls"] / max(last["records"], 1), 2),
                "output_tokens_per_question": round(last["output_tokens"] / max(last["records"], 1), 1),
                "prompt_tokens_per_question": round(last.get("prompt_tokens", 0) / max(last["records"], 1), 1),
                "teacher_blind_accuracy": checks.get("teacher_blind_accuracy"),
                "rejected": {k: v for k, v in counts["filtered"].items() if v},
                "option_references": checks.get("option_references"),
                "target_tokens": manifest.get("target_tokens"),
                "resumed": last["resumed_records"],
            }
        )
        if args.against is not None:
            rows[-1]["against"] = against(target, args.against)
    print("| run | q/h | kept | kept/h | calls/q | new tok/q | prompt tok/q | blind acc | rejected |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        rejected = ", ".join(f"{k} {v}" for k, v in r["rejected"].items()) or "-"
        print(
            f"| {r['run']} | {r['questions_per_hour']} | {r['kept']}/{r['questions']} ({r['kept_share']:.0%}) | "
            f"{r['kept_per_hour']} | {r['teacher_calls_per_question']} | {r['output_tokens_per_question']} | "
            f"{r['prompt_tokens_per_question']} | {r['teacher_blind_accuracy']} | {rejected} |"
        )
    for r in rows:
        if "against" in r:
            a = r["against"]
            print(
                f"{r['run']} vs {args.against.name}, {a['questions']} shared questions: kept in both {a['both']}, "
                f"only here {a['only_here']}, only there {a['only_there']}, in neither {a['neither']}; "
                f"why the ones kept only here were dropped there: {a['only_here_dropped_there_as'] or '-'}"
            )
    from fslm.files import sha256_file
    from fslm.provenance import versions

    report = {
        "command": " ".join(["python", "benchmarks/distill_modes.py", *(argv or sys.argv[1:])]),
        "data_sha256": sha256_file(args.data),
        "seed": args.seed,
        "budgets": args.budgets,
        "versions": versions(),
        "against": str(args.against) if args.against else None,
        "runs": rows,
    }
    (out / "distill_modes.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


def against(here: Path, there: Path) -> dict:
    """Question-by-question pairing of two distill outputs over the same questions (matched by instruction text):
    which were kept by each, and the reasons the other run dropped the ones only this run kept."""
    from collections import Counter

    def fate(out: Path) -> dict[str, str | None]:
        """instruction -> None (kept) or the filter that rejected it (first row per question decides kept)."""
        seen: dict[str, str | None] = {}
        for path, kept in ((out, True), (out.with_name(out.name + ".rejected.jsonl"), False)):
            for line in path.read_text().splitlines() if path.is_file() else []:
                row = json.loads(line)
                q = row["instruction"]
                if kept:
                    seen[q] = None
                elif q not in seen:
                    seen[q] = row["rejected"]["filter"]
        return seen

    a, b = fate(here), fate(there)
    shared = sorted(set(a) & set(b))
    dropped_there = Counter(b[q] for q in shared if a[q] is None and b[q] is not None)
    return {
        "questions": len(shared),
        "both": sum(a[q] is None and b[q] is None for q in shared),
        "only_here": sum(a[q] is None and b[q] is not None for q in shared),
        "only_there": sum(a[q] is not None and b[q] is None for q in shared),
        "neither": sum(a[q] is not None and b[q] is not None for q in shared),
        "only_here_dropped_there_as": dict(dropped_there),
        "only_there_dropped_here_as": dict(Counter(a[q] for q in shared if b[q] is None and a[q] is not None)),
        "rejected_here": dict(Counter(a[q] for q in shared if a[q] is not None)),
        "rejected_there": dict(Counter(b[q] for q in shared if b[q] is not None)),
    }


if __name__ == "__main__":
    sys.exit(main())
