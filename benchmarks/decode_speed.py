"""Decode speed of a stack: PyTorch vs llama.cpp with the stage adapters vs llama.cpp's bare base (batch 1).

Every backend decodes the SAME stage prompts (rendered once from a PyTorch run of the stack) with each stage's
generation settings; tok/s = output tokens / wall seconds of the stage call (prompt processing included).
`--memory` also measures resident memory of the two llama.cpp layouts (one context with hot-swapped adapters vs one
context per stage over the same memory-mapped base), each in a fresh subprocess.

    python benchmarks/decode_speed.py                      # builds a temp stack: embedded base + 4 random r=16 LoRAs
    python benchmarks/decode_speed.py --stack DIR --memory # an exported stack (fslm export DIR --format gguf)
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from fslm.backends.llamacpp import LlamaCppBackend
from fslm.config import load_config
from fslm.stack import Stack
from fslm.stackdir import StackDir

INSTRUCTIONS = [
    "Give three tips for staying healthy.",
    "Explain why the sky is blue.",
    "Write a short plan for learning to cook.",
    "What is the capital of France, and why is it famous?",
]


def build_demo_stack(root: Path, rank: int = 16) -> Path:
    """Embedded base + one random LoRA per stage (B scaled to a trained adapter's size), exported as shipped (Q4_1)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import make_adapter
    from safetensors.numpy import load_file, save_file

    from fslm import models
    from fslm.config import BaseModelSettings
    from fslm.steps.export import export_gguf
    from fslm.steps.init import init

    settings = BaseModelSettings()
    ref = models.resolve(settings.model)
    cache = models.gguf_cache_dir(ref, settings)
    if not (cache / "config.json").is_file():
        models.load_base(ref, settings)
    directory = root / "stack"
    config = init(directory).config
    for seed, stage in enumerate(config.stage_names):
        path = make_adapter(cache, "llama", StackDir(directory).adapter(stage), seed=seed, r=rank)
        weights = path / "adapter_model.safetensors"
        save_file({k: v * (0.02 if "lora_B" in k else 1.0) for k, v in load_file(str(weights)).items()}, str(weights))
    export_gguf(directory, None)
    return directory


def timed_stage_runs(backend: Any, prompts: list[list[str]], stages: list[Any], adapters: bool) -> list[list[dict]]:
    """prompts[q][s] -> per query, per stage {tokens, seconds}."""
    rows = []
    for query in prompts:
        row = []
        for stage, prompt in zip(stages, query, strict=True):
            adapter = stage.name if adapters and stage.name in getattr(backend, "adapters", {}) else None
            t0 = time.perf_counter()
            [c] = backend.generate([prompt], adapter, stage.generation, label=stage.name)
            row.append({"tokens": c.output_tokens, "seconds": time.perf_counter() - t0})
        rows.append(row)
    return rows


def summarise(rows: list[list[dict]], names: list[str]) -> dict[str, Any]:
    per_stage = {}
    for i, name in enumerate(names):
        tok = sum(r[i]["tokens"] for r in rows)
        sec = sum(r[i]["seconds"] for r in rows)
        per_stage[name] = {"tokens": tok, "seconds": sec, "tok_s": tok / sec if sec else 0.0}
    tok = sum(v["tokens"] for v in per_stage.values())
    sec = sum(v["seconds"] for v in per_stage.values())
    return {"stages": per_stage, "query": {"tokens": tok, "seconds": sec, "tok_s": tok / sec if sec else 0.0}}


def rss_kib() -> dict[str, int]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0])
    return fields


