"""Peak resident memory of single training steps of one stage, under each CPU allocation setting.

Why: `fslm train`'s peak sits inside the steps of its final stage (docs/train.md, "Memory"); this isolates them.
Each setting runs in a fresh child process (PyTorch reads `THP_MEM_ALLOC_ENABLE` once, at its first allocation;
glibc reads `MALLOC_*` at start): load the stack on torch, attach a fresh LoRA as `fslm train` does (gradient
checkpointing on, non-reentrant), then run forward + backward + AdamW step on the stage's longest examples
(`--batch-size` of them, fixed, so every step sees the same shapes). Reports the process's peak RSS, its RSS after
loading and the seconds per step.

    python benchmarks/train_step_memory.py --stack runs/qs/stack --data runs/qs/distilled.jsonl [--stage answer]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

SETTINGS = {
    "glibc": {"THP_MEM_ALLOC_ENABLE": "0"},
    "huge pages (fslm default)": {"THP_MEM_ALLOC_ENABLE": "1"},
    "mmap threshold 1 MiB": {"THP_MEM_ALLOC_ENABLE": "0", "MALLOC_MMAP_THRESHOLD_": "1048576"},
}


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _child(args: argparse.Namespace) -> dict:
    import torch
    from peft import get_peft_model

    from fslm.distilled import read_distilled
    from fslm.stack import Stack
    from fslm.steps.train import lora_config
    from fslm.steps.train_data import PadCollator, build_examples, target_token_loss

    torch.manual_seed(0)
    stack = Stack.load(args.stack, backend="torch")
    records, _ = read_distilled(args.data)
    examples = build_examples(stack, records, [], args.stage).train
    longest = sorted(examples, key=lambda e: -len(e["input_ids"]))[: args.batch_size]
    tok = stack.backend.tokenizer
    batch = PadCollator(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)(longest)
    model = get_peft_model(stack.backend.release_adapters(), lora_config(stack.config.lora))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    loaded = _rss_mib()
    head = model.get_output_embeddings()
    seconds = []
    for _ in range(args.steps):
        start = time.perf_counter()
        loss, _ = target_token_loss(model, head, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - start)
    return {
        "batch_shape": list(batch["input_ids"].shape),
        "target_tokens": int(batch["labels"].ne(-100).sum()),
        "rss_loaded_mib": round(loaded, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "seconds_per_step": [round(s, 2) for s in seconds],
        "loss": round(float(loss), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stack", required=True)
    parser.add_argument("--data", required=True, help="distilled JSONL")
    parser.add_argument("--stage", default="answer")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated names of SETTINGS")
    parser.add_argument("--out", default="benchmarks/results/train_step_memory.json")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args)))
        return
    rows = []
    for name in args.settings.split(","):
        env = {**os.environ, **SETTINGS[name]}
        child = [sys.executable, __file__, "--child", "--stack", args.stack, "--data", args.data]
        child += ["--stage", args.stage, "--batch-size", str(args.batch_size), "--steps", str(args.steps)]
        out = subprocess.run(child, env=env, capture_output=True, text=True, check=True)
        row = {"setting": name, "env": SETTINGS[name], **json.loads(out.stdout.strip().splitlines()[-1])}
        rows.append(row)
        steps = row["seconds_per_step"]
        print(
            f"{name:28s} peak {row['peak_rss_mib']:>8,.0f} MiB  loaded {row['rss_loaded_mib']:>6,.0f} MiB  "
            f"step {sum(steps[1:]) / max(len(steps) - 1, 1):5.1f} s (first {steps[0]:.1f})  loss {row['loss']}"
        )
    import torch

    report = {
        "benchmark": "train_step_memory",
        "stack": args.stack,
        "data": args.data,
        "stage": args.stage,
        "steps": args.steps,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "command": " ".join(["python", "benchmarks/train_step_memory.py", *sys.argv[1:]]),
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
