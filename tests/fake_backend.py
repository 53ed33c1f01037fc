"""A fake, instant backend and a stack over it: for server tests that need thousands of requests, not a model."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fslm.backends import Backend, Completion, cut_at_stop
from fslm.config import GenerationSettings, LoraSettings, StackConfig, StageConfig
from fslm.recipes import load_recipe
from fslm.stack import Stack
from fslm.web.app import create_app
from fslm.web.options import ServeOptions


class FakeBackend(Backend):
    """Answers `<stage> answer <n> STOP tail` at once; records every call; can be held, slowed or made to fail."""

    name = "fake"

    @property
    def context_length(self) -> int:
        return 1 << 20

    def __init__(self) -> None:
        self.adapters: dict[str, Path] = {}
        self.calls: list[tuple[str, int, GenerationSettings]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.fail: Exception | None = None

    def format_prompt(self, system: str, user: str) -> str:
        return f"{system}\n{user}\n"

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def add_adapter(self, name: str, path: Path) -> None:
        self.adapters[name] = path

    def generate(
        self,
        prompts: list[str],
        adapter: str | None,
        settings: GenerationSettings,
        label: str = "",
        on_text: Any = None,
    ) -> list[Completion]:
        self.calls.append((label, len(prompts), settings))
        self.entered.set()
        assert self.gate.wait(30), "the test never opened the gate"
        if self.fail is not None:
            raise self.fail
        out = []
        for row, prompt in enumerate(prompts):
            raw = f"{label} answer {len(prompt)} STOP tail"
            if on_text is not None:
                for word in raw.split(" "):
                    on_text(row, word + " ")
            text = cut_at_stop(raw + " ", settings.stop).strip()
            out.append(Completion(text, self.count_tokens(prompt), len(text.split())))
        return out


def fake_stack() -> Stack:
    """The paper4 recipe's four stages over FakeBackend (no directory, no model)."""
    recipe = load_recipe("paper4")
    config = StackConfig(
        name="fake",
        lora=LoraSettings(target_modules=["q_proj"]),
        stages=[StageConfig(**s) for s in recipe["stages"]],
    )
    return Stack(config, FakeBackend())


@contextmanager
def running(stack: Stack, options: ServeOptions | None = None) -> Iterator[str]:
    """uvicorn serving the stack's app in a thread on a loopback port it binds itself; yields the base URL."""
    from conftest import uvicorn_thread

    with uvicorn_thread(create_app(stack, options), log_level="error") as url:
        yield url
