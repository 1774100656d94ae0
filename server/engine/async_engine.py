"""`AsyncEngine`: the engine loop thread that owns the device, around the synchronous `LLMEngine`
(llm_engine.py). Requests and aborts reach the thread through a queue; outputs go back to each
caller's asyncio loop with `call_soon_threadsafe`; each step's `StepStats` go to `step_observer`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable

from transformers import PreTrainedTokenizerBase

from leanserve.models.weights_source import resolve_model_dir
from leanserve.server.engine.config import EngineConfig
from leanserve.server.engine.llm_engine import EngineStats, LLMEngine, StepStats
from leanserve.server.engine.outputs import RequestOutput, RequestTimings, SampleDelta
from leanserve.server.engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class AsyncEngine:
    """`LLMEngine` behind one loop thread that owns the device. Thread-safe entry points put commands on
    a queue and wake the loop; each request's outputs are delivered to the asyncio loop that added it."""

    def __init__(self, engine: LLMEngine, model_name: str) -> None:
        self.engine = engine
        self.tokenizer: PreTrainedTokenizerBase = engine.tokenizer
        self.model_name = model_name
        self.max_model_len = engine.max_model_len
        self.grammar = engine.grammar  # compiles structured-output grammars (thread-safe, no engine work)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._streams_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = False  # no new requests
        self._stop = False  # loop exits
        self.last_error: str | None = None
        # Called on the engine thread after every step (the HTTP layer records its metrics); keep it short.
        self.step_observer: Callable[[StepStats], None] | None = None

    @classmethod
    def from_config(cls, config: EngineConfig) -> AsyncEngine:
        engine = LLMEngine.from_config(config)
        name = config.served_model_name or resolve_model_dir(config.model).name
        return cls(engine, name)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="leanserve-engine", daemon=True)
        self._thread.start()

    def add_requests(
        self,
        prompts: dict[str, list[int]],
        params: SamplingParams,
        arrival_time: float | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Start one engine request per (request id, prompt), all with `params`: the prompts of one HTTP
        request. Their outputs come in one stream, in the order the engine makes them, until every one has
        finished. All start or none: an InvalidParameter about any prompt (named by its position when
        there are several) starts none. The engine keeps the prompt lists (the caller hands them over)."""
        if self._stopping:
            raise RuntimeError("the engine is shutting down")
        for i, prompt in enumerate(prompts.values()):
            name = "the prompt" if len(prompts) == 1 else f"prompt[{i}]"
            self.engine.validate(prompt, params, name)  # reads only immutable settings: safe here
        stream: asyncio.Queue = asyncio.Queue()
        with self._streams_lock:
            if taken := self._streams.keys() & prompts.keys():
                raise ValueError(f"duplicate request id {taken.pop()!r}")
            self._streams.update(dict.fromkeys(prompts, (asyncio.get_running_loop(), stream)))
        # One command, so that the engine admits them in the same step.
        self._send(("add", dict(prompts), params, arrival_time or time.monotonic()))
        return self._iterate(list(prompts), stream)

    async def _iterate(self, request_ids: list[str], stream: asyncio.Queue) -> AsyncIterator[RequestOutput]:
        unfinished = set(request_ids)
        try:
            while unfinished:
                output: RequestOutput = await stream.get()
                if output.finished:
                    unfinished.discard(output.request_id)
                yield output
        finally:
            for request_id in unfinished:  # the consumer went away (client disconnect): free their blocks
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._send(("abort", request_id))

    def _send(self, command: tuple) -> None:
        self._inbox.put(command)
        self._wakeup.set()

    def stats(self) -> EngineStats:
        alive = self._thread is not None and self._thread.is_alive()
        return self.engine.stats(loop_alive=alive, last_error=self.last_error)

    async def shutdown(self, grace_seconds: float) -> None:
        """Stop admitting, let in-flight requests finish for up to `grace_seconds`, abort the rest."""
        self._stopping = True
        deadline = time.monotonic() + grace_seconds
        while self._streams and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        with self._streams_lock:
            remaining = list(self._streams)
        for request_id in remaining:
            self.abort(request_id)
        self._stop = True
        self._wakeup.set()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
        self.engine.close()

    # -- the engine thread --------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            self._drain_inbox()
            if self._stop and not self.engine.has_work:
                return
            if not self.engine.has_work:
                self._wakeup.wait(timeout=0.5)
                self._wakeup.clear()
                continue
            try:
                outputs = self.engine.step()
                if self.step_observer is not None:
                    self.step_observer(self.engine.last_step)
            except Exception as e:  # a bug outside the model step: fail everything in flight, live on
                logger.exception("engine loop error")
                self.last_error = f"{type(e).__name__}: {e}"
                outputs = self.engine.fail_all(self.last_error)
            self._deliver(outputs)

    def _drain_inbox(self) -> None:
        outputs = []
        while True:
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                break
            if command[0] == "add":
                _, prompts, params, arrival = command
                with self._streams_lock:  # those aborted before they reached the engine are left out
                    wanted = [(rid, prompt) for rid, prompt in prompts.items() if rid in self._streams]
                for request_id, prompt in wanted:
                    try:
                        self.engine.add_request(request_id, prompt, params, arrival)
                    except Exception as e:
                        outputs.append(
                            _error_output(request_id, len(prompt), arrival, f"{type(e).__name__}: {e}")
                        )
            else:
                aborted = self.engine.abort(command[1])
                outputs += aborted
                if not any(o.request_id == command[1] for o in aborted):  # not in the engine: end the stream
                    with self._streams_lock:
                        self._streams.pop(command[1], None)
        self._deliver(outputs)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = {}
        with self._streams_lock:
            for output in outputs:
                target = self._streams.get(output.request_id)
                if target is None:
                    continue
                if output.finished:
                    del self._streams[output.request_id]
                by_loop.setdefault(target[0], []).append((target[1], output))
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):  # that event loop is closed: nobody listens any more
                loop.call_soon_threadsafe(_put_all, items)


def _put_all(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for stream, output in items:
        stream.put_nowait(output)


def _error_output(request_id: str, prompt_tokens: int, arrival: float, error: str) -> RequestOutput:
    return RequestOutput(
        request_id=request_id,
        samples=[SampleDelta(index=0, finish_reason="error")],
        finished=True,
        prompt_tokens=prompt_tokens,
        completion_tokens=0,
        attention_seconds=0.0,
        timings=RequestTimings(arrival, finished=time.monotonic()),
        error=error,
    )
