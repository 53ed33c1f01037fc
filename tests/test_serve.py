"""`fslm serve` over a real uvicorn on 127.0.0.1: the openai client, streaming, limits, batching, fuzzing."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from conftest import llama_server, make_adapter, make_model_dir, uvicorn_thread

from fslm.config import load_config, save_config
from fslm.stack import Stack
from fslm.steps.init import InitOptions, init
from fslm.web.app import create_app
from fslm.web.options import ServeOptions

MAX_NEW = 6
JSON = {"content-type": "application/json"}  # the server refuses other bodies (415)


@contextmanager
def running(stack: Stack, options: ServeOptions | None = None) -> Iterator[str]:
    """uvicorn serving the stack's app in a thread on a loopback port it binds itself; yields the base URL."""
    with uvicorn_thread(create_app(stack, options)) as url:
        yield url


def tiny_stack_dir(root: Path, model_dir: Path, arch: str = "llama", adapters: tuple[str, ...] = ()) -> Path:
    directory = root / "stack"
    init(directory, InitOptions(base=str(model_dir)))
    config = load_config(directory)
    for stage in config.stages:
        stage.generation.max_new_tokens = MAX_NEW
    save_config(config, directory)
    for i, name in enumerate(adapters):
        make_adapter(model_dir, arch, directory / "adapters" / name, seed=i + 1)
    return directory


@pytest.fixture(scope="module")
def stack(tmp_path_factory, models_root) -> Stack:

    model_dir = make_model_dir(models_root, "llama", chat=True)
    directory = tiny_stack_dir(tmp_path_factory.mktemp("serve"), model_dir, adapters=("intent", "answer"))
    return Stack.load(directory)


@pytest.fixture(scope="module")
def url(stack) -> Iterator[str]:
    with running(stack, ServeOptions(max_body=20_000, max_tokens=64, timeout=60)) as u:
        yield u


