"""`fslm serve`: an OpenAI-compatible HTTP server over a `Stack`, with per-stage streaming and a web page.

Endpoints
- `POST /v1/chat/completions`: the last user message is the instruction; the answer stage's text is the message
  content and the whole trace (the `fslm run --json` shape) rides along as `fslm_trace`. `stream: true` sends
  `chat.completion.chunk`s of the answer as it is generated, then `data: [DONE]`; the trace is on the last chunk.
- `GET /v1/models`, `GET /health`, `POST /v1/stack/run` (trace JSON), `POST|GET /v1/stack/stream` (SSE events
  `stage_start`, `token`, `stage_end`, `done`, `error`), `GET /` (the web page).

Generation happens on one worker thread (`fslm.steps.serve_batching.Scheduler`), which batches requests at the same stage.
Limits: bounded queue (503 + Retry-After), body size (413), API key (401), validation (400), per-request timeout
(504). Errors are OpenAI-style `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from importlib import resources
from typing import Any

from fastapi import Request as HttpRequest

from fslm.backends import cut_at_stop
from fslm.stack import Stack
from fslm.steps.serve_batching import Event, QueueFull, Scheduler

ROLES = {"system", "developer", "user", "assistant", "tool", "function"}


@dataclass
class ServeOptions:
    api_key: str | None = None
    max_body: int = 1 << 20  # bytes
    max_queue: int = 64
    max_batch: int = 32
    max_tokens: int = 4096  # the largest max_tokens a request may ask for
    timeout: float = 300.0  # seconds per request, queueing included
    cors_origins: tuple[str, ...] = ()
    retry_after: int = 2  # seconds, sent with 503


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Ask:
    instruction: str
    input: str | None
    max_tokens: int | None
    stream: bool
    model: str


def create_app(stack: Stack, options: ServeOptions | None = None) -> Any:
    """The FastAPI app; its scheduler starts now and stops with the app (lifespan)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

    opts = options or ServeOptions()
    scheduler = Scheduler(stack, max_queue=opts.max_queue, max_batch=opts.max_batch)
    model_name = stack.config.name
    started = time.time()

    @asynccontextmanager
    async def lifespan(_: Any) -> AsyncIterator[None]:
        yield
        await asyncio.to_thread(scheduler.close)

    app = FastAPI(title="fslm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.scheduler = scheduler
    app.state.stack = stack
    if opts.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(opts.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )

    @app.exception_handler(ApiError)
    async def api_error(_: HttpRequest, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(Exception)
    async def internal(_: HttpRequest, e: Exception) -> JSONResponse:
        body = ApiError(500, f"internal error: {type(e).__name__}", "server_error", code="internal_error").body()
        return JSONResponse(body, status_code=500)

    @app.exception_handler(404)
    async def not_found(request: HttpRequest, _: Exception) -> JSONResponse:
        return JSONResponse(ApiError(404, f"no route {request.url.path}", code="not_found").body(), status_code=404)

    @app.exception_handler(405)
    async def not_allowed(request: HttpRequest, _: Exception) -> JSONResponse:
        e = ApiError(405, f"{request.method} is not allowed on {request.url.path}", code="method_not_allowed")
        return JSONResponse(e.body(), status_code=405)

    def authorize(request: HttpRequest) -> None:
        if opts.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), opts.api_key.encode()):
            raise ApiError(401, "missing or wrong API key (send Authorization: Bearer KEY)", "authentication_error",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})  # fmt: skip

    async def read_json(request: HttpRequest) -> Any:
        """The body as JSON, refusing more than `max_body` bytes whether or not Content-Length says so."""
        declared = request.headers.get("content-length")
        too_big = ApiError(413, f"request body larger than {opts.max_body} bytes", code="request_too_large")
        if declared is not None and declared.isdigit() and int(declared) > opts.max_body:
            raise too_big
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > opts.max_body:
                raise too_big
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the body is not valid JSON: {e}", code="invalid_json") from None

    def submit(req: Ask, tokens: bool) -> tuple[Any, asyncio.Queue[Event]]:
        try:
            return scheduler.submit(req.instruction, req.input, req.max_tokens, asyncio.get_running_loop(), tokens)
        except QueueFull:
            raise ApiError(503, f"the server is busy ({opts.max_queue} requests queued); retry later", "server_error",
                           code="queue_full", headers={"Retry-After": str(opts.retry_after)}) from None  # fmt: skip

    async def events(job: Any, queue: asyncio.Queue[Event]) -> AsyncIterator[Event]:
        """The job's events until done/error, raising ApiError(504) past the request's deadline."""
        deadline = job.created + opts.timeout
        try:
            while True:
                remaining = deadline - time.monotonic()
                try:
                    event = await asyncio.wait_for(queue.get(), timeout=max(remaining, 0.001))
                except TimeoutError:
                    raise ApiError(504, f"the request took longer than {opts.timeout:g} s", "server_error",
                                   code="timeout") from None  # fmt: skip
                yield event
                if event[0] in ("done", "error"):
                    return
        finally:
            scheduler.cancel(job)

    async def trace_of(req: Ask) -> dict[str, Any]:
        job, queue = submit(req, tokens=False)
        async for kind, data in events(job, queue):
            if kind == "done":
                return data
            if kind == "error":
                raise ApiError(data["status"], data["message"], data["type"])
        raise AssertionError("unreachable")

    # --- routes ----------------------------------------------------------------------------------------

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_name, "stages": stack.config.stage_names, "queued": scheduler.pending,
                "max_queue": opts.max_queue, "uptime_s": round(time.time() - started, 1)}  # fmt: skip

    @app.get("/v1/models")
    async def list_models(request: HttpRequest) -> dict[str, Any]:
        authorize(request)
        card = {"id": model_name, "object": "model", "created": int(started), "owned_by": "fslm",
                "stages": stack.config.stage_names, "base": stack.config.base.model}  # fmt: skip
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HttpRequest) -> Any:
        authorize(request)
        req = parse_chat(await read_json(request), opts.max_tokens, model_name)
        cid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        if not req.stream:
            trace = await trace_of(req)
            return {
                "id": cid, "object": "chat.completion", "created": created, "model": req.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": trace["answer"]},
                             "finish_reason": finish_reason(trace, req.max_tokens, stack)}],
                "usage": usage(trace), "fslm_trace": trace,
            }  # fmt: skip
        job, queue = submit(req, tokens=True)
        last = stack.config.stage_names[-1]
        stop = stack.config.stages[-1].generation.stop

        def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
            body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": req.model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}  # fmt: skip
            return f"data: {json.dumps(body)}\n\n"

        async def body() -> AsyncIterator[str]:
            yield chunk({"role": "assistant", "content": ""})
            raw, sent = "", ""
            try:
                async for kind, data in events(job, queue):
                    if kind == "token" and data["stage"] == last:
                        raw += data["delta"]
                        text = answer_so_far(raw, stop)
                        if len(text) > len(sent) and text.startswith(sent):
                            yield chunk({"content": text[len(sent) :]})
                            sent = text
                    elif kind == "done":
                        answer = data["answer"]
                        if answer.startswith(sent) and len(answer) > len(sent):
                            yield chunk({"content": answer[len(sent) :]})
                        reason = finish_reason(data, req.max_tokens, stack)
                        yield chunk({}, reason, usage=usage(data), fslm_trace=data)
                    elif kind == "error":
                        yield f"data: {json.dumps(ApiError(data['status'], data['message'], data['type']).body())}\n\n"
            except ApiError as e:
                yield f"data: {json.dumps(e.body())}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(body(), media_type="text/event-stream", headers=SSE_HEADERS)

    @app.post("/v1/stack/run")
    async def stack_run(request: HttpRequest) -> dict[str, Any]:
        authorize(request)
        return await trace_of(parse_run(await read_json(request), opts.max_tokens))

    async def stream_events(req: Ask) -> Any:
        job, queue = submit(req, tokens=True)

        async def body() -> AsyncIterator[str]:
            try:
                async for kind, data in events(job, queue):
                    yield f"event: {kind}\ndata: {json.dumps(data)}\n\n"
            except ApiError as e:
                yield f"event: error\ndata: {json.dumps({'message': e.message, 'status': e.status})}\n\n"

        return StreamingResponse(body(), media_type="text/event-stream", headers=SSE_HEADERS)

    @app.post("/v1/stack/stream")
    async def stack_stream_post(request: HttpRequest) -> Any:
        authorize(request)
        return await stream_events(parse_run(await read_json(request), opts.max_tokens))

    @app.get("/v1/stack/stream")
    async def stack_stream_get(request: HttpRequest) -> Any:
        authorize(request)
        return await stream_events(parse_run(dict(request.query_params), opts.max_tokens, from_query=True))

    @app.get("/", response_class=HTMLResponse)
    async def index() -> str:
        return resources.files("fslm").joinpath("web/index.html").read_text(encoding="utf-8")

    return app


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def answer_so_far(raw: str, stop: list[str]) -> str:
    """The part of a streaming answer that the final (stop-cut, stripped) answer is sure to start with."""
    text = cut_at_stop(raw, stop)
    if len(text) == len(raw) and stop:  # a stop string may be starting at the end: hold its length back
        text = text[: max(0, len(text) - max(len(s) for s in stop) + 1)]
    return text.strip()


