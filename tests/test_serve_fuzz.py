"""Fuzzing `fslm serve` over a real uvicorn with an instant fake backend: deep, wide and odd JSON bodies, odd
headers, odd query strings and paths, 1,000 examples. Nothing may give a 500, and every error is OpenAI-shaped."""

from __future__ import annotations

import json
import logging

import httpx
import pytest
from fake_backend import fake_stack, running
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fslm.web.options import ServeOptions

PATHS = ["/v1/chat/completions", "/v1/stack/run", "/v1/stack/stream", "/v1/models", "/health", "/", "/nope"]

# Text with the characters that break naive code: surrogates, NUL, BOM, RTL marks, astral planes.
odd_text = st.text(st.characters(codec=None), max_size=30) | st.sampled_from(
    ["\ud800", "a\udfffb", "\x00", "\ufeff", "\u202e", "😀" * 5, "", " ", "1" * 5000]
)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(10**30), 10**30)
    | st.floats(allow_nan=True, allow_infinity=True)
    | odd_text
)
json_values = st.recursive(
    scalars, lambda c: st.lists(c, max_size=6) | st.dictionaries(odd_text, c, max_size=6), max_leaves=30
)
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "developer", "tool", "bot", ""]) | json_values},
    optional={"content": odd_text | json_values | st.lists(st.fixed_dictionaries({"type": st.just("text"),
                                                                                  "text": odd_text}), max_size=3)},
)  # fmt: skip
chat_body = st.fixed_dictionaries(
    {"messages": st.lists(message, min_size=1, max_size=4)},
    optional={
        "max_tokens": st.integers(-3, 70) | json_values,
        "max_completion_tokens": st.integers(-3, 70) | json_values,
        "stream": st.booleans() | json_values,
        "model": odd_text | json_values,
        "n": st.integers(-2, 12) | json_values,
        "stop": odd_text | st.lists(odd_text, max_size=6) | json_values,
        "temperature": st.floats(-1, 3) | json_values,
        "top_p": st.floats(-0.5, 1.5) | json_values,
        "seed": json_values,
    },
)
run_body = st.fixed_dictionaries(
    {}, optional={"instruction": odd_text | json_values, "input": odd_text | json_values, "max_tokens": json_values}
)


def _raw_json(depth: int, kind: str) -> bytes:
    """Bodies a JSON generator never makes: nesting past the recursion limit, huge numbers, escapes, BOMs."""
    return {
        "deep_list": b"[" * depth + b"]" * depth,
        "deep_dict": b'{"a":' * depth + b"1" + b"}" * depth,
        "deep_unclosed": b"[" * depth,
        "deep_messages": b'{"messages": [{"role": "user", "content": ' + b"[" * depth + b"]" * depth + b"}]}",
        "huge_int": b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": ' + b"9" * depth + b"}",
        "surrogate_model": b'{"messages": [{"role": "user", "content": "hi"}], "model": "\\ud800"}',
        "surrogate_stop": b'{"messages": [{"role": "user", "content": "hi"}], "stop": ["\\udc00"]}',
        "bom": b'\xef\xbb\xbf{"messages": [{"role": "user", "content": "hi"}]}',
        "nan": b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN, "top_p": Infinity}',
        "latin1": b'{"messages": [{"role": "user", "content": "\xe9t\xe9"}]}',
        "empty": b"",
    }[kind]


raw_bodies = st.builds(
    _raw_json,
    st.integers(1, 200_000),
    st.sampled_from(
        ["deep_list", "deep_dict", "deep_unclosed", "deep_messages", "huge_int", "surrogate_model", "surrogate_stop",
         "bom", "nan", "latin1", "empty"]
    ),
)  # fmt: skip
bodies = (
    chat_body.map(lambda b: json.dumps(b).encode())
    | run_body.map(lambda b: json.dumps(b).encode())
    | json_values.map(lambda b: json.dumps(b).encode())
    | raw_bodies
    | st.binary(max_size=64)
)
# Header values h11 will send: visible ASCII and obs-text, inner spaces.
header_value = st.binary(min_size=0, max_size=40).map(
    lambda b: bytes(c for c in b if c == 0x20 or 0x21 <= c <= 0x7E or c >= 0x80).strip()
)
content_type = st.sampled_from(
    [b"application/json", b"APPLICATION/JSON; charset=utf-8", b"application/json;", b"text/plain",
     b"application/x-www-form-urlencoded", b"multipart/form-data; boundary=x", b"", b"application/jsonx"]
) | header_value  # fmt: skip
host = st.sampled_from(["127.0.0.1", "localhost", "[::1]", "LOCALHOST", "evil.example", "127.0.0.1.nip.io", ""])
query = st.dictionaries(
    st.sampled_from(["instruction", "input", "max_tokens", "stream", "x"]) | st.text(max_size=5),
    st.sampled_from(["hi", "", "5", "0", "-1", "1" * 5000, "²", "٣", "1e3", "%ff", "\x00"]) | st.text(max_size=20),
    max_size=4,
)


@pytest.fixture(scope="module")
def server():
    stack = fake_stack()
    with running(stack, ServeOptions(max_tokens=64, max_body=1 << 20, timeout=30, max_queue=64)) as url:
        yield url, stack


def test_fuzzed_requests_never_500(server, caplog):
    url, stack = server
    port = url.rsplit(":", 1)[1]
    client = httpx.Client(timeout=30)
    seen: dict[int, int] = {}

    @settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(
        method=st.sampled_from(["POST", "POST", "POST", "GET", "PUT", "DELETE", "OPTIONS"]),
        path=st.sampled_from(PATHS),
        body=bodies,
        ctype=content_type,
        host_name=host,
        params=query,
        extra=st.dictionaries(st.sampled_from([b"authorization", b"x-odd", b"accept", b"origin", b"content-encoding",
                                               b"transfer-encoding-x"]), header_value, max_size=3),
    )  # fmt: skip
    def check(method, path, body, ctype, host_name, params, extra):
        headers = [(b"content-type", ctype), *extra.items()]
        if host_name:
            headers.append((b"host", f"{host_name}:{port}".encode()))
        r = client.request(method, url + path, content=body, headers=headers, params=params)
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        assert r.status_code < 500, (r.status_code, r.text[:500])
        if r.status_code >= 400:
            assert r.json()["error"]["message"], r.text
        if path == "/v1/stack/stream" and r.status_code == 200:
            assert "event: done" in r.text or "event: error" in r.text

    with caplog.at_level(logging.ERROR):
        check()
    assert not [rec for rec in caplog.records if rec.levelno >= logging.ERROR], caplog.text[-3000:]
    # The fuzzer reached the interesting answers, not just one kind of refusal.
    assert {200, 400, 415, 421}.issubset(seen), seen
    assert client.get(f"{url}/health").json()["queued"] == 0
    r = client.post(f"{url}/v1/stack/run", json={"instruction": "still alive?"})
    assert r.status_code == 200 and len(r.json()["stages"]) == 4
