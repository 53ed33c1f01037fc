"""How much of the reference leaks into the earlier stages' targets, per reference policy, on the same questions.

    python benchmarks/recipe_leak.py --data-dir ../shared/data --out runs/recipe-leak

Distils the same seeded sample of ARC-Easy *train* questions (default 100) three times with the embedded teacher,
once per reference policy (shown, hidden, hint-on-retry), into one stack and one shared teacher cache (so the blind
chains of `hidden` and `hint-on-retry` are paid once), then prints and writes (OUT/recipe_leak.json) per policy:
the share of intermediate targets that contain the reference (per stage and overall), the teacher's blind accuracy,
hinted retries and rescues, and kept/dropped counts. Resumable: rerun the same command.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from fslm.provenance import now, versions

POLICIES = ("shown", "hidden", "hint-on-retry")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", type=Path, required=True, help="benchmark data directory (holds arc/)")
    p.add_argument("--out", type=Path, default=Path("runs/recipe-leak"))
    p.add_argument("--questions", type=int, default=100, help="seeded sample of ARC-Easy train questions")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--base", default="smollm2-135m-instruct", help="the stack's base and the teacher")
    p.add_argument("--teacher-backend", default="llamacpp")
    p.add_argument("--batch-size", type=int, default=8, help="records per teacher call")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from rich.console import Console
    from rich.table import Table

    from fslm.cli import EventView
    from fslm.errors import FslmError
    from fslm.files import atomic_write_text
    from fslm.steps.distill import DistillOptions, distill
    from fslm.steps.init import InitOptions, init
    from fslm.teachers import TeacherSpec

    console = Console()
    out = args.out.expanduser()
    stack = out / "stack"
    data = args.data_dir / "arc" / "ARC-Easy-Train.jsonl"
    if not (stack / "stack.yaml").is_file():
        init(stack, InitOptions(base=args.base))
    rows = {}
    try:
        for policy in POLICIES:
            options = DistillOptions(
                teacher=TeacherSpec(backend=args.teacher_backend, batch_size=args.batch_size),
                reference=policy,
                limit=args.questions,
                seed=args.seed,
                cache=out / "teacher-cache.jsonl",
            )
            start = time.perf_counter()
            with EventView() as view:
                r = distill(data, stack, out / f"{policy}.jsonl", options, on_event=view)
            rows[policy] = {
                "seconds_this_run": round(time.perf_counter() - start, 1),
                "selected": r.selected,
                "kept_records": r.written_records,
                "rejected": {k: v for k, v in r.filtered.items() if v},
                "lost": r.lost,
                **r.checks,
            }
    except FslmError as e:
        console.print(f"[red]error:[/] {e}")
        return 2

    table = Table("policy", "leak: intent", "plan", "reasoning", "all", "blind acc", "hint rescues", "kept", "dropped")
    for policy, row in rows.items():
        table.add_row(*table_row(policy, row))
    console.print(table)
    report = {
        "command": "python benchmarks/recipe_leak.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "data": str(data.name),
        "questions": args.questions,
        "seed": args.seed,
        "teacher": {"model": args.base, "backend": args.teacher_backend},
        "policies": rows,
        "versions": versions(),
        "finished": now(),
    }
    atomic_write_text(out / "recipe_leak.json", json.dumps(report, indent=2) + "\n")
    console.print(f"written: {out / 'recipe_leak.json'}")
    return 0


def percent(rate: float | None) -> str:
    """A rate as a percentage; "-" where there was nothing to count (e.g. no record reached the leak check)."""
    return "-" if rate is None else f"{rate:.1%}"


def table_row(policy: str, row: dict) -> list[str]:
    """One policy's cells of the printed table (a stage missing from the checks counts as nothing to count)."""
    leaks = row.get("leaks") or {}
    return [
        policy,
        *(percent((leaks.get(s) or {}).get("rate")) for s in ("intent", "plan", "reasoning")),
        percent(row.get("leak_rate_all_intermediate")),
        percent(row.get("teacher_blind_accuracy")),
        f"{row.get('correct_after_hint', 0)}/{row.get('retried_with_hint', 0)}",
        str(row.get("kept_records", 0)),
        ", ".join(f"{v} {k}" for k, v in (row.get("rejected") or {}).items()) or "0",
    ]


if __name__ == "__main__":
    sys.exit(main())
