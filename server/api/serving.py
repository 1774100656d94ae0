"""From the engine's stream of `RequestOutput`s to OpenAI answers (bodies built by server/renderers.py):
one JSON body, or SSE events with heartbeat comments, an optional usage chunk, an error event on failure
and `[DONE]`. The prompts of a batch run as one engine request each, merged here into one request.
Admission (bounded queue) and request-level metrics live here too."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from pydantic import BaseModel

from leanserve.server.api import metrics
from leanserve.server.api.errors import APIError
from leanserve.server.api.renderers import Answer, Renderer, SampleTotal, has_news, usage_of
from leanserve.server.engine.outputs import RequestOutput, RequestTimings

if TYPE_CHECKING:
    from leanserve.server.engine.async_engine import AsyncEngine

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
        self.finish_reasons: set[str] = set()  # of the choices that have finished
        self.closed = False

    def _leave_queue(self) -> None:
        if self.queued:
            self.queued = False
            self.admission.queued -= 1

    def observe(self, out: RequestOutput) -> None:
        self._leave_queue()
        self.finish_reasons.update(s.finish_reason for s in out.samples if s.finish_reason is not None)
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
        """`out` is the final output (None when the client went away first). The request counts once,
        with the worst reason of all its choices (earlier outputs finished some of them)."""
        if self.closed:
            return
        finish_reason = _worst(self.finish_reasons | {finish_reason})
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
    """One reason for an output: the worst of its samples'."""
    return _worst({sample.finish_reason for sample in out.samples} | ({"error"} if out.error else set()))


def _worst(reasons: set) -> str:
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
    """One admitted generation: an engine request per prompt, each with `n` samples, answered as one
    request whose choice `i * n + j` is sample j of prompt i (OpenAI's order for a batch of prompts)."""

    engine: AsyncEngine
    engine_ids: list[str]  # one per prompt, unique in the engine (clients may reuse X-Request-Id)
    answer: Answer  # what the renderers build the response from
    engine_outputs: AsyncIterator[RequestOutput]  # those of every engine id, as the engine makes them
    tracker: RequestTracker
    include_usage: bool
    unfinished: set[str] = field(init=False)  # engine ids whose final output has not come
    outputs: AsyncIterator[RequestOutput] = field(init=False)  # the request's, merged over its prompts

    def __post_init__(self) -> None:
        self.unfinished = set(self.engine_ids)
        self.outputs = self._merged()

    def abort(self) -> None:
        """Stop what still runs of the request in the engine (the client went away, we failed, or one of
        its prompts failed); a no-op once every prompt has finished."""
        for engine_id in self.unfinished:
            self.engine.abort(engine_id)
        self.unfinished.clear()
        self.tracker.close("abort", None)  # no-op when closed already

    async def _merged(self) -> AsyncIterator[RequestOutput]:
        """The engine's outputs as those of one request: samples renumbered as choices, counts summed
        over the prompts. The first prompt that fails (error, or aborted at shutdown) ends the request;
        `abort()`, which whoever answers calls at the end, stops the others."""
        n = self.answer.n
        first_choice = {engine_id: i * n for i, engine_id in enumerate(self.engine_ids)}
        latest: dict[str, RequestOutput] = {}
        async for out in self.engine_outputs:
            if out.finished:
                self.unfinished.discard(out.request_id)
            if out.prompt_logprobs is not None:
                self.answer.prompt_logprobs[first_choice[out.request_id] // n] = out.prompt_logprobs
            if len(self.engine_ids) == 1:  # already the request's (and the hot path: no copies)
                yield out
                continue
            latest[out.request_id] = out
            failed = out.finished and failure(out) is not None
            offset, outs = first_choice[out.request_id], latest.values()
            yield RequestOutput(
                request_id=self.answer.response_id,
                samples=[replace(s, index=offset + s.index) for s in out.samples] if offset else out.samples,
                finished=failed or not self.unfinished,
                prompt_tokens=sum(o.prompt_tokens for o in outs),  # each prompt once, whatever n is
                completion_tokens=sum(o.completion_tokens for o in outs),
                attention_seconds=sum(o.attention_seconds for o in outs),
                timings=_span([o.timings for o in outs]),
                cached_prompt_tokens=sum(o.cached_prompt_tokens for o in outs),
                error=out.error,
            )
            if failed:
                return


def _span(timings: list[RequestTimings]) -> RequestTimings:
    """The timings of a request made of several engine requests: its first start, its last end."""

    def first(values: list[float | None]) -> float | None:
        return min((v for v in values if v is not None), default=None)

    finished = [t.finished for t in timings]
    return RequestTimings(
        arrival=min(t.arrival for t in timings),
        first_scheduled=first([t.first_scheduled for t in timings]),
        first_token=first([t.first_token for t in timings]),
        finished=None if None in finished else max(finished),
    )


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
    for chunk in renderer.opening(job.answer):
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
                yield _event(renderer.chunk(job.answer, delta))
            if out.finished and job.include_usage:
                yield _event(renderer.usage_chunk(job.answer, usage_of(out)))
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
        if not consumer.done():  # the client went away first (or we are cancelled): stop reading
            consumer.cancel()
            # cancel() only asks: wait until the consumer has stopped, so that nothing reads its result
            # while it is pending (InvalidStateError: a 500 and tracebacks for a mere disconnect).
            await asyncio.wait({consumer})
    if consumer.cancelled():
        return None
    final = consumer.result()
    job.tracker.close(request_finish_reason(final), final)
    if (error := failure(final)) is not None:
        raise error
    return renderer.response(job.answer, totals, usage_of(final))
