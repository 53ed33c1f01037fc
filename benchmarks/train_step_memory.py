"""Peak resident memory of single training steps of one stage, under each CPU allocation setting.

Why: `fslm train`'s peak sits inside the steps of its final stage (docs/train.md, "Memory"); this isolates them.
Each setting runs in a fresh child process (PyTorch reads `THP_MEM_ALLOC_ENABLE` once, at its first allocation;
glibc reads `MALLOC_*` at start; another malloc comes in through `LD_PRELOAD`, skipped when not installed): load the
stack on torch, attach a fresh LoRA as `fslm train` does (gradient checkpointing on, non-reentrant), then run
forward + backward + AdamW step on the stage's longest examples (`--batch-size` of them, fixed, so every step sees
the same shapes). Reports the process's peak RSS, split into anonymous memory (heap, tensors) and file pages (the
libraries, the base's memory-mapped weights), its RSS after loading and the seconds per step; `--live` profiles one
more step for the peak of live tensors (what an allocator could at best get down to).

    python benchmarks/train_step_memory.py --stack runs/qs/stack --data runs/qs/distilled.jsonl [--stage answer]
    python benchmarks/train_step_memory.py ... --settings "tcmalloc,jemalloc" --live
"""

from __future__ import annotations

import argparse
import ctypes.util
import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

TCMALLOC, JEMALLOC = "libtcmalloc_minimal.so.4", "libjemalloc.so.2"  # Debian: libtcmalloc-minimal4, libjemalloc2
SETTINGS = {
    "glibc": {"THP_MEM_ALLOC_ENABLE": "0"},
    "huge pages": {"THP_MEM_ALLOC_ENABLE": "1"},  # what `import fslm` sets
    "mmap threshold 1 MiB": {"THP_MEM_ALLOC_ENABLE": "0", "MALLOC_MMAP_THRESHOLD_": str(1 << 20)},
    "huge pages + mmap 2 MiB": {"THP_MEM_ALLOC_ENABLE": "1", "MALLOC_MMAP_THRESHOLD_": str(2 << 20)},
    "huge pages + mmap 4 MiB": {"THP_MEM_ALLOC_ENABLE": "1", "MALLOC_MMAP_THRESHOLD_": str(4 << 20)},
    "huge pages + mmap 16 MiB": {"THP_MEM_ALLOC_ENABLE": "1", "MALLOC_MMAP_THRESHOLD_": str(16 << 20)},
    "one arena": {"THP_MEM_ALLOC_ENABLE": "0", "MALLOC_ARENA_MAX": "1"},
    "huge pages + one arena": {"THP_MEM_ALLOC_ENABLE": "1", "MALLOC_ARENA_MAX": "1"},
    "jemalloc": {"THP_MEM_ALLOC_ENABLE": "0", "LD_PRELOAD": JEMALLOC},
    "tcmalloc": {"THP_MEM_ALLOC_ENABLE": "0", "LD_PRELOAD": TCMALLOC},
    "tcmalloc + huge pages": {"THP_MEM_ALLOC_ENABLE": "1", "LD_PRELOAD": TCMALLOC},  # fslm train's default
}
DEFAULT = ("glibc", "huge pages", "mmap threshold 1 MiB", "jemalloc", "tcmalloc + huge pages")


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _rss_parts() -> dict[str, float]:
    """Anonymous (heap, tensors) and file-backed (libraries, the base's memory-mapped weights) resident MiB."""
    parts = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("RssAnon", "RssFile")):
                name, value = line.split(":")
                parts[name] = int(value.split()[0]) / 1024
    return parts


def _watch_rss(peaks: dict[str, float]) -> None:
    """Keep the highest RssAnon / RssFile seen (sampled every 10 ms; the kernel keeps only their sum's peak)."""
    while True:
        for name, mib in _rss_parts().items():
            peaks[name] = max(peaks.get(name, 0.0), mib)
        time.sleep(0.01)


def _peak_live_tensors(model, head, batch, target_token_loss) -> float:
    """Peak MiB of live tensors in one forward + backward, from the profiler's allocation events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss, _ = target_token_loss(model, head, batch)
        loss.backward()
    model.zero_grad(set_to_none=True)
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak / 2**20


def _child(args: argparse.Namespace) -> dict:
    import torch
    from peft import get_peft_model

    from fslm.distilled import read_distilled
    from fslm.stack import Stack
    from fslm.steps.train.batches import PadCollator
    from fslm.steps.train.examples import build_examples
    from fslm.steps.train.loss import target_token_loss
    from fslm.steps.train.trainer import lora_config

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
    loaded, loaded_parts = _rss_mib(), _rss_parts()
    head = model.get_output_embeddings()
    peaks: dict[str, float] = {}
    threading.Thread(target=_watch_rss, args=(peaks,), daemon=True).start()
    seconds = []
    for _ in range(args.steps):
        start = time.perf_counter()
        loss, _ = target_token_loss(model, head, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - start)
    parts = {f"peak_{name[3:].lower()}_mib": round(mib, 1) for name, mib in peaks.items()}
    peak_rss = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # before the profiled step
    live = round(_peak_live_tensors(model, head, batch, target_token_loss), 1) if args.live else None
    return {
        "batch_shape": list(batch["input_ids"].shape),
        **parts,
        "peak_live_tensors_mib": live,
        "target_tokens": int(batch["labels"].ne(-100).sum()),
        "rss_loaded_mib": round(loaded, 1),
        **{f"loaded_{name[3:].lower()}_mib": round(mib, 1) for name, mib in loaded_parts.items()},
        "peak_rss_mib": peak_rss,
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
    parser.add_argument("--settings", default=",".join(DEFAULT), help="comma-separated names of SETTINGS")
    parser.add_argument("--out", default="benchmarks/results/train_step_memory.json")
    parser.add_argument("--live", action="store_true", help="also profile one more step: peak MiB of live tensors")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args)))
        return
    rows = []
    for name in args.settings.split(","):
        env = {**os.environ, **SETTINGS[name]}
        preload = SETTINGS[name].get("LD_PRELOAD")
        if preload and not ctypes.util.find_library(preload[3:].split(".so")[0]):
            print(f"{name:28s} skipped: {preload} is not installed")
            continue
        child = [sys.executable, __file__, "--child", "--stack", args.stack, "--data", args.data]
        child += ["--stage", args.stage, "--batch-size", str(args.batch_size), "--steps", str(args.steps)]
        child += ["--live"] if args.live else []
        out = subprocess.run(child, env=env, capture_output=True, text=True, check=True)
        row = {"setting": name, "env": SETTINGS[name], **json.loads(out.stdout.strip().splitlines()[-1])}
        rows.append(row)
        steps = row["seconds_per_step"]
        print(
            f"{name:28s} peak {row['peak_rss_mib']:>8,.0f} MiB  loaded {row['rss_loaded_mib']:>6,.0f} MiB  "
            f"step {sum(steps[1:]) / max(len(steps) - 1, 1):5.1f} s (first {steps[0]:.1f})  loss {row['loss']}  "
            f"anon {row.get('peak_anon_mib', 0):,.0f} file {row.get('peak_file_mib', 0):,.0f} MiB"
            + (f"  live tensors {row['peak_live_tensors_mib']:,.0f} MiB" if args.live else "")
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
