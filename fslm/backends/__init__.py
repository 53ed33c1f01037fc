"""Backends generate text for a stage; the Stack decides what to generate. One small interface for all of them.

- `torch`: transformers + PEFT, one base model in memory, LoRA adapters switched per stage.
- `llamacpp`: llama-cpp-python over the GGUF files written by `fslm export`.
- `openai`: any OpenAI-compatible server (vLLM with --enable-lora, llama.cpp server, Ollama).

Every backend is a `Backend`: it renders prompts with the base model's Hugging Face tokenizer, so a stage sees the
same prompt text whichever backend runs it (and training sees it too), and it declares what it can do
(`capabilities`: generate, score, train) so steps ask instead of reaching into attributes.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fslm.config import GenerationSettings
from fslm.errors import FslmError
from fslm.prompts import uses_chat_template, wrap_prompt

log = logging.getLogger("fslm")


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    output_tokens: int


TextCallback = Callable[[int, str], None]

# What a backend can do; steps ask (`backend.require(SCORE, "eval scoring")`) instead of probing attributes.
GENERATE = "generate"  # text for a batch of prompts, with a stage adapter or the bare base
SCORE = "score"  # log-probabilities of given continuation tokens (eval's loglikelihood)
TRAIN = "train"  # hand the in-memory model to a trainer and take the adapters back afterwards


class Backend(ABC):
    """Where stages run. Prompts are rendered and counted with the base model's Hugging Face tokenizer here, for
    every backend, so a stage sees the same prompt text on torch, llama.cpp or a server, and training sees it too."""

    name: str = "backend"
    capabilities: frozenset[str] = frozenset({GENERATE})
    tokenizer: Any
    prompt_format: str = "auto"
    adapters: dict[str, Path]  # adapter name (a stage or baseline) -> where it came from

    # --- capabilities ---------------------------------------------------------------------------------

    def can(self, capability: str) -> bool:
        return capability in self.capabilities

    def require(self, capability: str, purpose: str) -> None:
        """Refuse, in one line, a step this backend cannot serve."""
        if not self.can(capability):
            able = [n for n, c in BACKEND_CAPABILITIES.items() if capability in c]
            raise FslmError(
                f"{purpose} needs a backend that can {capability} ({', '.join(able)}); this stack runs on {self.name}"
            )

    # --- prompts and tokens ---------------------------------------------------------------------------

    @property
    @abstractmethod
    def context_length(self) -> int: ...

    @property
    def chat(self) -> bool:
        return uses_chat_template(self.tokenizer, self.prompt_format)

    def format_prompt(self, system: str, user: str) -> str:
        """The full prompt text for a (role, user message) pair, ending where the stage's output begins."""
        return wrap_prompt(self.tokenizer, system, user, self.prompt_format)

    def encode(self, text: str) -> list[int]:
        """Token ids of a whole prompt: special tokens are added only when no chat template wrote them."""
        return list(self.tokenizer(text, add_special_tokens=not self.chat)["input_ids"])

    def count_tokens(self, text: str) -> int:
        return len(self.encode(text))

    # --- adapters -------------------------------------------------------------------------------------

    @abstractmethod
    def add_adapter(self, name: str, path: Path) -> None:
        """Make a LoRA adapter available under `name` (a stage or baseline name)."""

    def has_adapter(self, name: str) -> bool:
        return name in self.adapters

    # --- work -------------------------------------------------------------------------------------------

    @abstractmethod
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

    def score(
        self, requests: Sequence[tuple[list[int], list[int]]], adapter: str | None, batch_size: int = 8
    ) -> list[tuple[float, bool]]:
        """For each (context ids, continuation ids): the summed log-probability of the continuation and whether
        greedy decoding would produce it."""
        self.require(SCORE, "scoring continuations")
        raise NotImplementedError

    def set_precision(self, precision: str, purpose: str = "") -> str:
        """Choose the compute precision (auto/bf16/fp32) where the backend has a choice; this one has none: its
        weights' format (a GGUF's, a server's) decides."""
        if precision == "bf16":
            raise FslmError(f"--precision bf16 applies to the torch backend; this stack runs on {self.name}")
        return "native"

    def close(self) -> None:  # noqa: B027 - optional hook: most backends hold nothing native
        """Free native resources now (idempotent); the default holds none."""


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


BACKEND_CAPABILITIES = {
    "torch": frozenset({GENERATE, SCORE, TRAIN}),
    "llamacpp": frozenset({GENERATE, SCORE}),
    "openai": frozenset({GENERATE}),
}
