"""Load test of `fslm serve`: N concurrent clients (default 1, 4, 16) on loopback, a bounded number of requests each.

Starts the server in-process (uvicorn on 127.0.0.1, a free port) over a stack directory (`--stack`) or a fresh paper4
stack over `--base` (alias, HF dir or .gguf), then for each concurrency level sends `--requests` chat completions
spread over the clients with the real `openai` client. Prints requests/s, tokens/s (completion tokens of all stages),
p50/p99 latency, the mean batch size the scheduler formed, and the speed-up over 1 client; writes JSON to --out.
`--backend llamacpp` serves the llama.cpp fast path (a fresh stack is exported first), as `fslm serve` does for an
exported stack; `--backend torch` serves PyTorch; the default is the stack's own choice (`Stack.load`).

    python benchmarks/serve_load.py --base smollm2-135m-instruct --max-tokens 8 --requests 32 --backend llamacpp
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import version
from pathlib import Path

QUESTIONS = [
    "Give three tips for staying healthy.",
    "What is the capital of France?",
    "Explain why the sky is blue.",
    "Name a primary colour.",
    "What is 12 times 7?",
    "Write a haiku about rain.",
    "Why do cats purr?",
    "How does a bicycle stay upright?",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def level(base_url: str, model: str, clients: int, requests: int, max_tokens: int) -> dict:
    import openai

    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600)

    def one(i: int) -> tuple[float, int]:
        start = time.perf_counter()
        r = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}], max_tokens=max_tokens
        )
        return time.perf_counter() - start, r.usage.completion_tokens

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - start
    latencies = [lat for lat, _ in results]
    tokens = sum(n for _, n in results)
    return {
        "clients": clients,
        "requests": requests,
        "seconds": round(wall, 3),
        "requests_per_s": round(requests / wall, 3),
        "tokens_per_s": round(tokens / wall, 2),
        "p50_s": round(statistics.median(latencies), 3),
        "p99_s": round(percentile(latencies, 0.99), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stack", type=Path, help="stack directory (default: a fresh paper4 stack over --base)")
    parser.add_argument("--base", default="smollm2-135m-instruct", help="base model for the fresh stack")
    parser.add_argument("--clients", default="1,4,16", help="comma-separated concurrency levels")
    parser.add_argument("--requests", type=int, default=32, help="requests per level")
    parser.add_argument("--max-tokens", type=int, default=8, help="max_tokens per request (caps every stage)")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--backend", choices=["torch", "llamacpp"], help="default: the stack's base.backend")
    parser.add_argument("--threads", type=int, help="llama.cpp threads (default: fslm's, all cores up to 4)")
    parser.add_argument("--note", default="measured under contention (shared CPU)", help="saved with the figures")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "serve_load.json")
    args = parser.parse_args()

    import torch
    import uvicorn

    from fslm.stack import Stack
    from fslm.steps.init import InitOptions, init
    from fslm.web.app import create_app
    from fslm.web.options import ServeOptions

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        directory = args.stack
        if directory is None:
            directory = Path(tmp) / "stack"
            init(directory, InitOptions(base=args.base))
            if args.backend == "llamacpp":
                from fslm.steps.export import export_gguf

                export_gguf(directory)
        if args.backend == "llamacpp" and args.threads:
            from fslm.backends.llamacpp import LlamaCppBackend
            from fslm.config import load_config

            config = load_config(directory)
            backend = LlamaCppBackend.from_settings(config.base, directory, n_threads=args.threads)
            stack = Stack(config, backend, directory)
        else:
            stack = Stack.load(directory, backend=args.backend)
        levels = [int(c) for c in args.clients.split(",")]
        opts = ServeOptions(max_queue=max(64, max(levels)), max_batch=args.max_batch, timeout=3600)
        app = create_app(stack, opts)
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.05)
        base_url = f"http://127.0.0.1:{port}/v1"
        scheduler = app.state.scheduler
        try:
            level(base_url, stack.config.name, 1, 1, args.max_tokens)  # warm-up
            rows = []
            for clients in levels:
                scheduler.batches = []
                row = level(base_url, stack.config.name, clients, args.requests, args.max_tokens)
                sizes = [n for _, n, _ in scheduler.batches]
                row["mean_batch"] = round(sum(sizes) / max(1, len(sizes)), 2)
                row["mean_step_s"] = round(sum(t for *_, t in scheduler.batches) / max(1, len(sizes)), 3)
                rows.append(row)
        finally:
            server.should_exit = True
            thread.join(10)

    one = rows[0]["requests_per_s"] if rows and rows[0]["clients"] == 1 else None
    print(f"backend {stack.backend.name}, load average {os.getloadavg()[0]:.1f}")
    print(
        f"{'clients':>7} {'requests':>8} {'req/s':>8} {'tok/s':>8} {'p50 s':>7} {'p99 s':>7} {'batch':>6} "
        f"{'step s':>6} {'speedup':>7}"
    )
    for r in rows:
        r["speedup_vs_1"] = round(r["requests_per_s"] / one, 2) if one else None
        print(
            f"{r['clients']:>7} {r['requests']:>8} {r['requests_per_s']:>8.2f} {r['tokens_per_s']:>8.1f} "
            f"{r['p50_s']:>7.2f} {r['p99_s']:>7.2f} {r['mean_batch']:>6.1f} {r['mean_step_s']:>6.2f} {r['speedup_vs_1'] or 0:>6.2f}x"
        )
    report = {
        "benchmark": "serve_load",
        "base": stack.config.base.model,
        "stages": stack.config.stage_names,
        "max_tokens": args.max_tokens,
        "requests_per_level": args.requests,
        "seed": 0,
        "backend": stack.backend.name,
        "llama_threads": args.threads or "default",
        "load_average_after": os.getloadavg(),
        "torch_threads": torch.get_num_threads(),
        "versions": {
            p: version(p) for p in ("torch", "transformers", "peft", "fastapi", "uvicorn", "openai", "llama_cpp_python")
        },
        "python": platform.python_version(),
        "machine": platform.machine(),
        "note": args.note,
        "levels": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
