"""Decode speed of a stack: PyTorch vs fslm's llama.cpp backend vs plain llama-cpp-python, with the stage adapters
and on the bare base, one query at a time; and fslm's llama.cpp backend with all queries of a stage in one call.

Every backend decodes the SAME stage prompts (rendered once from a PyTorch run of the stack) with each stage's
generation settings; tok/s = output tokens / wall seconds of the stage call (prompt processing included). "Plain"
is llama-cpp-python's high-level `Llama.generate` on the same token ids (one Llama per stage with its LoRA as
`lora_path`), generating exactly as many tokens as fslm's backend did.
`--memory` also measures resident memory of the two llama.cpp layouts (one context with hot-swapped adapters vs one
context per stage over the same memory-mapped base), each in a fresh subprocess.
`--profile` (llama.cpp only, no PyTorch) splits one stage's wall time into prompt evaluation, decode, sampling and
penalty, detokenisation and the rest (Python overhead), then runs it again under cProfile for the top functions.

    python benchmarks/decode_speed.py                      # builds a temp stack: embedded base + 4 random r=16 LoRAs
    python benchmarks/decode_speed.py --stack DIR --memory # an exported stack (fslm export DIR --format gguf)
    python benchmarks/decode_speed.py --profile answer --demo-dir /tmp/demo   # keep the demo stack for reruns
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import os
import platform
import pstats
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from fslm.backends.llamacpp import LlamaCppBackend
from fslm.config import load_config
from fslm.stack import Stack
from fslm.stackdir import StackDir

DEFAULT_OUT = Path("benchmarks/results/decode_speed.json")
EARLIER = [  # --profile: what the earlier stages "wrote" (about 40 tokens each, like 48-token stage outputs)
    "The user wants a short, practical answer that names the main points clearly and explains each one briefly, "
    "with no unnecessary detail.",
    "1. Identify the key facts. 2. Order them from most to least important. 3. Explain each in one sentence. "
    "4. End with a one-line summary.",
    "The most important fact comes first because it answers the question directly; the others support it with "
    "reasons and one example each.",
]
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


def plain_llama_runs(
    directory: Path,
    backend: Any,
    prompts: list[list[str]],
    stages: list[Any],
    counts: list[list[int]],
    lora: bool,
    threads: int | None,
) -> list[list[dict]]:
    """llama-cpp-python's own high-level `Llama.generate` on the same token ids, the stage's LoRA loaded with
    `lora_path` (one Llama per stage, all queries of that stage in turn; Llama reuses the prompt prefix the previous
    query shares, as fslm's backend does), same threads, greedy, the stage's repetition penalty, and exactly as many
    tokens as fslm's backend produced for that query and stage (counts[q][s]), so both do the same work."""
    import llama_cpp

    from fslm.backends.llamacpp import avoid_amx, default_threads

    avoid_amx()
    manifest = json.loads((directory / "gguf" / "manifest.json").read_text())
    threads = threads or default_threads()
    rows: list[list[dict]] = [[{} for _ in stages] for _ in prompts]
    for s, stage in enumerate(stages):
        entry = manifest["adapters"].get(stage.name) if lora else None
        llm = llama_cpp.Llama(
            model_path=str(directory / "gguf" / manifest["base"]["file"]),
            lora_path=str(directory / "gguf" / entry["file"]) if entry else None,
            n_ctx=0,
            n_threads=threads,
            n_threads_batch=threads,
            flash_attn=True,  # as fslm's backend (llama.cpp's auto turns it on for the CPU)
            verbose=False,
        )
        g = stage.generation
        for q, query in enumerate(prompts):
            ids = backend.tokenizer(query[s], add_special_tokens=not backend.chat)["input_ids"]
            n = 0
            t0 = time.perf_counter()
            for _ in llm.generate(
                ids, temp=g.temperature, top_p=g.top_p, top_k=0, min_p=0.0, repeat_penalty=g.repetition_penalty
            ):
                n += 1
                if n >= counts[q][s]:
                    break
            rows[q][s] = {"tokens": n, "seconds": time.perf_counter() - t0}
        llm.close()
    return rows


def batched_stage_runs(backend: Any, prompts: list[list[str]], stages: list[Any]) -> list[list[dict]]:
    """Every query's prompt of a stage in ONE generate call (as Stack.run_batch and the server do); a query's share
    of a stage's wall time is its share of the output tokens."""
    rows: list[list[dict]] = [[{} for _ in stages] for _ in prompts]
    for s, stage in enumerate(stages):
        adapter = stage.name if stage.name in getattr(backend, "adapters", {}) else None
        t0 = time.perf_counter()
        completions = backend.generate([q[s] for q in prompts], adapter, stage.generation, label=stage.name)
        seconds = time.perf_counter() - t0
        total = sum(c.output_tokens for c in completions) or 1
        for q, c in enumerate(completions):
            rows[q][s] = {"tokens": c.output_tokens, "seconds": seconds * c.output_tokens / total}
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


PROFILE_PARTS = ("prompt evaluation", "decode", "sampling + penalty", "detokenisation")


@contextlib.contextmanager
def instrumented(tokenizer: Any) -> Iterator[dict[str, float]]:
    """Wall seconds per part of generation, by wrapping the entry points every llama.cpp path goes through.

    llama.cpp's `llama_decode` is prompt evaluation when some of the batch's tokens need no logits (a prompt chunk)
    and decode when every token does (one new token per live sequence); sampling is llama.cpp's
    `llama_sampler_sample` plus llama-cpp-python's `Llama.sample` (which runs Python logits processors such as a
    repetition penalty); detokenisation is the HF tokenizer's `decode`. Nested calls count once.
    """
    import llama_cpp
    import llama_cpp.llama_cpp as lc

    spent: dict[str, float] = defaultdict(float)
    inside: set[str] = set()

    def decode_part(_ctx: Any, batch: Any) -> str:
        n = batch.n_tokens
        outputs = sum(1 for i in range(n) if batch.logits[i]) if batch.logits else n
        return "decode" if outputs == n else "prompt evaluation"

    def timed(fn: Any, part: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            name = part(*args) if callable(part) else part
            if name in inside:
                return fn(*args, **kwargs)
            inside.add(name)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[name] += time.perf_counter() - t0
                inside.discard(name)

        return wrapper

    from fslm.backends import llamacpp

    patches = [
        (lc, "llama_decode", decode_part),
        (lc, "llama_sampler_sample", "sampling + penalty"),
        (llama_cpp.Llama, "sample", "sampling + penalty"),
    ]
    if hasattr(llamacpp, "_Greedy"):  # fslm's greedy + penalty on llama.cpp's logits
        patches.append((llamacpp._Greedy, "pick", "sampling + penalty"))
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    for owner, name, part in patches:
        setattr(owner, name, timed(getattr(owner, name), part))
    tokenizer.decode = timed(tokenizer.decode, "detokenisation")  # an instance attribute, deleted below
    try:
        yield spent
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)
        del tokenizer.decode


def profile_stage(backend: Any, stage: Any, prompts: list[str], repeats: int, out: Path) -> dict[str, Any]:
    """One stage's generate at batch 1 on each prompt, `repeats` times: the wall time split into parts, then a
    second pass under cProfile (its overhead would distort the split) for the functions the rest goes to."""
    adapter = stage.name if stage.name in getattr(backend, "adapters", {}) else None
    tokens = prompt_tokens = 0
    start = time.perf_counter()
    with instrumented(backend.tokenizer) as spent:
        for _ in range(repeats):
            for prompt in prompts:
                [c] = backend.generate([prompt], adapter, stage.generation, label=stage.name)
                tokens += c.output_tokens
                prompt_tokens += c.prompt_tokens
    wall = time.perf_counter() - start
    parts = {name: spent.get(name, 0.0) for name in PROFILE_PARTS}
    parts["Python overhead (the rest)"] = wall - sum(parts.values())
    profiler = cProfile.Profile()
    profiler.enable()
    for prompt in prompts:
        backend.generate([prompt], adapter, stage.generation, label=stage.name)
    profiler.disable()
    out.parent.mkdir(parents=True, exist_ok=True)
    profiler.dump_stats(str(out))
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(15)
    return {
        "stage": stage.name,
        "calls": repeats * len(prompts),
        "prompt_tokens": prompt_tokens,
        "output_tokens": tokens,
        "seconds": wall,
        "tok_s": tokens / wall if wall else 0.0,
        "parts_s": parts,
        "cprofile_top": text.getvalue(),
        "cprofile_file": str(out),
    }


def print_profile(console: Console, profile: dict[str, Any]) -> None:
    table = Table("part", "seconds", "share", "ms per output token")
    wall = profile["seconds"]
    for name, seconds in profile["parts_s"].items():
        per_token = 1000 * seconds / max(1, profile["output_tokens"])
        table.add_row(name, f"{seconds:.3f}", f"{100 * seconds / wall:.1f}%", f"{per_token:.2f}")
    table.add_row("whole stage", f"{wall:.3f}", "100%", f"{1000 * wall / max(1, profile['output_tokens']):.2f}")
    console.print(
        f"stage {profile['stage']!r}: {profile['calls']} calls, {profile['prompt_tokens']} prompt tokens, "
        f"{profile['output_tokens']} output tokens, {profile['tok_s']:.1f} tok/s"
    )
    console.print(table)
    console.print(profile["cprofile_top"], markup=False, highlight=False)


def profile_main(args: argparse.Namespace, directory: Path, console: Console) -> None:
    """--profile: llama.cpp only; the stage's prompts read fixed texts for the earlier stages (EARLIER), so every
    version of the backend is profiled on the same prompts without a PyTorch load."""
    config = load_config(directory)
    for s in config.stages:
        s.generation.max_new_tokens = args.max_new_tokens
    stack = Stack(config, LlamaCppBackend.from_settings(config.base, directory, **llama_options(args)), directory)
    stage = config.stage(args.profile)
    outputs = {name: EARLIER[i % len(EARLIER)] for i, name in enumerate(config.stage_names)}
    prompts = [stack.render_prompt(stage, text, None, outputs) for text in INSTRUCTIONS[: args.queries]]
    profile = profile_stage(stack.backend, stage, prompts, args.repeats, args.out.with_suffix(".prof"))
    print_profile(console, profile)
    report = {"profile": profile, "queries": INSTRUCTIONS[: args.queries], "max_new_tokens": args.max_new_tokens}
    report["env"] = environment(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"wrote {args.out} and {profile['cprofile_file']}")


def llama_options(args: argparse.Namespace) -> dict[str, Any]:
    return {"n_threads": args.threads, "n_threads_batch": args.threads} if args.threads else {}


def environment(args: argparse.Namespace) -> dict[str, Any]:
    import llama_cpp
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "llama_cpp_python": llama_cpp.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
        "llama_threads": args.threads or "default",
        "note": args.note,
        "stack": str(args.stack) if args.stack else "demo: embedded base (Q4_1) + 4 random r=16 LoRAs",
    }