class Gate:
    """Wraps backend.generate: records (stage, batch size) and can hold generation until released."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.calls: list[tuple[str, int]] = []
        self.open = threading.Event()
        self.open.set()
        self.entered = threading.Event()
        self.original = stack.backend.generate

    def __enter__(self) -> Gate:
        def generate(prompts, adapter, settings, label="", on_text=None):
            self.calls.append((label, len(prompts)))
            self.entered.set()
            assert self.open.wait(30), "gate never opened"
            return self.original(prompts, adapter, settings, label=label, on_text=on_text)

        self.stack.backend.generate = generate
        return self

    def __exit__(self, *exc: object) -> None:
        self.open.set()
        del self.stack.backend.generate  # back to the class method


def test_openai_client_plain_and_streaming(stack, url):
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    names = stack.config.stage_names
    assert [m.id for m in client.models.list().data] == [stack.config.name]

    done = client.chat.completions.create(
        model=stack.config.name, messages=[{"role": "user", "content": "What is the capital of France?"}]
    )
    trace = done.model_extra["fslm_trace"]
    assert [s["name"] for s in trace["stages"]] == names
    assert all(0 < s["output_tokens"] <= MAX_NEW for s in trace["stages"])
    assert done.choices[0].message.content == trace["answer"] == trace["stages"][-1]["output"]
    assert trace["stages"][0]["adapter"] == "intent" and trace["stages"][1]["adapter"] is None
    assert done.usage.completion_tokens == sum(s["output_tokens"] for s in trace["stages"])
    # Greedy: the server gives exactly what Stack.run gives.
    assert trace["answer"] == stack.run("What is the capital of France?").answer

    chunks = list(
        client.chat.completions.create(
            model=stack.config.name,
            messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Explain the sky."}],
            stream=True,
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    last = chunks[-1]
    assert last.choices[0].finish_reason in ("stop", "length")
    strace = last.model_extra["fslm_trace"]
    assert [s["name"] for s in strace["stages"]] == names
    assert text == strace["answer"] == stack.run("Explain the sky.").answer
    # Streamed: the answer arrives in several content chunks before the final one, which carries the usage.
    contents = [c.choices[0].delta.content for c in chunks[1:-1]]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len(contents) >= 3 and all(contents), contents
    assert last.usage.completion_tokens == sum(s["output_tokens"] for s in strace["stages"]) > 0
    assert last.usage.prompt_tokens == sum(s["prompt_tokens"] for s in strace["stages"])
    # The raw stream ends with `data: [DONE]` right after the usage chunk (the openai client hides both details).
    body = {"messages": [{"role": "user", "content": "Explain the sky."}], "stream": True}
    raw = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).text
    events = [e for e in raw.split("\n\n") if e]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: {") for e in events[:-1])
    assert json.loads(events[-2][6:])["usage"] == last.usage.model_dump(exclude_none=True)


def test_stage_events_stream_tokens(stack, url):
    events = []
    body = {"instruction": "Give three tips for staying healthy.", "max_tokens": 5}
    with httpx.stream("POST", f"{url}/v1/stack/stream", json=body, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        kind = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                events.append((kind, json.loads(line[6:])))
    kinds = [k for k, _ in events]
    assert kinds[-1] == "done" and kinds.count("stage_start") == kinds.count("stage_end") == 4
    trace = events[-1][1]
    for stage in trace["stages"]:
        deltas = [d["delta"] for k, d in events if k == "token" and d["stage"] == stage["name"]]
        assert stage["output_tokens"] <= 5
        assert "".join(deltas).strip() == stage["output"]
        assert len(deltas) > 1 or stage["output_tokens"] <= 1  # really token by token, not one final chunk
    run = httpx.post(f"{url}/v1/stack/run", json=body, timeout=30).json()
    for s in [*run["stages"], *trace["stages"]]:
        assert s.pop("seconds") > 0
    assert run == trace  # greedy: same trace however it is requested
    assert httpx.get(f"{url}/health").json()["status"] == "ok"


def _sse(text: str) -> list[tuple[str, dict]]:
    """(event, data) pairs of a /v1/stack/stream body."""
    events, kind = [], None
    for line in text.splitlines():
        if line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("data: "):
            events.append((kind, json.loads(line[6:])))
    return events


def test_stage_events_stream_over_get_too(url):
    """`GET /v1/stack/stream?instruction=...&max_tokens=...` (an EventSource cannot POST) = the POST stream."""
    query = {"instruction": "Explain why the sky is blue.", "input": "Be short.", "max_tokens": 3}
    r = httpx.get(f"{url}/v1/stack/stream", params=query, timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    got = _sse(r.text)
    assert [k for k, _ in got].count("stage_start") == 4 and got[-1][0] == "done"
    trace = got[-1][1]
    assert (trace["instruction"], trace["input"]) == ("Explain why the sky is blue.", "Be short.")
    assert all(s["output_tokens"] <= 3 for s in trace["stages"])  # the query's max_tokens, a string, was applied
    posted = _sse(httpx.post(f"{url}/v1/stack/stream", json=query, timeout=30).text)
    for events in (got, posted):
        for kind, data in events:
            if kind in ("stage_end", "done"):
                for s in data.get("stages", [data]):
                    s.pop("seconds", None)
    assert got == posted


def test_max_completion_tokens_caps_every_stage(stack, url):
    """OpenAI's newer `max_completion_tokens` works like `max_tokens` and wins when both are given."""
    ask = {"messages": [{"role": "user", "content": "Give three tips for staying healthy."}]}
    free = httpx.post(f"{url}/v1/chat/completions", json=ask, timeout=60).json()
    assert free["fslm_trace"]["stages"][-1]["output_tokens"] > 2  # else a cap of 2 would prove nothing
    for extra in ({"max_completion_tokens": 2}, {"max_completion_tokens": 2, "max_tokens": 5}):
        r = httpx.post(f"{url}/v1/chat/completions", json={**ask, **extra}, timeout=60).json()
        stages = r["fslm_trace"]["stages"]
        assert all(s["output_tokens"] <= 2 for s in stages), (extra, stages)
        assert stages[-1]["output_tokens"] == 2 and r["choices"][0]["finish_reason"] == "length"
        assert r["usage"]["completion_tokens"] == sum(s["output_tokens"] for s in stages)
        assert (
            r["choices"][0]["message"]["content"] == stack.run(ask["messages"][0]["content"], max_new_tokens=2).answer
        )
    bad = httpx.post(f"{url}/v1/chat/completions", json={**ask, "max_completion_tokens": 0})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "max_completion_tokens"


