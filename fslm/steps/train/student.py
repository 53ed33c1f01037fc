"""The student's own earlier-stage outputs for training records: what the final stage really reads at run time.

Training the final stage on the teacher's earlier-stage text teaches it to read text the stack never produces
(exposure bias); with `--answer-inputs student` it trains on what the trained stages 1..N-1 write for each training
record instead. Generation is greedy with each stage's manifest settings, batched, on the llama.cpp fast path when
the stack's architecture exports (the upstream adapters are exported first), else on PyTorch. Outputs are cached
content-addressed (upstream adapter weights, stage settings, backend, instruction), so a rerun or a resumed training
pays nothing twice and a retrained upstream stage is never served stale text.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Any

from fslm import heap
from fslm.backends.choose import choose_backend
from fslm.distilled import DistilledRecord
from fslm.events import EventHandler, Progress, emit
from fslm.files import JsonlLog, sha256_file
from fslm.stack import Stack
from fslm.stackdir import StackDir
from fslm.steps.export import refresh

log = logging.getLogger("fslm")
BATCH = 16


def upstream_key(stack_dir: StackDir, config: Any, backend: str) -> dict[str, Any]:
    """What the upstream outputs depend on, besides the instruction: adapters, prompts, decoding, backend."""
    stages = config.stages[:-1]
    return {
        "backend": backend,
        "stages": [
            {
                "name": s.name,
                "adapter": sha256_file(stack_dir.weights(s.name)) if stack_dir.is_trained(s.name) else None,
                **s.model_dump(mode="json", include={"role", "template", "reads", "generation"}),
            }
            for s in stages
        ],
    }


def _key(upstream: dict[str, Any], record: DistilledRecord) -> str:
    blob = json.dumps({"upstream": upstream, "instruction": record.instruction, "input": record.input}, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def student_outputs(
    stack_dir: StackDir,
    records: list[DistilledRecord],
    backend: str = "auto",
    loaded: Any = None,
    on_event: EventHandler | None = None,
) -> tuple[dict[str, dict[str, str]], dict[str, Any]]:
    """Record id -> earlier stage -> the trained stack's own output, and a summary (backend, cache hits, seconds).

    `loaded`: a Stack of this directory on torch with the upstream adapters attached, used when the backend is torch
    (so training does not load the base twice)."""
    config = stack_dir.load()
    # Local: the adapters just trained are here, not on the manifest's server; llama.cpp on a refreshed export.
    backend = choose_backend(stack_dir, backend, refresh=True, local=True)
    upstream = upstream_key(stack_dir, config, backend)
    cache = JsonlLog(stack_dir.student_cache).open()
    known = {r["key"]: r["outputs"] for r in cache.rows if "key" in r}
    keys = {r.id: _key(upstream, r) for r in records}
    todo = [r for r in records if keys[r.id] not in known]
    start = time.perf_counter()
    stack = None
    try:
        if todo:
            if backend == "llamacpp":
                refresh(stack_dir.root)  # adapters of the trained upstream stages; the base is linked or reused
                stack = Stack.load(stack_dir.root, backend="llamacpp")
            else:
                stack = loaded if loaded is not None else Stack.load(stack_dir.root, backend="torch")
            n = len(config.stages) - 1
            adapters = {s.name: (s.name if stack_dir.is_trained(s.name) else None) for s in config.stages[:-1]}
            emit(on_event, Progress("train", "student's earlier stages", 0, len(todo)))
            for i in range(0, len(todo), BATCH):
                chunk = todo[i : i + BATCH]
                traces = stack.run_batch([(r.instruction, r.input) for r in chunk], stages=n, adapters=adapters)
                rows = [{"key": keys[r.id], "outputs": t.outputs} for r, t in zip(chunk, traces, strict=True)]
                cache.append(rows)
                known.update((row["key"], row["outputs"]) for row in rows)
                emit(on_event, Progress("train", "student's earlier stages", i + len(chunk), len(todo)))
    finally:
        cache.close()
        if stack is not None and stack is not loaded:
            stack.backend.close()
        heap.release()  # generation's buffers, before the final stage trains
    summary = {
        "backend": backend,
        "records": len(records),
        "generated": len(todo),
        "cached": len(records) - len(todo),
        "seconds": round(time.perf_counter() - start, 2),
    }
    return {r.id: known[keys[r.id]] for r in records}, summary
