"""Request bodies into `Ask`s: what a request asks of the stack, validated field by field (400 with the offending
field as `param`, OpenAI's meanings for n, temperature, top_p and stop)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from fslm.web.guard import ApiError

ROLES = {"system", "developer", "user", "assistant", "tool", "function"}
MAX_N = 8  # choices per request (each is a whole run of the stack)
MAX_STOP = 4  # stop strings per request (OpenAI's limit)


@dataclass
class Ask:
    instruction: str
    input: str | None
    max_tokens: int | None
    stream: bool
    model: str
    n: int = 1
    final: dict[str, Any] | None = None  # overrides of the final stage's generation (temperature, top_p, stop)


def _bad(message: str, param: str | None) -> ApiError:
    return ApiError(400, message, param=param, code="invalid_value")


def _max_tokens(body: dict[str, Any], limit: int) -> int | None:
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
            raise _bad(f"{key} must be an integer from 1 to {limit}", key)
        return value
    return None


def _number(body: dict[str, Any], key: str, low: float, high: float, low_open: bool = False) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value > high or value < low or (low_open and value == low):
        bound = f"greater than {low:g}" if low_open else f"from {low:g}"
        raise _bad(f"{key} must be a number {bound} to {high:g}", key)
    return float(value)


def _sampling(body: dict[str, Any], stage_stop: tuple[str, ...] | list[str]) -> tuple[int, dict[str, Any] | None]:
    """`n` and the final stage's overrides: temperature, top_p, stop (OpenAI's meanings, applied to the answer)."""
    n = body.get("n")
    if n is None:
        n = 1
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_N:
        raise _bad(f"n must be an integer from 1 to {MAX_N}", "n")
    final: dict[str, Any] = {}
    temperature = _number(body, "temperature", 0.0, 2.0)
    if temperature is not None:
        final["temperature"] = temperature
    top_p = _number(body, "top_p", 0.0, 1.0, low_open=True)
    if top_p is not None:
        final["top_p"] = top_p
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None:
        if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(x, str) and x for x in stop):
            raise _bad(f"stop must be a non-empty string or a list of at most {MAX_STOP} of them", "stop")
        for x in stop:
            _utf8(x, "stop")
        final["stop"] = [*stage_stop, *(x for x in stop if x not in stage_stop)]
    return n, final or None


def _utf8(text: str, param: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise _bad("text must be valid Unicode (no lone surrogates)", param) from None


def _text(content: Any, param: str) -> str:
    """A message's text: a string, or the text parts of a content-part list."""
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list):
        parts = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _bad(f"{param}[{i}] must be a text part ({{'type': 'text', 'text': ...}})", f"{param}[{i}]")
            parts.append(part["text"])
        return "\n".join(parts)
    raise _bad(f"{param} must be a string or a list of text parts", param)


def parse_chat(body: Any, max_tokens: int, model: str, stage_stop: tuple[str, ...] | list[str] = ()) -> Ask:
    if not isinstance(body, dict):
        raise _bad("the body must be a JSON object", None)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages must be a non-empty list", "messages")
    if len(messages) > 256:
        raise _bad("at most 256 messages", "messages")
    instruction = None
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}] must be an object", f"messages[{i}]")
        if not isinstance(m.get("role"), str) or m["role"] not in ROLES:
            raise _bad(f"messages[{i}].role must be one of {', '.join(sorted(ROLES))}", f"messages[{i}].role")
        text = _text(m.get("content"), f"messages[{i}].content")
        if m["role"] == "user":
            instruction = text
    if instruction is None or not instruction.strip():
        raise _bad("the last user message is the instruction and must not be empty", "messages")
    _utf8(instruction, "messages")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad("stream must be true or false", "stream")
    name = body.get("model", model)
    if not isinstance(name, str):
        raise _bad("model must be a string", "model")
    _utf8(name, "model")  # echoed in the answer
    n, final = _sampling(body, stage_stop)
    if stream and n > 1:
        raise _bad("n > 1 is not supported with stream: true", "n")
    return Ask(instruction.strip(), None, _max_tokens(body, max_tokens), stream, name[:256] or model, n, final)


def parse_run(body: Any, max_tokens: int, from_query: bool = False) -> Ask:
    """`{"instruction": ..., "input": ..., "max_tokens": ...}` for /v1/stack/run and /v1/stack/stream."""
    if not isinstance(body, dict):
        raise _bad("the body must be a JSON object", None)
    body = dict(body)
    if from_query and "max_tokens" in body:
        raw = body["max_tokens"]  # a string; int() of thousands of digits raises (and needs no trying)
        body["max_tokens"] = int(raw) if raw.isascii() and raw.isdigit() and len(raw) <= 12 else raw
    instruction, input = body.get("instruction"), body.get("input")
    if not isinstance(instruction, str) or not instruction.strip():
        raise _bad("instruction must be a non-empty string", "instruction")
    if input is not None and not isinstance(input, str):
        raise _bad("input must be a string", "input")
    _utf8(instruction + (input or ""), "instruction")
    return Ask(instruction.strip(), (input or "").strip() or None, _max_tokens(body, max_tokens), True, "")
