"""Any OpenAI-compatible server (vLLM with --enable-lora, llama.cpp server, Ollama) through the `openai` client.

Two paths:
- `OpenAIBackend`, the stage backend: prompts are rendered locally with the base model's HF tokenizer (so a stage
  sees the same text as on torch and in training) and sent to /v1/completions. A stage's served model name comes
  from `base.server.models[stage]` when that stage has an adapter there, else `base.server.base_model`.
- `OpenAIClient.chat`, used by the `fslm distill` teacher (`--teacher-url/--teacher-model`): /v1/chat/completions,
  the server applies its own chat template.

Retries: the openai client already retries connection errors, timeouts, 408/409/429 and 5xx with exponential backoff
(0.5 s doubling to at most 8 s, with jitter; it honours Retry-After up to 2 minutes). We set its `max_retries` and
`timeout` and turn what is left after the last retry into one FslmError naming the server. Requests run
concurrently (`concurrency` threads); results keep the order of the prompts.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fslm import models
from fslm.backends import Backend, Completion, TextCallback, fit_to_context
from fslm.config import BaseModelSettings, GenerationSettings, ServerSettings
from fslm.errors import FslmError
from fslm.trust import check_trust, current_trust


@dataclass
class Generated:
    text: str
    prompt_tokens: int
    output_tokens: int
    finish_reason: str | None  # "stop", "length", ... as the server reports it


class OpenAIClient:
    """A thread-pooled `openai.OpenAI` client with our error wording; one per server."""

    def __init__(self, server: ServerSettings) -> None:
        import openai

        self.url = server.url.rstrip("/")
        self.concurrency = server.concurrency
        self.max_retries = server.max_retries
        # Local servers accept any key; the client insists on one, so a placeholder stands in when the variable is unset.
        api_key = os.environ.get(server.api_key_env) or "no-key"
        self.client = openai.OpenAI(
            base_url=self.url, api_key=api_key, timeout=server.timeout, max_retries=server.max_retries
        )

    def complete(self, model: str, prompts: list[str], settings: GenerationSettings) -> list[Generated]:
        """/v1/completions, one request per prompt, `concurrency` at a time."""
        return self._map(lambda p: self._one_completion(model, p, settings), prompts)

    def chat(
        self,
        model: str,
        conversations: list[list[dict[str, str]]],
        settings: GenerationSettings,
        on_result: Any = None,
    ) -> list[Generated]:
        """/v1/chat/completions, one request per conversation, `concurrency` at a time; `on_result(i, generated)`
        hears each answer as it arrives (so a caller can keep what it paid for even when a later request fails)."""
        return self._map(lambda m: self._one_chat(model, m, settings), conversations, on_result)

    # --- internals -----------------------------------------------------------------------------------

    def _map(self, fn: Any, items: list[Any], on_result: Any = None) -> list[Generated]:
        """fn over items, `concurrency` at a time, results in item order. Every request runs to its end even when
        another failed (each answered one reaches `on_result`); then the first failure is raised."""
        from concurrent.futures import as_completed

        results: list[Generated | None] = [None] * len(items)
        failure: BaseException | None = None
        with ThreadPoolExecutor(max_workers=max(1, min(self.concurrency, len(items)))) as pool:
            futures = {pool.submit(fn, x): i for i, x in enumerate(items)}
            for future in as_completed(futures):
                i = futures[future]
                try:
                    results[i] = future.result()
                except Exception as e:  # the first failure is raised once every request has ended
                    failure = failure or e
                    continue
                if on_result is not None:
                    on_result(i, results[i])
        if failure is not None:
            raise failure
        return [r for r in results if r is not None]

    @staticmethod
    def _params(settings: GenerationSettings) -> dict[str, Any]:
        params: dict[str, Any] = {
            "max_tokens": settings.max_new_tokens,
            "temperature": settings.temperature,
            "top_p": settings.top_p,
        }
        if settings.stop:
            params["stop"] = settings.stop
        if settings.repetition_penalty != 1.0:
            # Not an OpenAI parameter: vLLM reads `repetition_penalty`, llama.cpp's server `repeat_penalty`.
            params["extra_body"] = {
                "repetition_penalty": settings.repetition_penalty,
                "repeat_penalty": settings.repetition_penalty,
            }
        return params

    def _one_completion(self, model: str, prompt: str, settings: GenerationSettings) -> Generated:
        resp = self._call(self.client.completions.create, model=model, prompt=prompt, **self._params(settings))
        choice = resp.choices[0]
        usage = resp.usage
        return Generated(
            choice.text or "",
            usage.prompt_tokens if usage else 0,
            usage.completion_tokens if usage else 0,
            choice.finish_reason,
        )

    def _one_chat(self, model: str, messages: list[dict[str, str]], settings: GenerationSettings) -> Generated:
        resp = self._call(self.client.chat.completions.create, model=model, messages=messages, **self._params(settings))
        choice = resp.choices[0]
        usage = resp.usage
        return Generated(
            choice.message.content or "",
            usage.prompt_tokens if usage else 0,
            usage.completion_tokens if usage else 0,
            choice.finish_reason,
        )

    def _call(self, fn: Any, **kwargs: Any) -> Any:
        import openai

        try:
            return fn(**kwargs)
        except openai.APITimeoutError:
            raise FslmError(f"{self.url}: no answer within the timeout after {self.max_retries} retries") from None
        except openai.APIConnectionError as e:
            cause = e.__cause__ or e
            raise FslmError(f"{self.url}: cannot connect after {self.max_retries} retries ({cause})") from None
        except openai.APIStatusError as e:
            detail = _error_detail(e)
            raise FslmError(
                f"{self.url}: the server answered {e.status_code} for model {kwargs['model']!r}: {detail}"
            ) from None


def _error_detail(e: Any) -> str:
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"]).splitlines()[0]
        if isinstance(inner, str):
            return inner.splitlines()[0]
    return str(getattr(e, "message", e)).splitlines()[0]


class OpenAIBackend(Backend):
    """Stages served by an OpenAI-compatible server; prompts rendered and counted locally."""

    name = "openai"

    def __init__(
        self,
        client: OpenAIClient,
        server: ServerSettings,
        tokenizer: Any,
        context_length: int,
        prompt_format: str = "auto",
    ) -> None:
        self.client = client
        self.server = server
        self.tokenizer = tokenizer
        self.prompt_format = prompt_format
        self._context = context_length
        # Stages the server serves with their own model (adapter); Stack.stage_adapter looks here.
        self.adapters: dict[str, Path] = {stage: Path(f"served:{m}") for stage, m in server.models.items()}

    @classmethod
    def from_settings(cls, settings: BaseModelSettings, stack_dir: str | Path | None = None) -> OpenAIBackend:
        # The URL and the key variable come from a manifest someone else may have written: the user must agree.
        check_trust(settings, code=True, server=True)
        server = settings.server or ServerSettings()
        if not server.base_model and not server.models:
            where = settings._origin.get("server" if settings.server else "backend", "")
            raise FslmError(
                f"{where + ': ' if where else ''}base.server: set base_model (the served name of the bare base model) "
                "and/or models (stage -> served adapter name) to run stages on an OpenAI-compatible server"
            )
        ref = models.resolve_base(settings, stack_dir)
        tokenizer = models.load_tokenizer(ref, settings)
        key_env = current_trust().key_env(server)  # the user's variable, not necessarily the manifest's
        client = OpenAIClient(server.model_copy(update={"api_key_env": key_env}))
        return cls(client, server, tokenizer, context_length(ref, tokenizer), settings.prompt_format)

    @property
    def context_length(self) -> int:
        return self._context

    def add_adapter(self, name: str, path: Path) -> None:
        """A local adapter folder is only usable when the server serves it; say how to map it."""
        if name not in self.server.models:
            raise FslmError(
                f"{path}: stage {name!r} has a local adapter, but base.server.models has no served model for it; "
                f"serve the adapter (e.g. vLLM --lora-modules {name}={path}) and add `{name}: <served name>`"
            )

    def served_model(self, adapter: str | None) -> str:
        if adapter is not None:
            if adapter not in self.server.models:
                raise FslmError(
                    f"adapter {adapter!r} is not served (base.server.models has: {', '.join(self.server.models) or 'none'})"
                )
            return self.server.models[adapter]
        if not self.server.base_model:
            raise FslmError("base.server.base_model is not set: no served model runs stages without an adapter")
        return self.server.base_model

    def generate(
        self,
        prompts: list[str],
        adapter: str | None,
        settings: GenerationSettings,
        label: str = "",
        on_text: TextCallback | None = None,
    ) -> list[Completion]:
        model = self.served_model(adapter)
        lengths = [self.count_tokens(p) for p in prompts]
        max_new = fit_to_context(lengths, settings.max_new_tokens, self.context_length, label)
        settings = settings.model_copy(update={"max_new_tokens": max_new})
        results = []
        for row, (n_prompt, g) in enumerate(zip(lengths, self.client.complete(model, prompts, settings), strict=True)):
            if on_text is not None:
                on_text(row, g.text)
            # The server applies the stop strings; usage may be missing on some servers: count locally then.
            n_out = g.output_tokens or self.count_tokens(g.text)
            results.append(Completion(g.text.strip(), g.prompt_tokens or n_prompt, n_out))
        return results


def context_length(ref: models.BaseRef, tokenizer: Any) -> int:
    """The model's context from file headers (GGUF metadata or config.json), else the tokenizer's limit."""
    try:
        if ref.kind == "gguf":
            from gguf import GGUFReader

            fields = GGUFReader(ref.location).fields
            arch = bytes(fields["general.architecture"].parts[fields["general.architecture"].data[0]]).decode()
            f = fields.get(f"{arch}.context_length")
            if f is not None:
                return int(f.parts[f.data[0]][0])
        elif ref.kind == "dir":
            import json

            cfg = json.loads((Path(ref.location) / "config.json").read_text())
            for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
                if cfg.get(key):
                    return int(cfg[key])
    except (OSError, KeyError, ValueError, IndexError):
        pass
    limit = getattr(tokenizer, "model_max_length", 0) or 0
    return int(limit) if 0 < limit < 10**7 else 2048
