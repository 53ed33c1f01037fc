"""The app `fslm serve` runs: an OpenAI-compatible HTTP server over a `Stack`, with per-stage streaming and a web page.

Endpoints
- `POST /v1/chat/completions`: the last user message is the instruction; the answer stage's text is the message
  content and the whole trace (the `fslm run --json` shape) rides along as `fslm_trace`. `stream: true` sends
  `chat.completion.chunk`s of the answer as it is generated, then `data: [DONE]`; the trace is on the last chunk.
- `GET /v1/models`, `GET /health`, `POST /v1/stack/run` (trace JSON), `POST|GET /v1/stack/stream` (SSE events
  `stage_start`, `token`, `stage_end`, `done`, `error`), `GET /` (the web page).

Generation happens on one worker thread (`fslm.web.scheduler.Scheduler`), which batches requests at the same stage.
Limits: bounded queue (503 + Retry-After), body size (413), API key (401), validation (400), per-request timeout
(504), Host header (421, against DNS rebinding), Content-Type (415). Errors are OpenAI-style
`{"error": {"message", "type", "param", "code"}}`; a 500 says nothing more than "internal error" (details go to the
server log).

Reading order: `create_app`, which wires one `Server` (what every request shares, the steps a request takes, one
method per route) into FastAPI; the reply helpers. The options are fslm.web.options, the Host check and the error
shape fslm.web.guard, request validation (`parse_chat`, `parse_run`) fslm.web.parse.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

from fslm.backends import cut_at_stop
from fslm.stack import Stack
from fslm.web.guard import ApiError, ClientGone, HostCheck
from fslm.web.options import ServeOptions
from fslm.web.parse import Ask, parse_chat, parse_run
from fslm.web.scheduler import Event, QueueFull, Scheduler


def create_app(stack: Stack, options: ServeOptions | None = None) -> Any:
    """The FastAPI app; its scheduler starts now and stops with the app (lifespan)."""
    server = Server(stack, options or ServeOptions())
    app = FastAPI(title="fslm", lifespan=server.lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.scheduler = server.scheduler
    app.state.stack = stack
    add_middleware(app, server.opts)
    add_error_handlers(app)
    add_routes(app, server)
    return app


def add_middleware(app: FastAPI, opts: ServeOptions) -> None:
    """CORS when origins are given, and the Host check, which is added last so that it runs first."""
    if opts.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(opts.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    app.add_middleware(HostCheck, allowed=tuple(opts.allowed_hosts))


def add_error_handlers(app: FastAPI) -> None:
    """Every error leaves as an OpenAI-style body, whatever raised it."""
    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(Exception, internal_error)
    app.add_exception_handler(ClientGone, client_gone)
    app.add_exception_handler(404, not_found)
    app.add_exception_handler(405, not_allowed)


def add_routes(app: FastAPI, server: Server) -> None:
    """The endpoints of the module docstring, each one a method of `server`."""
    app.get("/health")(server.health)
    app.get("/v1/models")(server.list_models)
    app.post("/v1/chat/completions")(server.chat_completions)
    app.post("/v1/stack/run")(server.stack_run)
    app.post("/v1/stack/stream")(server.stack_stream_post)
    app.get("/v1/stack/stream")(server.stack_stream_get)
    app.get("/", response_class=HTMLResponse)(server.index)


# --- error handlers --------------------------------------------------------------------------------------------


async def api_error(_: HttpRequest, e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


async def internal_error(_: HttpRequest, e: Exception) -> JSONResponse:
    # Nothing about the exception goes to the client (it may name files); the traceback goes to the log.
    body = ApiError(500, "internal error (details in the server log)", "server_error", code="internal_error")
    return JSONResponse(body.body(), status_code=500)


async def client_gone(_: HttpRequest, e: ClientGone) -> JSONResponse:
    return JSONResponse(ApiError(499, "client closed the request", code="client_closed").body(), status_code=499)


async def not_found(request: HttpRequest, _: Exception) -> JSONResponse:
    return JSONResponse(ApiError(404, f"no route {request.url.path}", code="not_found").body(), status_code=404)


async def not_allowed(request: HttpRequest, _: Exception) -> JSONResponse:
    e = ApiError(405, f"{request.method} is not allowed on {request.url.path}", code="method_not_allowed")
    return JSONResponse(e.body(), status_code=405)


# --- the server: what every request shares, the steps it takes, and the routes ---------------------------------


class Server:
    """The stack, the options and the scheduler that every route uses; one per app."""

    def __init__(self, stack: Stack, opts: ServeOptions) -> None:
        self.stack, self.opts = stack, opts
        self.scheduler = Scheduler(stack, max_queue=opts.max_queue, max_batch=opts.max_batch)
        self.model_name = stack.config.name
        self.started = time.time()

    @asynccontextmanager
    async def lifespan(self, _: Any) -> AsyncIterator[None]:
        yield
        await asyncio.to_thread(self.scheduler.close)

    # --- the steps of a request ---

    def authorize(self, request: HttpRequest) -> None:
        if self.opts.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.opts.api_key.encode()):
            raise ApiError(401, "missing or wrong API key (send Authorization: Bearer KEY)", "authentication_error",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})  # fmt: skip

    async def read_json(self, request: HttpRequest) -> Any:
        """The body as JSON, refusing more than `max_body` bytes whether or not Content-Length says so.

        Only `application/json`: a web page may POST text/plain to 127.0.0.1 without a CORS preflight, never JSON.
        """
        kind = request.headers.get("content-type", "")
        if kind.partition(";")[0].strip().lower() != "application/json":
            raise ApiError(415, f"Content-Type must be application/json, not {kind[:100]!r}",
                           code="unsupported_media_type")  # fmt: skip
        max_body = self.opts.max_body
        declared = request.headers.get("content-length")
        too_big = ApiError(413, f"request body larger than {max_body} bytes", code="request_too_large")
        if declared is not None and declared.isascii() and declared.isdigit() and len(declared) > 12:
            raise too_big
        if declared is not None and declared.isascii() and declared.isdigit() and int(declared) > max_body:
            raise too_big
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body:
                raise too_big
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except RecursionError:
            raise ApiError(400, "the body is not valid JSON: nested too deeply", code="invalid_json") from None
        except (ValueError, UnicodeDecodeError) as e:  # incl. integers of more than 4,300 digits
            raise ApiError(400, f"the body is not valid JSON: {str(e)[:200]}", code="invalid_json") from None

    def submit(self, req: Ask, tokens: bool) -> tuple[Any, asyncio.Queue[Event]]:
        try:
            loop = asyncio.get_running_loop()
            return self.scheduler.submit(req.instruction, req.input, req.max_tokens, loop, tokens, final=req.final)
        except QueueFull:
            raise ApiError(503, f"the server is busy ({self.opts.max_queue} requests queued); retry later",
                           "server_error", code="queue_full",
                           headers={"Retry-After": str(self.opts.retry_after)}) from None  # fmt: skip

    async def events(self, job: Any, queue: asyncio.Queue[Event]) -> AsyncIterator[Event]:
        """The job's events until done/error, raising ApiError(504) past the request's deadline."""
        deadline = job.created + self.opts.timeout
        try:
            while True:
                remaining = deadline - time.monotonic()
                try:
                    event = await asyncio.wait_for(queue.get(), timeout=max(remaining, 0.001))
                except TimeoutError:
                    raise ApiError(504, f"the request took longer than {self.opts.timeout:g} s", "server_error",
                                   code="timeout") from None  # fmt: skip
                yield event
                if event[0] in ("done", "error"):
                    return
        finally:
            self.scheduler.cancel(job)

    async def trace_of(self, req: Ask) -> dict[str, Any]:
        job, queue = self.submit(req, tokens=False)
        async for kind, data in self.events(job, queue):
            if kind == "done":
                return data
            if kind == "error":
                raise job_error(data)
        raise AssertionError("unreachable")

    async def traces_of(self, request: HttpRequest, req: Ask) -> list[dict[str, Any]]:
        """`req.n` whole runs, batched by the scheduler; all dropped as soon as the client goes away."""
        runs = [asyncio.ensure_future(self.trace_of(req)) for _ in range(req.n)]
        work = asyncio.gather(*runs)
        gone = asyncio.ensure_future(disconnected(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            for run in runs:  # the client left, or one run failed: cancelling takes the jobs out of the scheduler
                run.cancel()
        if not work.done():
            await asyncio.gather(work, return_exceptions=True)
            raise ClientGone
        return work.result()

    # --- routes ---

    async def health(self) -> dict[str, Any]:
        return {"status": "ok", "model": self.model_name, "stages": self.stack.config.stage_names,
                "queued": self.scheduler.pending, "max_queue": self.opts.max_queue,
                "uptime_s": round(time.time() - self.started, 1)}  # fmt: skip

    async def list_models(self, request: HttpRequest) -> dict[str, Any]:
        self.authorize(request)
        config = self.stack.config
        card = {"id": self.model_name, "object": "model", "created": int(self.started), "owned_by": "fslm",
                "stages": config.stage_names, "base": config.base.model}  # fmt: skip
        return {"object": "list", "data": [card]}

    async def chat_completions(self, request: HttpRequest) -> Any:
        self.authorize(request)
        stage_stop = self.stack.config.final_stage.generation.stop
        req = parse_chat(await self.read_json(request), self.opts.max_tokens, self.model_name, stage_stop)
        reply = ChatReply(f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time()), req.model)
        if not req.stream:
            return await self.chat_completion(request, req, reply)
        job, queue = self.submit(req, tokens=True)  # before the response starts: a full queue is still a 503
        chunks = self.chat_chunks(req, reply, job, queue)
        return StreamingResponse(chunks, media_type="text/event-stream", headers=SSE_HEADERS)

    async def chat_completion(self, request: HttpRequest, req: Ask, reply: ChatReply) -> dict[str, Any]:
        """The whole answer (`req.n` of them) in one `chat.completion`."""
        traces = await self.traces_of(request, req)
        choices = [{"index": i, "message": {"role": "assistant", "content": t["answer"]},
                    "finish_reason": finish_reason(t, req.max_tokens, self.stack)} for i, t in enumerate(traces)]  # fmt: skip
        if req.n > 1:
            for choice, t in zip(choices, traces, strict=True):
                choice["fslm_trace"] = t
        total = usage(*traces)
        return {"id": reply.id, "object": "chat.completion", "created": reply.created, "model": reply.model,
                "choices": choices, "usage": total, "fslm_trace": traces[0]}  # fmt: skip

    async def chat_chunks(
        self, req: Ask, reply: ChatReply, job: Any, queue: asyncio.Queue[Event]
    ) -> AsyncIterator[str]:
        """The answer stage's text as `chat.completion.chunk`s, never sending what a stop string will cut."""
        last = self.stack.config.stage_names[-1]
        stop = (req.final or {}).get("stop", self.stack.config.final_stage.generation.stop)
        yield reply.chunk({"role": "assistant", "content": ""})
        raw, sent = "", ""
        try:
            async for kind, data in self.events(job, queue):
                if kind == "token" and data["stage"] == last:
                    raw += data["delta"]
                    text = answer_so_far(raw, stop)
                    if len(text) > len(sent) and text.startswith(sent):
                        yield reply.chunk({"content": text[len(sent) :]})
                        sent = text
                elif kind == "done":
                    answer = data["answer"]
                    if answer.startswith(sent) and len(answer) > len(sent):
                        yield reply.chunk({"content": answer[len(sent) :]})
                    reason = finish_reason(data, req.max_tokens, self.stack)
                    yield reply.chunk({}, reason, usage=usage(data), fslm_trace=data)
                elif kind == "error":
                    yield f"data: {json.dumps(job_error(data).body())}\n\n"
        except ApiError as e:
            yield f"data: {json.dumps(e.body())}\n\n"
        yield "data: [DONE]\n\n"

    async def stack_run(self, request: HttpRequest) -> dict[str, Any]:
        self.authorize(request)
        return (await self.traces_of(request, parse_run(await self.read_json(request), self.opts.max_tokens)))[0]

    async def stack_stream_post(self, request: HttpRequest) -> Any:
        self.authorize(request)
        return self.stream_events(parse_run(await self.read_json(request), self.opts.max_tokens))

    async def stack_stream_get(self, request: HttpRequest) -> Any:
        self.authorize(request)
        return self.stream_events(parse_run(dict(request.query_params), self.opts.max_tokens, from_query=True))

    def stream_events(self, req: Ask) -> StreamingResponse:
        job, queue = self.submit(req, tokens=True)  # before the response starts: a full queue is still a 503
        return StreamingResponse(self.stage_events(job, queue), media_type="text/event-stream", headers=SSE_HEADERS)

    async def stage_events(self, job: Any, queue: asyncio.Queue[Event]) -> AsyncIterator[str]:
        """The job's events as SSE; a failure is an `error` event with a message that names nothing internal."""
        try:
            async for kind, data in self.events(job, queue):
                if kind == "error":
                    e = job_error(data)
                    data = {"message": e.message, "status": e.status}
                yield f"event: {kind}\ndata: {json.dumps(data)}\n\n"
        except ApiError as e:
            yield f"event: error\ndata: {json.dumps({'message': e.message, 'status': e.status})}\n\n"

    async def index(self) -> str:
        return resources.files("fslm").joinpath("web/index.html").read_text(encoding="utf-8")


@dataclass
class ChatReply:
    """What every part of one chat reply repeats: its id, creation time and model name."""

    id: str
    created: int
    model: str

    def chunk(self, delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
        body = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}  # fmt: skip
        return f"data: {json.dumps(body)}\n\n"


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def job_error(data: dict[str, Any]) -> ApiError:
    """A failed job as an ApiError; a server-side failure says no more than that (the worker logged the details)."""
    if data["status"] >= 500:
        return ApiError(data["status"], "generation failed (details in the server log)", "server_error",
                        code="internal_error")  # fmt: skip
    return ApiError(data["status"], data["message"], data["type"])


async def disconnected(request: HttpRequest) -> None:
    """Return once the client has closed the connection (the body is already read, so only that message is left)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


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


def usage(*traces: dict[str, Any]) -> dict[str, int]:
    prompt = sum(s["prompt_tokens"] for t in traces for s in t["stages"])
    completion = sum(s["output_tokens"] for t in traces for s in t["stages"])
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
