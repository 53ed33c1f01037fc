"""Backends generate text for a stage; the Stack decides what to generate. One small interface for all of them.

- `torch`: transformers + PEFT, one base model in memory, LoRA adapters switched per stage.
- `llamacpp`: llama-cpp-python over the GGUF files written by `fslm export`.
- `openai`: any OpenAI-compatible server (vLLM with --enable-lora, llama.cpp server, Ollama).

Every backend renders prompts with the base model's Hugging Face tokenizer (`TokenizerPrompts`), so a stage sees
the same prompt text whichever backend runs it, and training sees it too.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from fslm.config import GenerationSettings
from fslm.errors import FslmError
from fslm.prompts import uses_chat_template, wrap_prompt

log = logging.getLogger("fslm")


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    output_tokens: int


class Backend(Protocol):
    name: str

    @property
    def context_length(self) -> int: ...

    def format_prompt(self, system: str, user: str) -> str:
        """The full prompt text for a (role, user message) pair, ending where the stage's output begins."""

    def count_tokens(self, text: str) -> int: ...

    def add_adapter(self, name: str, path: Path) -> None:
        """Make a LoRA adapter available under `name` (the stage name)."""

    def generate(
        self,
        prompts: list[str],
        adapter: str | None,
        settings: GenerationSettings,
        label: str = "",
        on_text: TextCallback | None = None,
    ) -> list[Completion]:
        """One batched generation with `adapter` active (None: the bare base model).

        on_text(row, delta) receives text as it is produced; a backend that cannot stream calls it once per
        row with the whole text. Deltas concatenate to the row's final text before stop-string cutting.
        """


TextCallback = Callable[[int, str], None]


class TokenizerPrompts:
    """Prompt rendering and token counting with the base model's HF tokenizer, shared by every backend."""

    tokenizer: Any
    prompt_format: str = "auto"

    @property
    def chat(self) -> bool:
        return uses_chat_template(self.tokenizer, self.prompt_format)

    def format_prompt(self, system: str, user: str) -> str:
        return wrap_prompt(self.tokenizer, system, user, self.prompt_format)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=not self.chat)["input_ids"])


def fit_to_context(prompt_lengths: list[int], max_new_tokens: int, context: int, label: str) -> int:
    """Our context policy: refuse a prompt that leaves no room to answer; shrink max_new_tokens to fit.

    We refuse rather than left-truncate because cutting the start of a stage prompt silently drops the
    instruction or the chat header, which yields confident nonsense.
    """
    longest = max(prompt_lengths)
    if longest >= context:
        raise FslmError(
            f"stage {label!r}: the prompt is {longest} tokens but the model's context is {context} tokens; "
            "shorten the instruction/input or lower earlier stages' max_new_tokens"
        )
    if longest + max_new_tokens > context:
        fitted = context - longest
        log.warning("stage %r: max_new_tokens lowered from %d to %d to fit the context", label, max_new_tokens, fitted)
        return fitted
    return max_new_tokens


def cut_at_stop(text: str, stop: list[str]) -> str:
    cut = min((i for s in stop if (i := text.find(s)) >= 0), default=len(text))
    return text[:cut]


BACKENDS = {
    "torch": "fslm.backends.pytorch:TorchBackend",
    "openai": "fslm.backends.openai:OpenAIBackend",
    "llamacpp": "fslm.backends.llamacpp:LlamaCppBackend",
}


def create_backend(name: str, settings: Any, stack_dir: Path | str | None = None) -> Backend:
    """Instantiate a backend by name; each backend class has `from_settings(settings, stack_dir)`."""
    import importlib

    if name not in BACKENDS:
        raise FslmError(f"unknown backend {name!r} (available: {', '.join(BACKENDS)})")
    module, cls = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls).from_settings(settings, stack_dir)