def test_bad_requests_are_400_with_an_openai_error(url):
    cases = [
        {"messages": []},
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0},
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10_000},
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": "5"},
        {"messages": [{"role": "wizard", "content": "hi"}]},
        {"messages": [{"role": "user", "content": "   "}]},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        [1, 2],
    ]
    for body in cases:
        r = httpx.post(f"{url}/v1/chat/completions", json=body)
        assert r.status_code == 400, (body, r.text)
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and err["message"]
    lone_surrogate = json.dumps({"messages": [{"role": "user", "content": "a\ud800"}]}).encode()
    r = httpx.post(f"{url}/v1/chat/completions", content=lone_surrogate, headers=JSON)
    assert r.status_code == 400 and "Unicode" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/v1/chat/completions", content=b"{not json", headers=JSON)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    # Longer than the tiny model's 512-token context: refused clearly, not a 500.
    long = " ".join(["word"] * 3000)
    r = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": long}]}, timeout=30)
    assert r.status_code == 400 and "context" in r.json()["error"]["message"]


def test_body_limit_is_413(url):
    big = {"messages": [{"role": "user", "content": "x" * 30_000}]}
    r = httpx.post(f"{url}/v1/chat/completions", json=big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunks():  # no Content-Length: the limit holds while streaming the body in
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(40):
            yield b"y" * 1000
        yield b'"}]}'

    r = httpx.post(f"{url}/v1/chat/completions", content=chunks(), headers=JSON)
    assert r.status_code == 413


def test_api_key(stack):
    with running(stack, ServeOptions(api_key="s3cret")) as u:
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        assert httpx.post(f"{u}/v1/chat/completions", json=body).status_code == 401
        bad = httpx.post(f"{u}/v1/chat/completions", json=body, headers={"Authorization": "Bearer nope"})
        assert bad.status_code == 401 and bad.json()["error"]["type"] == "authentication_error"
        assert httpx.get(f"{u}/v1/models").status_code == 401
        ok = httpx.post(f"{u}/v1/chat/completions", json=body, headers={"Authorization": "Bearer s3cret"}, timeout=30)
        assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["role"] == "assistant"
        assert httpx.get(f"{u}/health").status_code == 200
        # No CORS headers unless --cors-origin is given.
        pre = httpx.options(
            f"{u}/v1/models", headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "GET"}
        )
        assert "access-control-allow-origin" not in pre.headers


def test_cors_only_for_the_given_origin(stack):
    with running(stack, ServeOptions(cors_origins=("http://ok.example",))) as u:
        ok = httpx.get(f"{u}/health", headers={"Origin": "http://ok.example"})
        assert ok.headers.get("access-control-allow-origin") == "http://ok.example"
        other = httpx.get(f"{u}/health", headers={"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in other.headers


def test_full_queue_is_503_with_retry_after(stack):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    with running(stack, ServeOptions(max_queue=1)) as u, Gate(stack) as gate:
        gate.open.clear()
        first: list[httpx.Response] = []
        t = threading.Thread(target=lambda: first.append(httpx.post(f"{u}/v1/chat/completions", json=body, timeout=60)))
        t.start()
        assert gate.entered.wait(20)
        busy = httpx.post(f"{u}/v1/chat/completions", json=body)
        assert busy.status_code == 503 and int(busy.headers["retry-after"]) > 0
        assert busy.json()["error"]["code"] == "queue_full"
        gate.open.set()
        t.join(60)
        assert first[0].status_code == 200
        assert httpx.post(f"{u}/v1/chat/completions", json=body, timeout=30).status_code == 200


def test_timeout_is_504(stack):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    with running(stack, ServeOptions(timeout=0.5)) as u, Gate(stack) as gate:
        gate.open.clear()
        r = httpx.post(f"{u}/v1/chat/completions", json=body, timeout=30)
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        gate.open.set()


def test_concurrent_requests_are_batched(stack):
    """8 requests arrive while the worker is busy: each later stage runs them as one batch, same answers."""
    n = 8
    questions = [f"Question number {i}: what is {i} + {i}?" for i in range(n)]
    with running(stack) as u, Gate(stack) as gate:
        gate.open.clear()
        results: dict[int, dict] = {}

        def ask(i: int) -> None:
            body = {"messages": [{"role": "user", "content": questions[i]}]}
            results[i] = httpx.post(f"{u}/v1/chat/completions", json=body, timeout=120).json()

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(n)]
        threads[0].start()
        assert gate.entered.wait(20)  # request 0 holds the worker in its first stage...
        for t in threads[1:]:
            t.start()
        deadline = time.monotonic() + 60
        try:
            while httpx.get(f"{u}/health").json()["queued"] < n:
                assert time.monotonic() < deadline, "the 7 other requests did not all queue within 60 s"
                time.sleep(0.05)
        finally:
            gate.open.set()  # ...while the other 7 queue up
        deadline = time.monotonic() + 120
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        assert not any(t.is_alive() for t in threads), "requests still unanswered after 120 s"
    # The property (docs/serve.md, "Batching"): every request ran every stage once, the latecomers caught up, and
    # the 8 requests cost 5 generate calls, not 32 (request 0's first stage, the 7 latecomers', then 3 shared).
    names = stack.config.stage_names
    assert len(gate.calls) == len(names) + 1, gate.calls
    for name in names:
        assert sum(size for stage, size in gate.calls if stage == name) == n, (name, gate.calls)
    assert {size for stage, size in gate.calls if stage != names[0]} == {n}, gate.calls
    expected = stack.run_batch(questions)
    for i in range(n):
        assert results[i]["choices"][0]["message"]["content"] == expected[i].answer


def test_fuzzed_bodies_never_500(url):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    scalars = st.none() | st.booleans() | st.integers(-5, 10**6) | st.floats(allow_nan=True) | st.text(max_size=20)
    json_values = st.recursive(
        scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3), max_leaves=8
    )
    message = st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant", "bot", ""]) | json_values},
        optional={"content": st.text(max_size=40) | json_values},
    )
    body = (
        st.fixed_dictionaries(
            {},
            optional={
                "messages": st.lists(message, max_size=3) | json_values,
                "max_tokens": st.integers(-3, 70) | json_values,
                "stream": st.booleans() | json_values,
                "model": st.text(max_size=10) | json_values,
            },
        )
        | json_values
    )
    client = httpx.Client(timeout=30)

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(body=body, path=st.sampled_from(["/v1/chat/completions", "/v1/stack/run"]))
    def check(body, path):
        if isinstance(body, dict) and isinstance(body.get("max_tokens"), int) and body["max_tokens"] > 3:
            body["max_tokens"] = 3  # keep valid requests quick
        r = client.post(url + path, content=json.dumps(body).encode(), headers=JSON)
        assert r.status_code < 500, r.text
        if r.status_code >= 400:
            assert r.json()["error"]["message"]

    check()
    assert client.get(f"{url}/health").json()["status"] == "ok"
    r = client.post(f"{url}/v1/stack/run", json={"instruction": "still alive?", "max_tokens": 2})
    assert r.status_code == 200 and len(r.json()["stages"]) == 4


