"""The OpenAI-compatible path against a REAL server (`python -m llama_cpp.server` with the embedded GGUF on
127.0.0.1), directly and behind a fault-injecting proxy (500s, dropped connections, a request that hangs past
the client's timeout).

The tests that use the server load the embedded model, so they are marked `slow`."""

from __future__ import annotations

import asyncio
import json
import random
import re
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from conftest import llama_server, refused_port
from typer.testing import CliRunner

from fslm.cli import app
from fslm.config import ServerSettings, load_config, save_config
from fslm.data import read_dataset
from fslm.models import ALIASES
from fslm.steps.init import InitOptions, init

runner = CliRunner()
SERVED = "smol"


@pytest.fixture(scope="module")
def server_url(tmp_path_factory):
    """llama.cpp's OpenAI-compatible server over the embedded SmolLM2 GGUF, for this module."""
    args = ["--model", str(ALIASES["smollm2-135m-instruct"].path()), "--model_alias", SERVED, "--host", "127.0.0.1"]
    args += ["--port", "0", "--n_ctx", "2048", "--n_threads", "1", "--verbose", "False"]
    args += ["--interrupt_requests", "False"]
    with llama_server(args, tmp_path_factory.mktemp("llama-server") / "server.log") as url:
        yield url


class FaultProxy:
    """A tiny HTTP/1.1 proxy: each request is forwarded, or (with probability `rate`) answered 500 or dropped
    (the connection closed unanswered); one request is left hanging until the client's timeout.

    The first three requests are a 500, a hang and a drop, so every fault is exercised; after that a seeded draw
    per request decides. No fault depends on how fast the machine is: a hung request is held until the client gives
    up on it (the test scales the client's timeout to the machine), and there is one hang, so it costs one timeout.
    """

    def __init__(self, upstream: int, rate: float = 0.3, seed: int = 0) -> None:
        self.upstream, self.rate = upstream, rate
        self.rng = random.Random(seed)
        self.counts: Counter[str] = Counter()
        self.loop = asyncio.new_event_loop()
        self.server = self.loop.run_until_complete(asyncio.start_server(self.handle, "127.0.0.1", 0))
        self.port = self.server.sockets[0].getsockname()[1]
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        async def shutdown() -> None:
            self.server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()

    def fault(self) -> str | None:
        n = self.counts["requests"]
        self.counts["requests"] += 1
        if n < 3:
            return ("500", "hang", "drop")[n]
        if self.rng.random() < self.rate:
            return self.rng.choice(["500", "drop"])
        return None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            m = re.search(rb"(?im)^content-length:\s*(\d+)", head)
            body = await reader.readexactly(int(m.group(1))) if m else b""
            fault = self.fault()
            if fault:
                self.counts[fault] += 1
            if fault == "500":
                msg = b'{"error": {"message": "injected fault"}}'
                writer.write(
                    b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(msg), msg)
                )
                await writer.drain()
                return
            if fault == "hang":  # never answer: wait for the client to time out and close the connection
                await asyncio.wait_for(reader.read(), timeout=600)
                return
            if fault == "drop":  # close the connection without a response (a crashed or restarted server)
                return
            head = re.sub(rb"(?im)^connection:[^\r\n]*\r\n", b"", head)
            head = head[:-2] + b"Connection: close\r\n\r\n"
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream)
            up_writer.write(head + body)
            await up_writer.drain()
            writer.write(await up_reader.read())  # the upstream closes after one response
            await writer.drain()
            up_writer.close()
            self.counts["forwarded"] += 1
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
def stack_dir(tmp_path, tiny_llama) -> Path:
    d = tmp_path / "stack"
    init(d, InitOptions(base=str(tiny_llama)))
    return d


def dataset(path: Path) -> Path:
    rows = [
        {"instruction": "Name a primary colour.", "input": "", "output": "Red."},
        {"instruction": "What is 2 + 3?", "input": "", "output": "5"},
        {"instruction": "Give one word that rhymes with cat.", "input": "", "output": ""},  # teacher writes the answer
    ]
    path.write_text(json.dumps(rows))
    return path


def distill_args(data: Path, stack: Path, out: Path, url: str, *extra: str) -> list[str]:
    return [
        "distill", str(data), "--stack", str(stack), "--out", str(out), "--teacher-url", url,
        "--teacher-model", SERVED, "--max-new-tokens", "8", "--filters", "none", "--concurrency", "2", *extra,
    ]  # fmt: skip


def check_output(data: Path, out: Path) -> list[dict]:
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)) and set(ids) == {rec.id for rec in read_dataset(data).records}
    for row in rows:
        assert list(row["targets"]) == ["intent", "plan", "reasoning", "answer"]
        assert all(row["targets"][s].strip() for s in ("intent", "plan", "reasoning"))  # a real model wrote them
    return rows


