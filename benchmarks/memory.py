"""Peak resident memory of a stack: the bare base model vs the same base with every stage's LoRA adapter attached.

Each measurement runs in its own fresh process (load + one short greedy run of every stage), so peak RSS
(`ru_maxrss`) covers loading and generation. Both figures include the Python/torch runtime.

`--train DATA` measures `fslm train` instead: a fresh stack over the base, DATA copied into it, then
`fslm train DIR --data DATA --max-steps N --batch-size B` in a child process; reports the child's peak RSS
(its own `ru_maxrss`, from `os.wait4`) and wall time. `--quickstart` measures `fslm quickstart` with its defaults,
`--eval STACK --data-dir D` `fslm eval` of base, single and stack at scoring batch 8 (issue 14's memory bound).

    python benchmarks/memory.py [--base smollm2-135m-instruct] [--out benchmarks/results/memory.json]
    OMP_NUM_THREADS=1 python benchmarks/memory.py --train runs/qs/distilled.jsonl [--max-steps 4]
    python benchmarks/memory.py --quickstart [--timeline]
    python benchmarks/memory.py --eval runs/qs/stack --data-dir ../shared/data [--limit 60]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def _child(directory: str) -> None:
    from fslm import Stack

    stack = Stack.load(directory)
    trace = stack.run("Give three tips for staying healthy.", max_new_tokens=8)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    adapters = [s.adapter for s in trace.stages]
    print(json.dumps({"peak_rss_mib": peak_kib / 1024, "adapters": adapters}))


def _make_adapters(directory: str) -> None:
    """Write an r/targets-as-configured LoRA adapter for every stage (weights untrained: memory is the same)."""
    from peft import LoraConfig, get_peft_model

    from fslm import Stack

    stack = Stack.load(directory)
    lora = stack.config.lora
    for stage in stack.config.stage_names:
        cfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules)
        model = get_peft_model(stack.backend.model, cfg, adapter_name=stage)
        model.save_pretrained(str(Path(directory) / "adapters"), selected_adapters=[stage])
        model.unload()  # back to the plain base for the next stage
    # PEFT writes non-default adapters into adapters/<name>/ under the given folder: check they are there.
    for stage in stack.config.stage_names:
        assert (Path(directory) / "adapters" / stage / "adapter_model.safetensors").is_file(), stage


def _run(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _fslm_child(*args: str, timeline: list[tuple[float, float, str]] | None = None) -> tuple[float, float]:
    """Run `python -m fslm ARGS` in a fresh process; (its own peak RSS in MiB, wall seconds).

    `timeline`: filled with (seconds, peak RSS in MiB since the previous line, the child's stderr line), RSS sampled
    from /proc every 0.1 s, to see which phase holds the memory."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "fslm", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    err: list[str] = []
    window = [0.0]

    def sample() -> None:  # VmRSS of the running child; the window's maximum is reset at each stderr line
        status = Path(f"/proc/{proc.pid}/status")
        while proc.returncode is None:
            with contextlib.suppress(OSError, ValueError, IndexError, StopIteration):
                rss = next(ln for ln in status.read_text().splitlines() if ln.startswith("VmRSS"))
                window[0] = max(window[0], int(rss.split()[1]) / 1024)
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    if timeline is not None:
        sampler.start()
    for raw in proc.stderr:  # the child exits only after its stderr is drained
        line = raw.decode(errors="replace").rstrip()
        err.append(line)
        if timeline is not None and line.strip():
            timeline.append((time.perf_counter() - start, window[0], line.strip()[:110]))
            window[0] = 0.0
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)  # Popen must not wait on the reaped pid again
    if timeline is not None:
        timeline.append((seconds, window[0], "(exit)"))
    if proc.returncode != 0:
        sys.exit(f"fslm {' '.join(args)}: exit code {proc.returncode}\n" + "\n".join(err[-40:]))
    return usage.ru_maxrss / 1024, seconds


def _allocator(command: str) -> str:
    """The malloc the fslm child ran under (training commands restart under tcmalloc when it is installed)."""
    from fslm import heap

    chosen = heap.allocator_library() if command in heap.PRELOAD_COMMANDS else None
    return os.environ.get("LD_PRELOAD") or chosen or "glibc"


