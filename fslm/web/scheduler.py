"""The server's scheduler: requests advance stage by stage, and requests waiting at the same stage run as one batch.

A request is a `Job` (its trace so far = which stage it is at and every earlier output). One worker thread owns the
model (transformers models are not thread-safe): each step it takes the earliest stage any job waits at, gathers
every job waiting at that stage (same effective max_new_tokens) and runs the stage for them with `Stack.run_stage`,
one `generate` call: one adapter switch, one batched forward per token. A job then moves on to
its next stage; running the earliest stage first lets late arrivals catch up with requests ahead of them, so the
groups merge (a job passed over 2 x stages times goes first instead, so nothing starves). N concurrent requests
cost about one request's number of generate calls, and throughput grows with concurrency until a batch saturates
the CPU/GPU.

Events go back to the asyncio side through `loop.call_soon_threadsafe` onto the job's queue.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fslm.config import GenerationSettings
from fslm.errors import FslmError
from fslm.stack import Stack, Trace

log = logging.getLogger("fslm")
Event = tuple[str, dict[str, Any]]  # (stage_start | token | stage_end | done | error, payload)


class QueueFull(Exception):
    """The bounded queue is full; the HTTP layer answers 503 with Retry-After."""


@dataclass
class Job:
    trace: Trace
    max_tokens: int | None
    emit: Callable[[Event], None]
    tokens: bool = True  # wants `token` events (streaming); without them the backend need not stream
    id: int = 0
    stage: int = 0  # index of the next stage to run
    skipped: int = 0  # steps run without this job since it last ran
    cancelled: bool = False
    created: float = field(default_factory=time.monotonic)
    final: dict[str, Any] = field(default_factory=dict)  # the request's overrides of the last stage's generation


class Scheduler:
    """Holds every admitted job; one worker thread runs the batches. `max_queue` bounds admitted jobs."""

    def __init__(self, stack: Stack, max_queue: int = 64, max_batch: int = 32) -> None:
        self.stack = stack
        self.max_queue = max_queue
        self.max_batch = max_batch
        self.jobs: list[Job] = []
        self.patience = 2 * len(stack.config.stages)  # steps a job may be passed over before it goes first
        self.cond = threading.Condition()
        self.ids = itertools.count(1)
        self.stopping = False
        self.batches: list[tuple[str, int, float]] = []  # (stage, batch size, seconds) of recent steps
        self.thread = threading.Thread(target=self._work, name="fslm-generate", daemon=True)
        self.thread.start()

    # --- the asyncio side ---------------------------------------------------------------------------

    def submit(
        self,
        instruction: str,
        input: str | None,
        max_tokens: int | None,
        loop: asyncio.AbstractEventLoop,
        tokens: bool = True,
        final: dict[str, Any] | None = None,
    ) -> tuple[Job, asyncio.Queue[Event]]:
        """Admit a request or raise QueueFull; its events arrive on the returned asyncio queue."""
        queue: asyncio.Queue[Event] = asyncio.Queue()

        def emit(event: Event) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, event)
            except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
                pass

        job = Job(Trace(instruction=instruction, input=input), max_tokens, emit, tokens, final=dict(final or {}))
        with self.cond:
            if len(self.jobs) >= self.max_queue:
                raise QueueFull
            job.id = next(self.ids)
            self.jobs.append(job)
            self.cond.notify()
        return job, queue

    def cancel(self, job: Job) -> None:
        """Drop a job (client gone or timed out); a batch already running finishes without it."""
        with self.cond:
            job.cancelled = True
            if job in self.jobs:
                self.jobs.remove(job)

    @property
    def pending(self) -> int:
        with self.cond:
            return len(self.jobs)

    def close(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        self.thread.join(timeout=30)

    # --- the worker thread --------------------------------------------------------------------------

    def _next_batch(self) -> list[Job] | None:
        with self.cond:
            while not self.jobs and not self.stopping:
                self.cond.wait()
            if self.stopping:
                return None
            # The earliest stage goes first, so requests that arrived later catch up with those ahead and the
            # two groups merge into one batch at the next stage; a job skipped too often goes first (no starvation).
            starved = max(self.jobs, key=lambda j: (j.skipped, -j.created))
            if starved.skipped >= self.patience:
                first = starved
            else:
                first = min(self.jobs, key=lambda j: (j.stage, j.created))
            key = (first.stage, self._settings(first))
            batch = sorted((j for j in self.jobs if (j.stage, self._settings(j)) == key), key=lambda j: j.created)
            batch = batch[: self.max_batch]
            chosen = {id(j) for j in batch}
            for job in self.jobs:
                job.skipped = 0 if id(job) in chosen else job.skipped + 1
            return batch

    def _max_new(self, job: Job) -> int:
        stage = self.stack.config.stages[job.stage]
        limit = stage.generation.max_new_tokens
        return limit if job.max_tokens is None else min(limit, job.max_tokens)

    def _settings(self, job: Job) -> GenerationSettings:
        """How the job's next stage decodes: max_tokens capped, and the request's overrides on the last stage."""
        update: dict[str, Any] = {"max_new_tokens": self._max_new(job)}
        if job.final and job.stage == len(self.stack.config.stages) - 1:
            update.update(job.final)
        return self.stack.config.stages[job.stage].generation.model_copy(update=update)

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            try:
                self._step(batch)
            except FslmError as e:
                if len(batch) > 1:  # one bad request (e.g. too long for the context) must not fail its batch-mates
                    for job in batch:
                        self._run_alone(job)
                else:
                    self._fail(batch[0], str(e), "invalid_request_error", 400)
            except Exception as e:  # noqa: BLE001 - the worker must survive anything a request triggers
                log.exception("generation failed")
                for job in batch:
                    self._fail(job, f"generation failed: {type(e).__name__}: {e}", "server_error", 500)

    def _run_alone(self, job: Job) -> None:
        try:
            self._step([job])
        except FslmError as e:
            self._fail(job, str(e), "invalid_request_error", 400)
        except Exception as e:  # noqa: BLE001
            log.exception("generation failed")
            self._fail(job, f"generation failed: {type(e).__name__}: {e}", "server_error", 500)

    def _fail(self, job: Job, message: str, kind: str, status: int) -> None:
        with self.cond:
            if job in self.jobs:
                self.jobs.remove(job)
        job.emit(("error", {"message": message, "type": kind, "status": status}))

    def _step(self, batch: list[Job]) -> None:
        """Run one stage for a batch of jobs that are all at that stage."""
        stack = self.stack
        stage = stack.config.stages[batch[0].stage]
        settings = self._settings(batch[0])
        adapter = stack.stage_adapter(stage.name)
        for job in batch:
            job.emit(("stage_start", {"stage": stage.name, "index": job.stage, "adapter": adapter}))

        def on_text(row: int, delta: str) -> None:
            job = batch[row]
            if job.tokens and not job.cancelled:
                job.emit(("token", {"stage": stage.name, "delta": delta}))

        stream = on_text if any(j.tokens for j in batch) else None
        results = stack.run_stage(stage, [j.trace for j in batch], adapter=adapter, settings=settings, on_text=stream)
        self.batches = [*self.batches[-999:], (stage.name, len(batch), results[0].seconds)]
        last = len(stack.config.stages) - 1
        with self.cond:
            for job, result in zip(batch, results, strict=True):
                job.trace.stages.append(result)
                payload = {k: v for k, v in result.__dict__.items() if k != "prompt"}
                job.emit(("stage_end", payload))
                if job.stage == last:
                    if job in self.jobs:
                        self.jobs.remove(job)
                    job.emit(("done", job.trace.to_dict()))
                else:
                    job.stage += 1