def test_cli_serve_help_and_bad_stack(tmp_path):
    from typer.testing import CliRunner

    from fslm.cli import app

    r = CliRunner().invoke(app, ["serve", str(tmp_path / "missing")])
    assert r.exit_code == 2 and "Traceback" not in r.output
    r = CliRunner().invoke(app, ["serve", "--help"])
    assert r.exit_code == 0 and "--api-key" in r.output


@pytest.mark.slow
def test_serving_a_stack_whose_stages_run_on_a_real_llama_cpp_server(tmp_path):
    """Remote stages: every stage is its own model name on `python -m llama_cpp.server` (the embedded GGUF served
    under four names, as vLLM would serve four LoRAs); fslm serve fronts it with the same API."""

    import openai

    from fslm.config import ServerSettings
    from fslm.models import ALIASES

    gguf = str(ALIASES["smollm2-135m-instruct"].path())
    names = ["intent", "plan", "reasoning", "answer"]
    models = [
        {"model": gguf, "model_alias": f"smol-{n}", "n_ctx": 2048, "n_threads": 1, "verbose": False} for n in names
    ]
    config_file = tmp_path / "llama-server.json"
    config_file.write_text(json.dumps({"host": "127.0.0.1", "port": 0, "interrupt_requests": False, "models": models}))
    with llama_server(["--config_file", str(config_file)], tmp_path / "llama-server.log") as remote:
        directory = tmp_path / "remote"
        init(directory)  # the embedded base: its tokenizer renders prompts the server completes
        config = load_config(directory)
        config.base.backend = "openai"
        config.base.server = ServerSettings(url=remote, models={n: f"smol-{n}" for n in names}, max_retries=0)
        save_config(config, directory)
        stack = Stack.load(directory)
        with running(stack) as u:
            client = openai.OpenAI(base_url=f"{u}/v1", api_key="unused", max_retries=0, timeout=120)
            done = client.chat.completions.create(
                model="x", messages=[{"role": "user", "content": "Name a primary colour."}], max_tokens=4
            )
            trace = done.model_extra["fslm_trace"]
            assert [(s["name"], s["adapter"]) for s in trace["stages"]] == [(n, n) for n in names]
            assert all(0 < s["output_tokens"] <= 4 for s in trace["stages"])
            assert done.choices[0].message.content == trace["answer"]


def test_scheduler_merges_groups_and_never_starves(stack):
    """The batching policy itself: earliest stage first, but a job passed over 2 x stages times goes first."""
    from fslm.stack import Trace
    from fslm.web.scheduler import Job, Scheduler

    scheduler = Scheduler(stack)
    scheduler.close()  # stop the worker: this test drives the policy by hand
    scheduler.stopping = False

    def job(stage: int, created: float) -> Job:
        j = Job(Trace(instruction="q"), None, lambda event: None, created=created)
        j.stage = stage
        scheduler.jobs.append(j)
        return j

    ahead = job(2, 0.0)
    late = [job(0, 1.0), job(1, 2.0)]
    assert scheduler._next_batch() == [late[0]]  # the earliest stage first...
    late[0].stage = 1
    assert scheduler._next_batch() == late  # ...so it catches up and merges with the job at stage 1
    # A steady stream of new requests at stage 0 would always come first; the old job still runs in time.
    for step in range(scheduler.patience + 1):
        scheduler.jobs = [j for j in scheduler.jobs if j is ahead]
        job(0, 10.0 + step)
        if scheduler._next_batch() == [ahead]:
            break
    else:
        raise AssertionError("the job at stage 2 starved")
    assert step >= scheduler.patience - 2