def command_memory(args: argparse.Namespace, what: str) -> None:
    """Peak RSS and wall time of one fslm command (`train`, `quickstart` or `eval`), run whole in one child process."""
    from fslm import __version__

    with tempfile.TemporaryDirectory() as tmp:
        settings: dict[str, object] = {}
        if what == "train":  # a fresh stack over the base, the data copied in
            stack, data = Path(tmp) / "stack", Path(tmp) / "distilled.jsonl"
            _fslm_child("init", str(stack), "--base", args.base)
            shutil.copyfile(args.train, data)
            command = ["train", str(stack), "--data", str(data), "--max-steps", str(args.max_steps)]
            command += ["--batch-size", str(args.batch_size)]
            records = sum(1 for line in Path(args.train).read_text().splitlines() if line.strip())
            settings = {"records": records, "max_steps": args.max_steps, "batch_size": args.batch_size}
        elif what == "quickstart":  # its defaults: the embedded model end to end
            command = ["quickstart", "--out", str(Path(tmp) / "qs")]
        else:  # base, single and stack at scoring batch 8, stages on the stack's own fast path
            command = ["eval", str(args.eval), "--data-dir", str(args.data_dir), "--out", str(Path(tmp) / "eval")]
            command += ["--tasks", "arc_easy", "--limit", str(args.limit), "--systems", "base,single,stack"]
            command += ["--batch-size", "8", "--stage-tokens", "48"]
            settings = {"stack": str(args.eval), "limit": args.limit, "tasks": "arc_easy", "batch_size": 8}
        timeline: list[tuple[float, float, str]] | None = [] if args.timeline else None
        peak, seconds = _fslm_child(*command, timeline=timeline)
    print(f"fslm {what} ({settings or 'defaults'}, {args.base if what == 'train' else 'embedded model'})")
    allocator = _allocator(what)
    print(f"peak RSS {peak:,.0f} MiB   wall {seconds:.1f} s   malloc {allocator}")
    for at, mib, line in timeline or []:
        print(f"{at:7.1f} s {mib:8,.0f} MiB  {line}")
    result = {
        "base": args.base,
        what: settings,
        f"peak_rss_mib_{what}": peak,
        f"wall_seconds_{what}": round(seconds, 1),
        "threads": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "FSLM_LLAMACPP_THREADS")},
        "allocator": allocator,
        "versions": {"fslm": __version__, "python": platform.python_version(), **_versions()},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "timeline": timeline,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="smollm2-135m-instruct")
    parser.add_argument("--out", default="benchmarks/results/memory.json")
    parser.add_argument("--train", metavar="DATA", help="Measure `fslm train` on this distilled JSONL instead.")
    parser.add_argument("--max-steps", type=int, default=4, help="--train: optimizer steps per stage.")
    parser.add_argument("--batch-size", type=int, default=4, help="--train: examples per batch.")
    parser.add_argument("--quickstart", action="store_true", help="Measure `fslm quickstart` (its defaults) instead.")
    parser.add_argument("--eval", metavar="STACK", type=Path, help="Measure `fslm eval` of base, single and stack.")
    parser.add_argument("--data-dir", type=Path, help="--eval: the benchmark data directory.")
    parser.add_argument("--limit", type=int, default=60, help="--eval: ARC-Easy test questions.")
    parser.add_argument(
        "--timeline", action="store_true", help="Peak RSS between the child's log lines (which phase holds it)."
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--make-adapters", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return _child(args.child)
    if args.make_adapters:
        _make_adapters(args.make_adapters)
        return print("{}")
    what = "train" if args.train else "quickstart" if args.quickstart else "eval" if args.eval else None
    if what:
        if what == "eval" and not args.data_dir:
            parser.error("--eval needs --data-dir")
        if args.out == parser.get_default("out"):
            args.out = f"benchmarks/results/memory_{what}.json"
        return command_memory(args, what)

    from fslm import __version__
    from fslm.steps.init import InitOptions, init

    with tempfile.TemporaryDirectory() as tmp:
        bare, full = Path(tmp) / "bare", Path(tmp) / "full"
        init(bare, InitOptions(base=args.base))
        config = init(full, InitOptions(base=args.base)).config
        _run("--make-adapters", str(full))
        base = _run("--child", str(bare))
        stacked = _run("--child", str(full))
    assert all(a is None for a in base["adapters"]) and all(a is not None for a in stacked["adapters"])
    ratio = stacked["peak_rss_mib"] / base["peak_rss_mib"]
    lora = config.lora
    rows = [
        ("bare base model (0 adapters)", base["peak_rss_mib"], 1.0),
        (
            f"stack, {len(config.stages)} adapters (r={lora.r}, {len(lora.target_modules)} modules)",
            stacked["peak_rss_mib"],
            ratio,
        ),
    ]
    print(f"{'configuration':<48} {'peak RSS (MiB)':>15} {'ratio':>7}")
    for name, mib, r in rows:
        print(f"{name:<48} {mib:>15.0f} {r:>7.3f}")
    result = {
        "base": args.base,
        "peak_rss_mib_base": base["peak_rss_mib"],
        "peak_rss_mib_stack": stacked["peak_rss_mib"],
        "ratio": ratio,
        "stages": len(config.stages),
        "lora": lora.model_dump(),
        "versions": {"fslm": __version__, "python": platform.python_version(), **_versions()},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


def _versions() -> dict[str, str]:
    import peft
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}


if __name__ == "__main__":
    main()