def memory_child(directory: Path, layout: str) -> None:
    """Load the llama.cpp stack in one layout, run one short generation per stage, print RSS as JSON."""
    config = load_config(directory)
    before = rss_kib()
    stack = Stack.load(directory, backend="llamacpp")  # tokenizer + first context with all adapters
    backends = {s.name: stack.backend for s in config.stages}
    if layout == "per-stage":
        stack.backend.close()
        backends = {}
        for s in config.stages:
            b = LlamaCppBackend.from_settings(config.base, directory)
            b.add_adapter(s.name, StackDir(directory).adapter(s.name))
            backends[s.name] = b
    for s in config.stages:
        prompt = stack.render_prompt(s, INSTRUCTIONS[0], None, {p: "..." for p in s.reads})
        backends[s.name].generate([prompt], s.name, s.generation.model_copy(update={"max_new_tokens": 8}))
    after = rss_kib()
    print(json.dumps({"layout": layout, "before_kib": before, "after_kib": after}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stack", type=Path, help="An exported stack directory (default: build a demo stack).")
    ap.add_argument("--queries", type=int, default=2, help="How many instructions (at most 4).")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--memory", action="store_true", help="Also measure RSS of the two llama.cpp layouts.")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/decode_speed.json"))
    ap.add_argument("--_memory-child", dest="memory_child", choices=["hot-swap", "per-stage"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        memory_child(args.stack, args.memory_child)
        return
    console = Console()
    tmp = tempfile.TemporaryDirectory() if args.stack is None else None
    directory = args.stack or build_demo_stack(Path(tmp.name))
    config = load_config(directory)
    for s in config.stages:  # same cap for every backend; greedy, as the recipe says
        s.generation.max_new_tokens = args.max_new_tokens
    names = config.stage_names

    torch_stack = Stack(config, Stack.load(directory, backend="torch").backend, directory)
    instructions = INSTRUCTIONS[: args.queries]
    prompts = []
    for text in instructions:  # the prompts every backend decodes: the PyTorch stack's own
        trace = torch_stack.run(text)
        prompts.append([r.prompt for r in trace.stages])
    results = {"torch": summarise(timed_stage_runs(torch_stack.backend, prompts, config.stages, True), names)}
    llama_stack = Stack(config, LlamaCppBackend.from_settings(config.base, directory), directory)
    results["llamacpp"] = summarise(timed_stage_runs(llama_stack.backend, prompts, config.stages, True), names)
    results["llamacpp_base"] = summarise(timed_stage_runs(llama_stack.backend, prompts, config.stages, False), names)

    table = Table("stage", "torch tok/s", "llama.cpp+LoRA tok/s", "llama.cpp base tok/s", "LoRA/torch", "LoRA/base")
    for name in [*names, "whole query"]:
        pick = (lambda r: r["query"]) if name == "whole query" else (lambda r, n=name: r["stages"][n])  # noqa: E731
        t, lo, b = (pick(results[k])["tok_s"] for k in ("torch", "llamacpp", "llamacpp_base"))
        table.add_row(name, f"{t:.1f}", f"{lo:.1f}", f"{b:.1f}", f"{lo / t:.2f}x", f"{lo / b:.2f}x")
    console.print(table)

    report: dict[str, Any] = {"results": results, "queries": instructions, "max_new_tokens": args.max_new_tokens}
    if args.memory:
        report["memory"] = {}
        for layout in ("hot-swap", "per-stage"):
            proc = subprocess.run(
                [sys.executable, __file__, "--stack", str(directory), "--_memory-child", layout],
                capture_output=True,
                text=True,
                check=True,
            )
            report["memory"][layout] = json.loads(proc.stdout.strip().splitlines()[-1])
            after = report["memory"][layout]["after_kib"]
            console.print(
                f"{layout}: VmRSS {after['VmRSS'] / 1024:.0f} MiB (anon {after['RssAnon'] / 1024:.0f}, "
                f"file {after['RssFile'] / 1024:.0f})"
            )
    import llama_cpp
    import torch

    report["env"] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "llama_cpp_python": llama_cpp.__version__,
        "torch_threads": torch.get_num_threads(),
        "note": "measured under contention (other jobs on the machine)",
        "stack": str(directory) if args.stack else "demo: embedded base (Q4_1) + 4 random r=16 LoRAs",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"wrote {args.out}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
