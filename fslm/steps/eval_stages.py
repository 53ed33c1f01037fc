"""Where `fslm eval` generates the stack's stages 1..N-1: the fast path (llama.cpp, an OpenAI-compatible server) or
PyTorch (`--stage-backend`). The final stage always scores answer choices on PyTorch (scoring needs the logits).

`auto` picks an OpenAI-compatible server when the manifest runs on one (`base.backend: openai`), else llama.cpp
when the base architecture exports to GGUF and llama-cpp-python is installed (the export is refreshed first when it
is missing or older than an adapter, as `fslm train --answer-inputs student` does), else PyTorch.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fslm.errors import FslmError
from fslm.stackdir import StackDir

log = logging.getLogger("fslm")
STAGE_BACKENDS = ("auto", "torch", "llamacpp", "openai")
# llama.cpp's context for stage generation: every stage prompt + its new tokens fits easily (a stage prompt is a few
# hundred tokens), and the model's own 8192 would hold a KV cache 2x bigger for nothing (docs/eval.md, memory).
LLAMACPP_CONTEXT = 4096


def resolve(stack_dir: StackDir, requested: str) -> str:
    """The backend `requested` (auto|torch|llamacpp|openai) means for this stack."""
    if requested not in STAGE_BACKENDS:
        raise FslmError(f"--stage-backend {requested!r}: choose one of {', '.join(STAGE_BACKENDS)}")
    if requested != "auto":
        return requested
    config = stack_dir.load()
    if config.base.backend == "openai":
        return "openai"
    from fslm.steps.student import choose_backend

    return choose_backend(stack_dir, "auto")


def export_is_current(stack_dir: StackDir) -> bool:
    """A GGUF export exists and holds exactly the stack's trained stage adapters, each from today's weights."""
    config = stack_dir.load()
    if stack_dir.export_problem(config) is not None:
        return False
    exported = json.loads(stack_dir.gguf_manifest.read_text(encoding="utf-8")).get("adapters", {})
    return set(exported) == set(stack_dir.trained_stages(config))


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


def load_stage_stack(stack_dir: StackDir, backend: str, scoring: Any = None) -> Any:
    """The Stack that generates stages 1..N-1 on `backend` (resolved). torch: `scoring` itself (one model in memory)."""
    from fslm.stack import Stack

    if backend == "torch":
        return scoring if scoring is not None else Stack.load(stack_dir.root, backend="torch")
    if backend == "llamacpp":
        from fslm.backends.llamacpp import LlamaCppBackend
        from fslm.steps.export import export

        if not export_is_current(stack_dir):
            log.info("exporting %s to GGUF for the llama.cpp stage backend", stack_dir.root)
            export(stack_dir.root)
        warning = quantised_base_warning(stack_dir)
        if warning:
            log.warning(warning)
        config = stack_dir.load()
        n_ctx = min(LLAMACPP_CONTEXT, _trained_context(stack_dir))
        llama = LlamaCppBackend.from_settings(config.base, stack_dir.root, n_ctx=n_ctx)
        return Stack(config, llama, stack_dir.root)
    return Stack.load(stack_dir.root, backend=backend)


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
    stack: Any,
    instructions: Sequence[str],
    adapters: Mapping[str, str | None],
    stages: int,
    update: Mapping[str, Any] | None = None,
) -> list[dict[str, str]]:
    """Stages 1..`stages` for many instructions at once (one `backend.generate` call per stage, all prompts in it).

    `update` overrides every stage's generation settings (max_new_tokens, temperature, seed). It is `Stack.run_batch`
    with settings overrides, which eval's sampled chains need.
    """
    outputs: list[dict[str, str]] = [{} for _ in instructions]
    for stage in stack.config.stages[:stages]:
        settings = stage.generation.model_copy(update=dict(update or {}))
        prompts = [stack.render_prompt(stage, text, None, out) for text, out in zip(instructions, outputs, strict=True)]
        if settings.temperature > 0 and settings.seed is not None:
            seed_native_sampler(stack.backend, settings.seed)
        completions = stack.backend.generate(prompts, adapters.get(stage.name), settings, label=stage.name)
        for out, c in zip(outputs, completions, strict=True):
            out[stage.name] = c.text
    return outputs


def seed_native_sampler(backend: Any, seed: int) -> None:
    """Seed llama-cpp-python's sampler for a sampled call.

    `GenerationSettings.seed` is the contract (the torch backend honours it); llama-cpp-python re-creates its sampler
    from the Llama object's seed on every `generate`, so without this every sampled chain of one question would
    draw the same text. Harmless where the backend seeds from the settings itself.
    """
    llm = getattr(backend, "llm", None)
    if llm is not None and hasattr(llm, "set_seed"):
        llm.set_seed(int(seed))


def stage_agreement(
    fast: Any,
    reference: Any,
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

    def chunked(stack: Any) -> list[dict[str, str]]:
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
