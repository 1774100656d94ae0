"""From the engine's stream of `RequestOutput`s to OpenAI answers (bodies built by server/renderers.py):
one JSON body, or SSE events with heartbeat comments, an optional usage chunk, an error event on failure
and `[DONE]`. Admission (bounded queue) and request-level metrics live here too."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pydantic import BaseModel

from server import metrics
from server.errors import APIError
from server.outputs import RequestOutput
from server.renderers import Renderer, SampleTotal, has_news, usage_of

if TYPE_CHECKING:
    from server.engine import AsyncEngine

DONE_EVENT = "data: [DONE]\n\n"
HEARTBEAT_EVENT = ": keep-alive\n\n"


@dataclass
class Admission:
    """Requests accepted but not yet generating (no output yet). Bounded: beyond `limit`, 429."""

    limit: int
    queued: int = 0

    def try_enter(self) -> bool:
        if self.queued >= self.limit:
            return False
        self.queued += 1
        return True


class RequestTracker:
    """Observes one request's metrics from HTTP arrival on and leaves its summary in `log_fields`.
    Every tracker leaves the admission queue exactly once: at its first output or when it ends."""

    def __init__(self, arrival: float, admission: Admission, log_fields: dict) -> None:
        self.arrival = arrival
        self.admission = admission
        self.log_fields = log_fields
        self.queued = True
        self.first_token: float | None = None
        self.last_token: float | None = None
        self.closed = False

    def _leave_queue(self) -> None:
        if self.queued:
            self.queued = False
            self.admission.queued -= 1

    def observe(self, out: RequestOutput) -> None:
        self._leave_queue()
        if not any(sample.token_ids for sample in out.samples):
            return
        now = time.monotonic()
        if self.first_token is None:
            self.first_token = now
            metrics.time_to_first_token.observe(now - self.arrival)
            self.log_fields["ttft_ms"] = round((now - self.arrival) * 1e3, 2)
        else:
            metrics.inter_token_latency.observe(now - self.last_token)
        self.last_token = now

    def discard(self) -> None:
        """The engine refused the request: it never ran, so it is no finished request either."""
        self.closed = True
        self._leave_queue()

    def close(self, finish_reason: str, out: RequestOutput | None) -> None:
        """`out` is the final output (None when the client went away first)."""
        if self.closed:
            return
        self.closed = True
        self._leave_queue()
        metrics.request_success.labels(finished_reason=finish_reason).inc()
        self.log_fields["finish_reason"] = finish_reason
        if out is None:
            return
        metrics.e2e_request_latency.observe(time.monotonic() - self.arrival)
        if out.timings.first_scheduled is not None:
            metrics.request_queue_time.observe(max(0.0, out.timings.first_scheduled - out.timings.arrival))
        metrics.request_attention.observe(out.attention_seconds)
        self.log_fields.update(
            prompt_tokens=out.prompt_tokens,
            completion_tokens=out.completion_tokens,
            attention_ms=round(out.attention_seconds * 1e3, 3),
        )


def request_finish_reason(out: RequestOutput) -> str:
    """One reason per request for metrics and logs: the worst of its samples."""
    reasons = {sample.finish_reason for sample in out.samples} | ({"error"} if out.error else set())
    return next((r for r in ("error", "abort", "length") if r in reasons), "stop")


def failure(out: RequestOutput) -> APIError | None:
    reason = request_finish_reason(out)
    if reason == "error":
        return APIError(500, f"the engine failed on this request: {out.error}", code="engine_error")
    if reason == "abort":
        return APIError(503, "the request was aborted (server shutting down)", code="aborted")
    return None


@dataclass
class Job:
    """One admitted generation and what its answer needs."""

    engine: AsyncEngine
    engine_id: str  # unique in the engine (clients may reuse X-Request-Id)
    response_id: str
    model: str
    n: int
    outputs: AsyncIterator[RequestOutput]
    tracker: RequestTracker
    include_usage: bool
    created: int = field(default_factory=lambda: int(time.time()))
    text_offsets: dict[int, int] = field(default_factory=dict)  # completions logprobs, per sample

    def abort(self) -> None:
        """Stop the request in the engine unless it has finished (the client went away, or we failed)."""
        if not self.tracker.closed:
            self.engine.abort(self.engine_id)
            self.tracker.close("abort", None)


def _event(model: BaseModel) -> str:
    return f"data: {model.model_dump_json()}\n\n"


async def _with_heartbeats(outputs: AsyncIterator[RequestOutput], interval: float):
    """Yields the outputs, and None after each `interval` seconds without one. The pending read is
    never cancelled by a heartbeat (that would end the engine's stream); only when we stop early."""
    pending: asyncio.Future | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(outputs))
            done, _ = await asyncio.wait({pending}, timeout=interval)
            if not done:
                yield None
                continue
            try:
                out = pending.result()
            except StopAsyncIteration:
                return
            pending = None
            yield out
    finally:
        if pending is not None:
            pending.cancel()


async def stream_events(job: Job, renderer: Renderer, heartbeat_seconds: float) -> AsyncIterator[str]:
    """SSE body. Whoever sends it calls `job.abort()` when it ends early (client disconnect)."""
    for chunk in renderer.opening(job):
        yield _event(chunk)
    async with aclosing(_with_heartbeats(job.outputs, heartbeat_seconds)) as outputs:
        async for out in outputs:
            if out is None:
                yield HEARTBEAT_EVENT
                continue
            job.tracker.observe(out)
            if out.finished:
                job.tracker.close(request_finish_reason(out), out)
                if (error := failure(out)) is not None:
                    yield error.sse_event()
                    break
            for delta in filter(has_news, out.samples):  # one chunk per choice, as OpenAI streams n > 1
                yield _event(renderer.chunk(job, delta))
            if out.finished and job.include_usage:
                yield _event(renderer.usage_chunk(job, usage_of(out)))
    yield DONE_EVENT


async def collect_response(job: Job, renderer: Renderer, disconnected: Awaitable[None]) -> BaseModel | None:
    """Whole answer of a non-streaming request; None if the client went away first. The caller calls
    `job.abort()` afterwards in any case (a no-op once the request has finished)."""

    totals: dict[int, SampleTotal] = {}

    async def consume() -> RequestOutput:
        last = None
        async for out in job.outputs:
            job.tracker.observe(out)
            for delta in out.samples:
                totals.setdefault(delta.index, SampleTotal()).add(delta)
            last = out
        assert last is not None and last.finished, "the engine's stream ended without a final output"
        return last

    consumer = asyncio.ensure_future(consume())
    watcher = asyncio.ensure_future(disconnected)
    try:
        await asyncio.wait({consumer, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        consumer.cancel()  # no-op when done
    if consumer.cancelled():
        return None
    final = consumer.result()
    job.tracker.close(request_finish_reason(final), final)
    if (error := failure(final)) is not None:
        raise error
    return renderer.response(job, totals, usage_of(final))
