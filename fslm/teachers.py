"""Teachers for `fslm distill`: one small interface over a local PyTorch model, a llama.cpp GGUF model and any
OpenAI-compatible server.

A teacher turns (system, user) message pairs into text. `prompt_key` is the exact text the teacher conditions on
(the chat-formatted prompt for local models, the messages JSON for chat endpoints); together with `id` (which
model, which backend) and the generation settings it keys the distillation cache, so nothing is paid for twice.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from fslm import models
from fslm.config import BaseModelSettings, GenerationSettings
from fslm.errors import FslmError

TEACHER_BACKENDS = ("torch", "llamacpp", "openai")


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

    def generate(self, requests: list[tuple[str, str]], settings: GenerationSettings) -> list[TeacherOutput]: ...


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


class TorchTeacher:
    """A local model on PyTorch, loaded through the spine (`create_backend("torch")`), batched."""

    def __init__(self, model: str, settings: BaseModelSettings, stack_dir: str | Path | None, batch_size: int = 8):
        from fslm.backends import create_backend

        settings = settings.model_copy(update={"model": model, "backend": "torch"})
        self.ref = models.resolve(model, stack_dir)
        self.backend = create_backend("torch", settings, stack_dir)
        self.batch_size = batch_size
        self.id = (
            f"torch:{self.ref.alias or Path(self.ref.location).name}:{model_fingerprint(self.ref)}:{settings.dtype}"
        )
        self._describe = {"backend": "torch", "model": model, "location": self.ref.location, "dtype": settings.dtype}

    def describe(self) -> dict[str, Any]:
        return {**self._describe, "id": self.id}

    def prompt_key(self, system: str, user: str) -> str:
        return self.backend.format_prompt(system, user)

    def generate(self, requests: list[tuple[str, str]], settings: GenerationSettings) -> list[TeacherOutput]:
        prompts = [self.prompt_key(s, u) for s, u in requests]
        done = self.backend.generate(prompts, None, settings, label="teacher")
        return [
            TeacherOutput(c.text, c.prompt_tokens, c.output_tokens, c.output_tokens < settings.max_new_tokens)
            for c in done
        ]


class LlamaCppTeacher:
    """A GGUF chat model through llama-cpp-python's `create_chat_completion` (the GGUF's own chat template).

    One request at a time: llama-cpp-python decodes one sequence per call, and is still several times faster than
    PyTorch on a CPU for small models.
    """

    def __init__(self, model: str, stack_dir: str | Path | None, context: int = 4096, threads: int | None = None):
        try:
            from llama_cpp import Llama

            from fslm.backends.llamacpp import avoid_amx, default_threads
        except ImportError:
            raise FslmError("the llamacpp teacher needs llama-cpp-python: pip install llama-cpp-python") from None
        self.ref = models.resolve(model, stack_dir)
        if self.ref.kind != "gguf":
            raise FslmError(f"{model}: the llamacpp teacher needs a .gguf file or a GGUF alias (got {self.ref.kind})")
        avoid_amx()
        threads = threads or default_threads()  # a teacher run is the only job: use the cores
        self.llm = Llama(model_path=self.ref.location, n_ctx=context, n_threads=threads, seed=0, verbose=False)
        self.batch_size = 1
        self.id = f"llamacpp:{self.ref.alias or Path(self.ref.location).name}:{model_fingerprint(self.ref)}"
        self._describe = {"backend": "llamacpp", "model": model, "location": self.ref.location, "n_ctx": context}

    def describe(self) -> dict[str, Any]:
        return {**self._describe, "id": self.id}

    def prompt_key(self, system: str, user: str) -> str:
        return json.dumps(_messages(system, user), ensure_ascii=False)

    def generate(self, requests: list[tuple[str, str]], settings: GenerationSettings) -> list[TeacherOutput]:
        outs = []
        for system, user in requests:
            resp = self.llm.create_chat_completion(
                messages=_messages(system, user),
                max_tokens=settings.max_new_tokens,
                temperature=settings.temperature,
                top_p=settings.top_p,
                repeat_penalty=settings.repetition_penalty,
                stop=settings.stop or None,
                seed=0,
            )
            choice = resp["choices"][0]
            usage = resp.get("usage") or {}
            outs.append(
                TeacherOutput(
                    (choice["message"].get("content") or "").strip(),
                    int(usage.get("prompt_tokens", 0)),
                    int(usage.get("completion_tokens", 0)),
                    choice.get("finish_reason") != "length",
                )
            )
        return outs


class OpenAITeacher:
    """Any OpenAI-compatible server's chat endpoint, `concurrency` requests in flight, retried with backoff."""

    def __init__(
        self,
        url: str,
        model: str,
        api_key_env: str = "FSLM_API_KEY",
        concurrency: int = 4,
        timeout: float = 120.0,
        max_retries: int = 5,
    ) -> None:
        from fslm.backends.openai import OpenAIClient

        self.client = OpenAIClient(url, api_key_env, concurrency, timeout, max_retries)
        self.model = model
        self.batch_size = max(1, 2 * concurrency)
        self.id = f"openai:{self.client.url}:{model}"
        self._describe = {
            "backend": "openai",
            "url": self.client.url,
            "model": model,
            "api_key_env": api_key_env,
            "concurrency": concurrency,
            "timeout": timeout,
            "max_retries": max_retries,
        }

    def describe(self) -> dict[str, Any]:
        return {**self._describe, "id": self.id}

    def prompt_key(self, system: str, user: str) -> str:
        return json.dumps(_messages(system, user), ensure_ascii=False)

    def generate(self, requests: list[tuple[str, str]], settings: GenerationSettings) -> list[TeacherOutput]:
        done = self.client.chat(self.model, [_messages(s, u) for s, u in requests], settings)
        return [
            TeacherOutput(g.text.strip(), g.prompt_tokens, g.output_tokens, g.finish_reason != "length") for g in done
        ]


def make_teacher(
    backend: str,
    *,
    model: str | None = None,
    url: str | None = None,
    base: BaseModelSettings,
    stack_dir: str | Path | None = None,
    batch_size: int = 8,
    api_key_env: str = "FSLM_API_KEY",
    concurrency: int = 4,
    timeout: float = 120.0,
    max_retries: int = 5,
) -> Teacher:
    """Build a teacher; `model` defaults to the stack's base model (local backends)."""
    if backend not in TEACHER_BACKENDS:
        raise FslmError(f"unknown teacher backend {backend!r} (known: {', '.join(TEACHER_BACKENDS)})")
    if backend == "openai":
        if not url or not model:
            raise FslmError("an OpenAI-compatible teacher needs --teacher-url and --teacher-model")
        return OpenAITeacher(url, model, api_key_env, concurrency, timeout, max_retries)
    model = model or base.model
    if backend == "llamacpp":
        return LlamaCppTeacher(model, stack_dir)
    return TorchTeacher(model, base, stack_dir, batch_size)