def finish_reason(trace: dict[str, Any], max_tokens: int | None, stack: Stack) -> str:
    last = trace["stages"][-1]
    limit = stack.config.stages[-1].generation.max_new_tokens
    limit = limit if max_tokens is None else min(limit, max_tokens)
    return "length" if last["output_tokens"] >= limit else "stop"


def usage(trace: dict[str, Any]) -> dict[str, int]:
    prompt = sum(s["prompt_tokens"] for s in trace["stages"])
    completion = sum(s["output_tokens"] for s in trace["stages"])
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


# --- request validation (400 with the offending field as `param`) ------------------------------------------


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


def parse_chat(body: Any, max_tokens: int, model: str) -> Ask:
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
    return Ask(instruction.strip(), None, _max_tokens(body, max_tokens), stream, name or model)


def parse_run(body: Any, max_tokens: int, from_query: bool = False) -> Ask:
    """`{"instruction": ..., "input": ..., "max_tokens": ...}` for /v1/stack/run and /v1/stack/stream."""
    if not isinstance(body, dict):
        raise _bad("the body must be a JSON object", None)
    body = dict(body)
    if from_query and "max_tokens" in body:
        raw = body["max_tokens"]
        body["max_tokens"] = int(raw) if raw.isdigit() else raw
    instruction, input = body.get("instruction"), body.get("input")
    if not isinstance(instruction, str) or not instruction.strip():
        raise _bad("instruction must be a non-empty string", "instruction")
    if input is not None and not isinstance(input, str):
        raise _bad("input must be a string", "input")
    _utf8(instruction + (input or ""), "instruction")
    return Ask(instruction.strip(), (input or "").strip() or None, _max_tokens(body, max_tokens), True, "")


def serve(stack: Stack, host: str = "127.0.0.1", port: int = 8000, options: ServeOptions | None = None) -> None:
    """Run the server in the foreground until interrupted."""
    import uvicorn

    opts = options or ServeOptions()
    if opts.api_key is None and os.environ.get("FSLM_API_KEY"):
        opts.api_key = os.environ["FSLM_API_KEY"]
    uvicorn.run(create_app(stack, opts), host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