@pytest.mark.slow
def test_distill_through_a_real_openai_server(tmp_path, stack_dir, server_url):
    data, out = dataset(tmp_path / "d.json"), tmp_path / "d.jsonl"
    r = runner.invoke(app, distill_args(data, stack_dir, out, server_url))
    assert r.exit_code == 0, r.output
    rows = check_output(data, out)
    assert rows[0]["targets"]["answer"] == "Red." and rows[2]["targets"]["answer"]
    manifest = json.loads(Path(f"{out}.manifest.json").read_text())
    assert manifest["teacher"]["backend"] == "openai" and manifest["teacher"]["url"] == server_url
    assert manifest["last_run"]["teacher_calls"] == 3 * 3 + 1 and manifest["last_run"]["output_tokens"] > 0


def request_timeout(server_url: str, stack_dir: Path) -> float:
    """A client timeout for this machine as it is now: 6x the time the server takes for one distill-sized request
    (two run at once and the server answers one at a time), at least 5 s. On a quiet machine that is 5 s."""
    from fslm.stack import Stack

    prompt = Stack.load(stack_dir).render_prompt("plan", "Name a primary colour.", None, {"intent": "x " * 30})
    body = {"model": SERVED, "messages": [{"role": "user", "content": prompt}], "max_tokens": 8}
    start = time.perf_counter()
    httpx.post(f"{server_url}/chat/completions", json=body, timeout=300).raise_for_status()
    return max(5.0, 6 * (time.perf_counter() - start))


@pytest.mark.slow
def test_fault_injecting_proxy_every_record_exactly_once(tmp_path, stack_dir, server_url):
    timeout = request_timeout(server_url, stack_dir)
    proxy = FaultProxy(int(server_url.split(":")[2].split("/")[0]), rate=0.3)
    try:
        data, out = dataset(tmp_path / "d.json"), tmp_path / "d.jsonl"
        url = f"http://127.0.0.1:{proxy.port}/v1"
        flags = ["--timeout", f"{timeout:.1f}", "--max-retries", "10"]
        r = runner.invoke(app, distill_args(data, stack_dir, out, url, *flags))
        assert r.exit_code == 0, r.output
    finally:
        proxy.close()
    check_output(data, out)
    assert proxy.counts["500"] >= 1 and proxy.counts["hang"] == 1 and proxy.counts["drop"] >= 1
    manifest = json.loads(Path(f"{out}.manifest.json").read_text())
    # Retries are invisible above the client: one teacher answer per prompt, each record once. (A forwarded
    # request can still time out on a slow, busy machine and be retried, hence >=.)
    assert manifest["last_run"]["teacher_calls"] == 10 <= proxy.counts["forwarded"]
    assert manifest["counts"]["lost"] == 0


def test_unreachable_server_is_one_clear_line(tmp_path, stack_dir):
    data, out = dataset(tmp_path / "d.json"), tmp_path / "d.jsonl"
    with refused_port() as port:  # bound, never listening: nothing answers, and nothing else can take it
        url = f"http://127.0.0.1:{port}/v1"
        r = runner.invoke(app, distill_args(data, stack_dir, out, url, "--max-retries", "1"))
    assert r.exit_code == 2 and f"{url}: cannot connect after 1 retries" in r.output
    assert "Traceback" not in r.output


@pytest.mark.slow
def test_openai_stage_backend_against_the_server(tmp_path, server_url):
    """Stages on the server via /v1/completions, prompts rendered locally with the base model's tokenizer."""
    from fslm.stack import Stack

    d = tmp_path / "s"
    init(d)  # the embedded base: its tokenizer renders the prompts the server completes
    config = load_config(d)
    config.base.backend = "openai"
    config.base.server = ServerSettings(url=server_url, base_model=SERVED, models={"answer": "not-served"})
    save_config(config, d)
    stack = Stack.load(d)
    assert stack.backend.name == "openai" and stack.backend.context_length == 8192
    assert stack.stage_adapter("answer") == "answer" and stack.stage_adapter("intent") is None
    traces = stack.run_batch(["Name a primary colour.", "What is 2 + 3?"], max_new_tokens=6, stages=3)
    for t in traces:
        assert [s.name for s in t.stages] == ["intent", "plan", "reasoning"]
        assert all(s.output and 0 < s.output_tokens <= 6 and s.prompt_tokens > 20 for s in t.stages)
    # A stage with a served adapter asks for that model name; a local adapter the server lacks is refused clearly.
    from fslm.errors import FslmError

    assert stack.backend.served_model("answer") == "not-served" and stack.backend.served_model(None) == SERVED
    with pytest.raises(FslmError, match=r"stage 'plan' has a local adapter, but base.server.models"):
        stack.backend.add_adapter("plan", d / "adapters" / "plan")
