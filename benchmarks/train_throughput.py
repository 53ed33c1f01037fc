"""Training throughput: fslm's path (length-grouped batches, dynamic padding) vs a naive one (random batches
padded to the longest example), same records, same steps, same seed; and with --precision, float32 vs bfloat16
autocast on fslm's path (issue 16's goal: >= 2x tokens/s at validation loss within 1 %, where bf16 is native).

Tokens/s counts real (non-padding) input tokens per second of the training loop; both runs then report their
validation loss on the same held-out records. Goal: >= 1.3x the naive tokens/s at equal or better loss.

    # a distilled file (docs/formats.md); trains the final stage, whose prompts hold every earlier target
    python benchmarks/train_throughput.py --data d.jsonl [--stage answer]
    # or raw Alpaca records (instruction/input/output): trains the single-adapter baseline on them
    python benchmarks/train_throughput.py --alpaca DATA_DIR/alpaca/alpaca_data_200.json
    # float32 vs bf16 on the same records and steps
    python benchmarks/train_throughput.py --alpaca DATA_DIR/alpaca/alpaca_data_200.json --precision
    # a grid, each setting in a fresh process (tokens/s, validation loss, peak RSS): gradient checkpointing on/off x
    # batch sizes x precisions x allocators x LoRA dropouts, on one stage's records of a distilled file
    python benchmarks/train_throughput.py --data QS/distilled.jsonl --grid --batch-sizes 2,4,8 \
        --checkpointing on,off,auto --precisions auto --allocators system,tcmalloc --dropouts 0.05,0 --steps 6
    options: --base smollm2-135m-instruct (or a local HF dir) --records 200 --steps 20 --batch-size 4
             --out benchmarks/results/train_throughput.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import tempfile
import time
from pathlib import Path


def shown(path: Path) -> str:
    """A data file as a committed report names it: relative to here when below it, else its name (the sha256 beside
    it says which file it was); never this machine's absolute path."""
    path = Path(path).resolve()
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else path.name


def alpaca_to_distilled(src: Path, dst: Path, limit: int, stage: str) -> int:
    """Alpaca records as distilled records whose final-stage target is the reference (for --single)."""
    rows = json.loads(src.read_text(encoding="utf-8"))[:limit]
    with open(dst, "w", encoding="utf-8") as f:
        for i, r in enumerate(rows):
            rid = hashlib.sha256(f"{r['instruction']}\n{r.get('input', '')}".encode()).hexdigest()[:16]
            rec = {
                "id": rid,
                "instruction": r["instruction"],
                "input": r.get("input") or None,
                "reference": r["output"],
                "targets": {stage: r["output"]},
                "source": {"file": src.name, "index": i},
            }
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return len(rows)


