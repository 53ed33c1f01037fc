"""Where `fslm eval` generates the stack's stages 1..N-1: the fast path (llama.cpp, an OpenAI-compatible server) or
PyTorch (`--stage-backend`). The final stage always scores answer choices on PyTorch (scoring needs the logits).

`auto` is the rule of fslm.backends.choose, with the export refreshed first when it is missing or older than an
adapter (as `fslm train --answer-inputs student` does).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fslm.backends.choose import choose_backend
from fslm.stack import Stack
from fslm.stackdir import StackDir
from fslm.steps.export import refresh

log = logging.getLogger("fslm")
# llama.cpp's context for stage generation: every stage prompt + its new tokens fits easily (a stage prompt is a few
# hundred tokens), and the model's own 8192 would hold a KV cache 2x bigger for nothing (docs/eval.md, memory).
LLAMACPP_CONTEXT = 4096


def resolve(stack_dir: StackDir, requested: str) -> str:
    """The backend `requested` (auto|torch|llamacpp|openai) means for this stack's stages 1..N-1."""
    return choose_backend(stack_dir, requested, refresh=True)


def quantised_base_warning(stack_dir: StackDir) -> str | None:
    """A warning when the export's base is quantised (an export made before f16 became the default, or `--quant`):
    its greedy stage text then rarely equals PyTorch's, so eval's stack row would measure another system."""
    info = json.loads(stack_dir.gguf_manifest.read_text(encoding="utf-8")).get("base", {})
    quant = info.get("quant", "unknown")
    if quant in ("f16", "f32", "bf16"):
        return None
    return (
        f"{stack_dir.gguf_manifest}: the exported base is {quant}, so stages on llama.cpp write different text than "
        f"the stack does on PyTorch (a Q4_1 base: 0 % of greedy chains equal, docs/export.md); "
        f"`fslm export {stack_dir.root}` rewrites it as f16"
    )


def load_stage_stack(stack_dir: StackDir, backend: str, scoring: Stack | None = None) -> Stack:
    """The Stack that generates stages 1..N-1 on `backend` (a name `resolve` gave). torch: `scoring` itself (one
    model in memory); llama.cpp: on an export refreshed first, with a KV cache of LLAMACPP_CONTEXT cells at most."""
    if backend == "torch" and scoring is not None:
        return scoring
    options: dict[str, Any] = {}
    if backend == "llamacpp":
        refresh(stack_dir.root)
        warning = quantised_base_warning(stack_dir)
        if warning:
            log.warning(warning)
        options["n_ctx"] = min(LLAMACPP_CONTEXT, _trained_context(stack_dir))
    return Stack.load(stack_dir.root, backend=backend, **options)


def _trained_context(stack_dir: StackDir) -> int:
    """The exported base's training context (GGUF metadata); a larger llama.cpp context would run past it."""
    import gguf

    try:
        manifest = json.loads(stack_dir.gguf_manifest.read_text(encoding="utf-8"))
        fields = gguf.GGUFReader(stack_dir.gguf / manifest["base"]["file"]).fields
        arch = fields["general.architecture"].contents()
        return int(fields[f"{arch}.context_length"].contents())
    except (OSError, ValueError, KeyError, TypeError):
        return LLAMACPP_CONTEXT


def run_stages(
    stack: Stack,
    instructions: Sequence[str],
    adapters: Mapping[str, str | None],
    stages: int,
    update: Mapping[str, Any] | None = None,
    given: Sequence[Mapping[str, str]] | None = None,
) -> list[dict[str, str]]:
    """Stages 1..`stages` for many instructions at once (one `run_stage` per stage), each stage's generation
    settings overridden by `update` (max_new_tokens, temperature, seed: eval's sampled chains); `given`: the first
    stages' texts, already written (Stack.run_batch)."""
    traces = stack.run_batch(instructions, adapters=adapters, stages=stages, overrides=update, given=given)
    return [t.outputs for t in traces]


def stage_agreement(
    fast: Stack,
    reference: Stack,
    instructions: Sequence[str],
    adapters: Mapping[str, str | None],
    stages: int,
    update: Mapping[str, Any] | None = None,
    fast_outputs: Sequence[Mapping[str, str]] | None = None,
    batch: int = 8,
) -> dict[str, Any]:
    """How often the fast path's greedy stage text equals PyTorch's, stage by stage and for whole chains.

    Each backend runs its own chain (stage 2 reads that backend's stage 1), because that is what the final stage
    reads in each case; a stage whose input already differs counts as a disagreement of its own. `fast_outputs`:
    the fast path's chains already generated for `instructions` (eval's cache), else they are generated here.
    PyTorch runs `batch` questions at a time (its KV cache grows with the batch)."""

    def chunked(stack: Stack) -> list[dict[str, str]]:
        out: list[dict[str, str]] = []
        for i in range(0, len(instructions), batch):
            out += run_stages(stack, instructions[i : i + batch], adapters, stages, update)
        return out

    got = list(fast_outputs) if fast_outputs is not None else chunked(fast)
    want = chunked(reference)
    names = [s.name for s in reference.config.stages[:stages]]
    per_stage = {n: sum(g[n] == w[n] for g, w in zip(got, want, strict=True)) / len(want) for n in names}
    chains = sum(all(g[n] == w[n] for n in names) for g, w in zip(got, want, strict=True)) / len(want)
    return {
        "questions": len(want),
        "fast_backend": fast.backend.name,
        "reference_backend": reference.backend.name,
        "stage_text_equal": {n: round(v, 4) for n, v in per_stage.items()},
        "chain_text_equal": round(chains, 4),
    }