def demo_directory(args: argparse.Namespace) -> tuple[Path, Any]:
    """--stack, else the demo stack: built in --demo-dir (and reused from there), else in a temporary directory."""
    if args.stack is not None:
        return args.stack, None
    if args.demo_dir is not None:
        if not (args.demo_dir / "stack" / "gguf" / "manifest.json").is_file():
            args.demo_dir.mkdir(parents=True, exist_ok=True)
            build_demo_stack(args.demo_dir)
        return args.demo_dir / "stack", None
    tmp = tempfile.TemporaryDirectory()
    return build_demo_stack(Path(tmp.name)), tmp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stack", type=Path, help="An exported stack directory (default: build a demo stack).")
    ap.add_argument("--queries", type=int, default=2, help="How many instructions (at most 4).")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--memory", action="store_true", help="Also measure RSS of the two llama.cpp layouts.")
    ap.add_argument("--profile", metavar="STAGE", help="Only profile this stage on llama.cpp (see above).")
    ap.add_argument("--repeats", type=int, default=3, help="--profile: passes over the prompts.")
    ap.add_argument("--no-torch", action="store_true", help="Skip PyTorch (prompts from a llama.cpp run).")
    ap.add_argument(
        "--torch-bf16",
        action="store_true",
        help="Add a PyTorch row in bf16 autocast (native on AMX/AVX-512-BF16 only).",
    )
    ap.add_argument("--threads", type=int, help="llama.cpp threads (default: fslm's, all cores up to 4).")
    ap.add_argument("--demo-dir", type=Path, help="Build the demo stack here once and reuse it (default: a temp dir).")
    ap.add_argument(
        "--note", default="measured under contention (other jobs on the machine)", help="Saved with the figures."
    )
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--_memory-child", dest="memory_child", choices=["hot-swap", "per-stage"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        memory_child(args.stack, args.memory_child)
        return
    console = Console()
    directory, tmp = demo_directory(args)
    if args.profile:
        if args.out == DEFAULT_OUT:
            args.out = DEFAULT_OUT.with_name("decode_profile.json")
        profile_main(args, directory, console)
        return
    config = load_config(directory)
    for s in config.stages:  # same cap for every backend; greedy, as the recipe says
        s.generation.max_new_tokens = args.max_new_tokens
    names = config.stage_names

    instructions = INSTRUCTIONS[: args.queries]
    llama = LlamaCppBackend.from_settings(config.base, directory, **llama_options(args))
    llama_stack = Stack(config, llama, directory)
    results: dict[str, Any] = {}
    # the prompts every backend decodes: the PyTorch stack's own (with --no-torch: the llama.cpp stack's)
    if args.no_torch:
        prompts = [[r.prompt for r in llama_stack.run(text).stages] for text in instructions]
    else:
        torch_stack = Stack(config, Stack.load(directory, backend="torch").backend, directory)
        prompts = [[r.prompt for r in torch_stack.run(text).stages] for text in instructions]
        results["torch"] = summarise(timed_stage_runs(torch_stack.backend, prompts, config.stages, True), names)
        if args.torch_bf16:
            results["bf16_native"] = torch_stack.backend.set_precision("auto") == "bf16"
            torch_stack.backend.set_precision("bf16", "decode_speed --torch-bf16")
            rows = timed_stage_runs(torch_stack.backend, prompts, config.stages, True)
            results["torch_bf16"] = summarise(rows, names)
    lora_rows = timed_stage_runs(llama, prompts, config.stages, True)
    results["llamacpp"] = summarise(lora_rows, names)
    base_rows = timed_stage_runs(llama, prompts, config.stages, False)
    results["llamacpp_base"] = summarise(base_rows, names)
    results["llamacpp_batched"] = summarise(batched_stage_runs(llama_stack.backend, prompts, config.stages), names)
    for key, rows, lora in (("plain_llamacpp", lora_rows, True), ("plain_llamacpp_base", base_rows, False)):
        counts = [[r["tokens"] for r in row] for row in rows]
        plain = plain_llama_runs(directory, llama, prompts, config.stages, counts, lora, args.threads)
        results[key] = summarise(plain, names)

    labels = {
        "torch": "PyTorch + LoRA",
        "torch_bf16": "PyTorch + LoRA, bf16 autocast",
        "llamacpp": "fslm llama.cpp + LoRA",
        "plain_llamacpp": "plain llama-cpp-python + LoRA",
        "llamacpp_batched": f"fslm llama.cpp + LoRA, {len(prompts)} queries batched",
        "llamacpp_base": "fslm llama.cpp, bare base",
        "plain_llamacpp_base": "plain llama-cpp-python, bare base",
    }
    table = Table("tok/s (prompt processing included)", *names, "whole query", "x PyTorch", "x plain (same adapters)")
    for key, label in labels.items():
        if key not in results:
            continue
        r = results[key]
        plain = results["plain_llamacpp_base" if "base" in key else "plain_llamacpp"]["query"]["tok_s"]
        q = r["query"]["tok_s"]
        cells = [f"{r['stages'][n]['tok_s']:.1f}" for n in names]
        torch_ratio = f"{q / results['torch']['query']['tok_s']:.2f}x" if "torch" in results else "-"
        table.add_row(label, *cells, f"{q:.1f}", torch_ratio, f"{q / plain:.2f}x" if "torch" not in key else "-")
    console.print(table)

    report: dict[str, Any] = {"results": results, "queries": instructions, "max_new_tokens": args.max_new_tokens}
    report["llamacpp_stats"] = llama.stats
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
    report["env"] = environment(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"wrote {args.out}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