def first_records(src: Path, dst: Path, limit: int) -> int:
    lines = [line for line in src.read_text(encoding="utf-8").splitlines() if line.strip()][:limit]
    dst.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return len(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", type=Path, help="distilled JSONL")
    src.add_argument("--alpaca", type=Path, help="Alpaca JSON (instruction/input/output); trains --single")
    parser.add_argument("--stage", help="stage to train with --data (default: the final stage)")
    parser.add_argument("--base", default="smollm2-135m-instruct")
    parser.add_argument("--records", type=int, default=200)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-length", type=int, default=1024, help="skip longer examples (both runs)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/train_throughput.json"))
    parser.add_argument(
        "--precision", action="store_true", help="compare float32 with bf16 autocast instead of padding strategies"
    )
    parser.add_argument("--grid", action="store_true", help="a grid of settings, each in a fresh process")
    parser.add_argument("--batch-sizes", default="2,4,8", help="--grid: batch sizes")
    parser.add_argument("--checkpointing", default="on,off", help="--grid: gradient checkpointing on, off, auto")
    parser.add_argument("--precisions", default="auto", help="--grid: auto, fp32, bf16 (comma list)")
    parser.add_argument("--allocators", default="system", help="--grid: FSLM_ALLOCATOR values (system, tcmalloc)")
    parser.add_argument("--dropouts", default="0", help="--grid: LoRA dropout values (stack.yaml's lora.dropout)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.grid:
        return grid(args)

    from fslm import Stack
    from fslm.distilled import read_distilled
    from fslm.files import sha256_file
    from fslm.provenance import versions
    from fslm.stackdir import SINGLE
    from fslm.steps.init import InitOptions, init
    from fslm.steps.train import TrainOptions, train
    from fslm.steps.train.examples import build_examples, split_validation

    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "stack"
        config = init(directory, InitOptions(base=args.base)).config
        data = Path(tmp) / "records.jsonl"
        if args.alpaca:
            n = alpaca_to_distilled(args.alpaca, data, args.records, config.final_stage.name)
            name, source = SINGLE, args.alpaca
        else:
            n = first_records(args.data, data, args.records)
            name, source = args.stage or config.final_stage.name, args.data
        setting = json.loads(args.child) if args.child else {}
        if setting.get("dropout") is not None:  # the grid's LoRA dropout axis: as if stack.yaml said so
            from fslm.config import update_config

            update_config(directory, lambda doc: doc["lora"].__setitem__("dropout", setting["dropout"]))
        stack = Stack.load(directory)
        records, _ = read_distilled(data)
        train_recs, val_recs = split_validation(records, 0.1, args.seed)
        ex = build_examples(stack, train_recs, val_recs, name, args.max_length)
        lengths = [len(e["input_ids"]) for e in ex.train]
        common = dict(
            stages=None if name == SINGLE else [name],
            single=name == SINGLE,
            max_steps=args.steps,
            lr=args.lr,
            batch_size=args.batch_size,
            seed=args.seed,
            max_length=args.max_length,
            save_steps=10**9,
            eval_each_epoch=False,
        )
        if args.child:
            runs = {
                "child": TrainOptions(
                    **{**common, "batch_size": setting["batch_size"]},
                    precision=setting["precision"],
                    gradient_checkpointing=setting["checkpointing"],
                )
            }
        elif args.precision:
            runs = {
                "fslm, float32": TrainOptions(**common, precision="fp32"),
                "fslm, bf16 autocast": TrainOptions(**common, precision="bf16"),
            }
        else:
            runs = {
                "fslm (length-grouped, dynamic padding)": TrainOptions(**common, precision="fp32"),
                "naive (random order, pad to max length)": TrainOptions(
                    **common, group_by_length=False, pad_to=max(lengths), precision="fp32"
                ),
            }
        rows = {}
        for label, options in runs.items():
            start = time.perf_counter()
            t = train(directory, data, options, loaded=stack).adapters[name].training
            extra = t.model_extra or {}
            rows[label] = {
                "tokens_per_second": extra.get("tokens_per_second"),
                "input_tokens": extra.get("input_tokens"),
                "train_loss": t.train_loss,
                "val_loss": t.val_loss,
                "steps": t.steps,
                "wall_seconds": round(time.perf_counter() - start, 2),
                "checkpoint_every_n_layers": extra.get("checkpoint_every_n_layers"),
                "micro_batch": extra.get("micro_batch"),
            }
    from fslm.precision import bf16_support

    if args.child:
        import resource

        row = rows["child"]
        row.update(peak_rss_mib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                   example_tokens={"mean": round(sum(lengths) / len(lengths), 1), "max": max(lengths)},
                   train_examples=len(ex.train), bf16_native=bf16_support()[0])  # fmt: skip
        print(json.dumps(row))
        return
    ours, naive = rows.values()
    if args.precision:  # the second run is the challenger: bf16 over float32
        naive, ours = ours, naive
    speedup = ours["tokens_per_second"] / naive["tokens_per_second"]
    goal = (2.0, "bf16 >= 2x float32 at val loss within 1%") if args.precision else (1.3, ">=1.3x at equal loss")
    result = {
        "benchmark": "train_throughput",
        "base": args.base,
        "adapter": name,
        "data": shown(source),
        "data_sha256": sha256_file(source),
        "records": n,
        "train_examples": len(ex.train),
        "val_examples": len(ex.val),
        "skipped": len(ex.problems),
        "example_tokens": {"min": min(lengths), "mean": round(sum(lengths) / len(lengths), 1), "max": max(lengths)},
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "seed": args.seed,
        "runs": rows,
        "speedup": round(speedup, 3),
        "goal_met": speedup >= goal[0] and ours["val_loss"] <= naive["val_loss"] * 1.01,
        "goal": goal[1],
        "bf16_native": bf16_support(),
        "versions": versions(),
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0]},
        "note": "val loss 'equal' allows 1% noise; figures measured on a shared machine may be under contention",
    }
    print(f"{'run':<42} {'tokens/s':>10} {'train loss':>11} {'val loss':>9} {'wall s':>8}")
    for label, r in rows.items():
        print(
            f"{label:<42} {r['tokens_per_second']:>10,.0f} {r['train_loss']:>11.4f} {r['val_loss']:>9.4f} "
            f"{r['wall_seconds']:>8.1f}"
        )
    print(
        f"speedup {speedup:.2f}x on {len(ex.train)} examples ({result['example_tokens']}), {args.steps} steps "
        f"x batch {args.batch_size}; goal ({goal[1]}) met: {result['goal_met']}; bf16 native: {bf16_support()[1]}"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


def grid(args: argparse.Namespace) -> None:
    """Every combination of the grid's settings, each trained in a fresh child process (so peak RSS is its own)."""
    import itertools
    import os
    import subprocess

    from fslm.heap import allocator_library
    from fslm.provenance import versions

    source = ["--data", str(args.data)] if args.data else ["--alpaca", str(args.alpaca)]
    if args.stage:
        source += ["--stage", args.stage]
    combos = itertools.product(
        args.allocators.split(","),
        args.checkpointing.split(","),
        args.precisions.split(","),
        [int(b) for b in args.batch_sizes.split(",")],
        [float(d) for d in args.dropouts.split(",")],
    )
    rows = []
    print(
        f"{'allocator':<10} {'dropout':>7} {'ckpt':<5} {'precision':<9} {'batch':>5} {'micro':>5} {'tokens/s':>9} "
        f"{'val loss':>9} {'peak MiB':>9}"
    )
    for allocator, checkpointing, precision, batch, dropout in combos:
        setting = {"batch_size": batch, "checkpointing": checkpointing, "precision": precision, "dropout": dropout}
        cmd = [sys.executable, __file__, *source, "--base", args.base, "--records", str(args.records),
               "--steps", str(args.steps), "--lr", str(args.lr), "--seed", str(args.seed),
               "--max-length", str(args.max_length), "--child", json.dumps(setting)]  # fmt: skip
        env = {**os.environ, "FSLM_ALLOCATOR": allocator}
        library = allocator_library("auto" if allocator == "tcmalloc" else allocator)
        if library:  # what `fslm train` does for itself at start (fslm.heap): the child runs under that malloc
            env["LD_PRELOAD"] = library
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            print(f"{allocator:<10} failed: {done.stderr.strip().splitlines()[-1:]}")
            continue
        row = {"allocator": allocator, **setting, **json.loads(done.stdout.strip().splitlines()[-1])}
        rows.append(row)
        print(f"{allocator:<10} {dropout:>7g} {checkpointing:<5} {precision:<9} {batch:>5} {row['micro_batch'] or batch:>5} "
              f"{row['tokens_per_second']:>9,.1f} {row['val_loss']:>9.4f} {row['peak_rss_mib']:>9,.0f}")  # fmt: skip
    result = {
        "benchmark": "train_throughput_grid",
        "command": "python benchmarks/train_throughput.py "
        + " ".join(shown(Path(a)) if Path(a).is_file() else a for a in sys.argv[1:]),
        "data": shown(args.data or args.alpaca),
        "data_sha256": sha256_of(args.data or args.alpaca),
        "steps": args.steps,
        "records": args.records,
        "seed": args.seed,
        "rows": rows,
        "versions": versions(),
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0]},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


def sha256_of(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


if __name__ == "__main__":
    main()
