"""Seconds per question of `fslm eval` per system and stack-scoring mode, and how often the fast path's greedy stage
text equals PyTorch's.

Runs, in one process (the model loads once per run): base + single + stack (chain) with the agreement check, then
the stack alone with `ensemble` (K chains) and with `gate`, all on the same seeded questions and the same stage
backend. λ and τ are fixed here (`--ensemble-weight`, `--gate-threshold`) so the figure is the cost per test
question; `fslm eval` tunes them on dev by default (see docs/eval.md).

    python benchmarks/eval_speed.py --stack DIR --data-dir ../shared/data [--task arc_easy] [--limit 50] \\
        [--stage-backend auto] [--stage-tokens 48] [--chains 3] [--agreement 20] [--out benchmarks/results/eval_speed.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stack", required=True, help="Stack directory (with adapters/single for the single row).")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--task", default="arc_easy")
    parser.add_argument("--limit", type=int, default=50)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--systems", default="base,single,stack")
    parser.add_argument("--stage-backend", default="auto")
    parser.add_argument("--stage-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--chains", type=int, default=3)
    parser.add_argument("--ensemble-weight", type=float, default=0.5)
    parser.add_argument("--gate-threshold", type=float, default=0.3)
    parser.add_argument("--agreement", type=int, default=20, help="Questions for the stage-text agreement check.")
    parser.add_argument("--modes", default="chain,ensemble,gate")
    parser.add_argument("--work", default="benchmarks/results/eval_speed_runs", help="Where the eval reports go.")
    parser.add_argument("--out", default="benchmarks/results/eval_speed.json")
    args = parser.parse_args()

    from fslm import __version__
    from fslm.steps.evaluate import EvalOptions, evaluate

    common = {
        "data_dir": Path(args.data_dir),
        "tasks": [args.task],
        "limit": args.limit,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "stage_tokens": args.stage_tokens,
        "stage_backend": args.stage_backend,
        "bootstrap": 1000,
    }
    runs = []
    modes = args.modes.split(",")
    for mode in modes:
        systems = args.systems.split(",") if mode == "chain" else ["stack"]
        extra = {"stack_scoring": mode}
        if mode == "chain":
            extra["stage_check"] = args.agreement
        if mode == "ensemble":
            extra.update(chains=args.chains, ensemble_weight=args.ensemble_weight)
        if mode == "gate":
            extra["gate_threshold"] = args.gate_threshold
        out = Path(args.work) / mode
        start = time.perf_counter()
        result = evaluate(args.stack, out, EvalOptions(systems=systems, **common, **extra)).results
        wall = time.perf_counter() - start
        for name, row in result["systems"].items():
            label = name if name != "stack" else f"stack ({mode}{f', K={args.chains}' if mode == 'ensemble' else ''})"
            scoring = row.get("stack_scoring", {})
            runs.append(
                {
                    "row": label,
                    "accuracy": row["tasks"][args.task]["accuracy"],
                    "seconds_per_question": row["seconds_per_query"],
                    "stage_seconds": row.get("stage_seconds"),
                    "stage_backend": row.get("stage_backend", "-"),
                    "questions_with_chain": scoring.get("questions_with_chain"),
                    "stage_agreement": row.get("stage_agreement"),
                    "peak_rss_mb": row["peak_rss_mb"],
                }
            )
        print(f"{mode}: {wall:.0f} s wall", file=sys.stderr)

    print(f"{'row':<26} {'acc':>6} {'s/question':>11} {'stage s':>8} {'backend':>9} {'chains run':>10}")
    for r in runs:
        chains = "-" if r["questions_with_chain"] is None else str(r["questions_with_chain"])
        stage = "-" if r["stage_seconds"] is None else f"{r['stage_seconds']:.0f}"
        print(
            f"{r['row']:<26} {r['accuracy']:>6.3f} {r['seconds_per_question']:>11.3f} {stage:>8} "
            f"{r['stage_backend']:>9} {chains:>10}"
        )
    agreement = next((r["stage_agreement"] for r in runs if r["stage_agreement"]), None)
    if agreement:
        per = ", ".join(f"{k} {v:.0%}" for k, v in agreement["stage_text_equal"].items())
        print(
            f"greedy stage text equal to PyTorch's ({agreement['questions']} questions): {per}; "
            f"whole chain {agreement['chain_text_equal']:.0%}"
        )
    report = {
        "args": vars(args),
        "rows": runs,
        "versions": {"fslm": __version__, "python": platform.python_version()},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
