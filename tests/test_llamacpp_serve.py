"""`fslm serve` on the llama.cpp fast path: chosen whenever the export is current, and concurrent requests share
llama.cpp's batched decode with the answers they get alone."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import make_adapter, uvicorn_thread
from typer.testing import CliRunner

from fslm.backends.llamacpp import LlamaCppBackend
from fslm.cli import app
from fslm.config import load_config, save_config
from fslm.stack import Stack
from fslm.stackdir import StackDir
from fslm.steps import serve as serve_module
from fslm.steps.export import export_gguf
from fslm.steps.init import InitOptions, init
from fslm.web.app import create_app
from fslm.web.options import ServeOptions


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_llama) -> Path:
    directory = tmp_path_factory.mktemp("serve-llamacpp") / "stack"
    init(directory, InitOptions(base=str(tiny_llama)))
    config = load_config(directory)
    for stage in config.stages:
        stage.generation.max_new_tokens = 6
    save_config(config, directory)
    for seed, stage in enumerate(("intent", "answer")):
        make_adapter(tiny_llama, "llama", StackDir(directory).adapter(stage), seed=seed)
    export_gguf(directory, "f32")
    return directory


def _served_backend(directory: Path, monkeypatch, *args: str) -> tuple[str | None, str]:
    """Run `fslm serve DIR ARGS` with the server itself replaced: the backend it would serve on, and the output."""
    seen: dict[str, str] = {}

    def fake_serve(stack: Stack, **_: object) -> None:
        seen["backend"] = stack.backend.name
        close = getattr(stack.backend, "close", None)
        if close is not None:
            close()

    monkeypatch.setattr(serve_module, "run_server", fake_serve)
    result = CliRunner().invoke(app, ["serve", str(directory), *args])
    assert result.exit_code == 0, result.output
    return seen.get("backend"), result.output


def test_serve_takes_the_fast_path_when_the_export_is_current(tmp_path, tiny_llama, monkeypatch):
    directory = tmp_path / "stack"
    init(directory, InitOptions(base=str(tiny_llama)))
    assert _served_backend(directory, monkeypatch)[0] == "torch"  # no export: PyTorch, no warning
    make_adapter(tiny_llama, "llama", StackDir(directory).adapter("intent"), seed=1)
    export_gguf(directory, "f32")
    assert _served_backend(directory, monkeypatch)[0] == "llamacpp"
    assert _served_backend(directory, monkeypatch, "--backend", "torch")[0] == "torch"
    # retrained after the export: the export's staleness check keeps serve on PyTorch, and says why
    make_adapter(tiny_llama, "llama", StackDir(directory).adapter("intent"), seed=2)
    backend, output = _served_backend(directory, monkeypatch)
    assert backend == "torch"
    assert "changed since the export" in output and "fslm export" in output
    export_gguf(directory, "f32")
    # an adapter trained after the export for another stage
    make_adapter(tiny_llama, "llama", StackDir(directory).adapter("plan"), seed=3)
    backend, output = _served_backend(directory, monkeypatch)
    assert backend == "torch" and "'plan' has an adapter but no GGUF export" in output


def test_concurrent_requests_share_llamacpp_batches(exported):
    """8 requests at once on the llama.cpp backend: stage batches of several rows, each answer what it is alone."""
    config = load_config(exported)
    stack = Stack(config, LlamaCppBackend.from_settings(config.base, exported, type_k=0, type_v=0), exported)
    questions = [f"Question number {i}: what is {i} + {i}?" for i in range(8)]
    calls: list[int] = []
    original = stack.backend.generate
    queued = threading.Event()  # every request is in the queue: the first batch may run

    def generate(prompts, adapter, settings, label="", on_text=None):
        calls.append(len(prompts))
        assert queued.wait(60), "the test never saw the requests queued"
        return original(prompts, adapter, settings, label=label, on_text=on_text)

    stack.backend.generate = generate
    results: dict[int, str] = {}
    with uvicorn_thread(create_app(stack, ServeOptions())) as url:

        def ask(i: int) -> None:
            body = {"messages": [{"role": "user", "content": questions[i]}]}
            r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
            results[i] = r.json()["choices"][0]["message"]["content"]

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(questions))]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        try:
            while httpx.get(f"{url}/health").json()["queued"] < len(questions):
                assert time.monotonic() < deadline, "the requests did not all arrive within 60 s"
                time.sleep(0.05)
        finally:
            queued.set()  # the first batch was held until now, so the others wait behind it
        deadline = time.monotonic() + 180
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        assert not any(t.is_alive() for t in threads), "requests still unanswered after 180 s"
    del stack.backend.generate
    assert max(calls) == len(questions)  # the late arrivals caught up: all 8 shared a later stage's batch
    for i, question in enumerate(questions):
        assert results[i] == stack.run(question).answer
    stack.backend.close()
