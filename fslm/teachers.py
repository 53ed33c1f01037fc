"""Teachers for `fslm distill`: the model that writes every stage's training target, on the same backends the
stages run on (PyTorch, llama.cpp) or on any OpenAI-compatible server.

A teacher turns (system, user) message pairs into text. `prompt_key` is the exact text the teacher conditions on
(the chat-formatted prompt for local models, the messages JSON for chat endpoints); together with `id` (which
model, which backend) and the generation settings it keys the distillation cache, so nothing is paid for twice.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import Field

from fslm import models
from fslm.backends import Backend
from fslm.backends.choose import create_backend
from fslm.backends.openai import OpenAIClient
from fslm.config import BaseModelSettings, GenerationSettings, ServerSettings
from fslm.errors import FslmError
from fslm.options import Options

TEACHER_BACKENDS = ("torch", "llamacpp", "openai")


class TeacherSpec(Options):
    """Which model teaches and how to reach it; everything a teacher connection needs, in one place."""

    backend: Literal["torch", "llamacpp", "openai"] | None = Field(
        None, description="torch, llamacpp or openai (default: openai with a server URL, else torch)."
    )
    model: str | None = Field(
        None,
        description="Teacher: alias, HF dir or .gguf (torch/llamacpp; default the stack's base) or served name.",
    )
    server: ServerSettings | None = None  # the OpenAI-compatible server (url, key variable, concurrency, ...)
    batch_size: int = Field(8, ge=1, description="Records per batched generate call (local teachers).")

    @property
    def resolved_backend(self) -> str:
        return self.backend or ("openai" if self.server is not None else "torch")


@dataclass
class TeacherOutput:
    text: str
    prompt_tokens: int
    output_tokens: int
    finished: bool  # False when generation stopped at max_new_tokens (the text is cut)


class Teacher(Protocol):
    id: str  # identifies the model and backend: part of every cache key
    batch_size: int  # requests handed to `generate` at once

    def describe(self) -> dict[str, Any]: ...

    def prompt_key(self, system: str, user: str) -> str:
        """The exact text the teacher conditions on for this message pair."""

    def generate(
        self,
        requests: list[tuple[str, str]],
        settings: GenerationSettings,
        on_result: OnResult | None = None,
        label: str = "teacher",
    ) -> list[TeacherOutput]:
        """Answers in request order; `on_result(i, output)` hears each one as soon as it exists. `label` names what is
        asked (a stage, or `joint`): prompts of one label share a prefix a local backend may keep evaluated."""

    def close(self) -> None:
        """Free the model now (idempotent): the process may go on to train or evaluate."""


OnResult = Callable[[int, "TeacherOutput"], None]


def _messages(system: str, user: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def model_fingerprint(ref: models.BaseRef) -> str:
    """A cheap identity for a model's weights: sizes plus hashes of each weight file's first and last MiB.

    Hashing whole files would cost seconds per run for nothing: a changed model changes its size or its ends.
    """
    h = hashlib.sha256()
    if ref.kind == "gguf":
        files = [Path(ref.location)]
    elif ref.kind == "dir":
        files = sorted(Path(ref.location).glob("*.safetensors")) + [Path(ref.location) / "config.json"]
    else:
        return f"hub:{ref.location}"
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}:{size}:".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            if size > 2 << 20:
                fh.seek(-(1 << 20), os.SEEK_END)
                h.update(fh.read())
    return h.hexdigest()[:16]


class BackendTeacher:
    """A local model on one of the stage backends (PyTorch or llama.cpp), prompted with its own chat template by
    the same code that renders stage prompts, batched."""

    def __init__(self, backend: Backend, ref: models.BaseRef, model: str, batch_size: int, describe: dict[str, Any]):
        self.backend = backend
        self.batch_size = batch_size
        suffix = f":{describe['dtype']}" if "dtype" in describe else ""
        self.id = f"{backend.name}:{ref.alias or Path(ref.location).name}:{model_fingerprint(ref)}{suffix}"
        self._describe = {"backend": backend.name, "model": model, "location": ref.location, **describe}

    def describe(self) -> dict[str, Any]:
        return {**self._describe, "id": self.id}

    def prompt_key(self, system: str, user: str) -> str:
        return self.backend.format_prompt(system, user)

    def close(self) -> None:
        self.backend.close()

    def generate(
        self,
        requests: list[tuple[str, str]],
        settings: GenerationSettings,
        on_result: OnResult | None = None,
        label: str = "teacher",
    ) -> list[TeacherOutput]:
        prompts = [self.prompt_key(s, u) for s, u in requests]
        done = self.backend.generate(prompts, None, settings, label=f"teacher:{label}")
        outs = [
            TeacherOutput(c.text, c.prompt_tokens, c.output_tokens, c.output_tokens < settings.max_new_tokens)
            for c in done
        ]
        for i, out in enumerate(outs):
            if on_result is not None:
                on_result(i, out)
        return outs


def torch_teacher(model: str, base: BaseModelSettings, stack_dir: str | Path | None, batch_size: int = 8):
    """The teacher on PyTorch, loaded like any stage base (`create_backend("torch")`)."""
    settings = base.model_copy(update={"model": model, "backend": "torch"})
    ref = models.resolve(model, stack_dir)
    backend = create_backend("torch", settings, stack_dir)
    return BackendTeacher(backend, ref, model, batch_size, {"dtype": settings.dtype})


def llamacpp_teacher(
    model: str, base: BaseModelSettings, stack_dir: str | Path | None, batch_size: int = 8, context: int = 4096
):
    """The teacher on llama.cpp: a .gguf file (or a GGUF alias), tokenised and prompted by its HF tokenizer."""
    ref = models.resolve(model, stack_dir)
    if ref.kind != "gguf":
        raise FslmError(f"{model}: the llamacpp teacher needs a .gguf file or a GGUF alias (got {ref.kind})")
    settings = base.model_copy(update={"model": model, "backend": "llamacpp"})
    backend = create_backend("llamacpp", settings, stack_dir, gguf=ref.location, n_ctx=context)
    return BackendTeacher(backend, ref, model, batch_size, {"n_ctx": context})


class OpenAITeacher:
    """Any OpenAI-compatible server's chat endpoint, `concurrency` requests in flight, retried with backoff."""

    def __init__(self, server: ServerSettings, model: str) -> None:
        self.client = OpenAIClient(server)
        self.model = model
        self.batch_size = max(1, 2 * server.concurrency)
        self.id = f"openai:{self.client.url}:{model}"
        self._describe = {
            "backend": "openai",
            "model": model,
            **server.model_dump(include={"url", "api_key_env", "concurrency", "timeout", "max_retries"}),
            "url": self.client.url,
        }

    def describe(self) -> dict[str, Any]:
        return {**self._describe, "id": self.id}

    def prompt_key(self, system: str, user: str) -> str:
        return json.dumps(_messages(system, user), ensure_ascii=False)

    def close(self) -> None:  # a server holds the model; nothing to free here
        pass

    def generate(
        self,
        requests: list[tuple[str, str]],
        settings: GenerationSettings,
        on_result: OnResult | None = None,
        label: str = "teacher",
    ) -> list[TeacherOutput]:
        def convert(g: Any) -> TeacherOutput:
            return TeacherOutput(g.text.strip(), g.prompt_tokens, g.output_tokens, g.finish_reason != "length")

        relay = (lambda i, g: on_result(i, convert(g))) if on_result is not None else None
        done = self.client.chat(self.model, [_messages(s, u) for s, u in requests], settings, relay)
        return [convert(g) for g in done]


def make_teacher(spec: TeacherSpec, base: BaseModelSettings, stack_dir: str | Path | None = None) -> Teacher:
    """Build the teacher a spec names; a local teacher's model defaults to the stack's base model."""
    backend = spec.resolved_backend
    if backend == "openai":
        if spec.server is None or not spec.model:
            raise FslmError("an OpenAI-compatible teacher needs --teacher-url and --teacher-model")
        return OpenAITeacher(spec.server, spec.model)
    model = spec.model or base.model
    if backend == "llamacpp":
        return llamacpp_teacher(model, base, stack_dir, spec.batch_size)
    return torch_teacher(model, base, stack_dir, spec.batch_size)
