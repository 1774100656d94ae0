"""The synchronous engine core: `LLMEngine.step()` is one iteration; async_engine.py loops it.

How a step flows (host = engine thread, device = GPU or CPU), with asynchronous scheduling:
  host:   Scheduler.schedule() picks decodes + prefill chunks under the token budget (may preempt); the
          sequences of the step still in flight carry a placeholder for the token it is sampling
  host:   ModelRunner builds ids / positions / slots / block tables (numpy, pinned, one copy each)
  device: placeholders resolved from the in-flight step's sampled ids, model forward (eager, or a
          CUDA-graph replay for pure-decode steps) -> logits of the rows that sample -> Sampler
          (penalties, top-k/p, seeds) -> token ids, all queued without a sync; prompts that are
          scored (prompt logprobs) get the logprobs of their chunk's positions too
  host:   one device->host copy of the previous step's ids (its only sync; the device is busy with the
          new step meanwhile), attention time from its timer reading; Scheduler.update_from_output fills
          the placeholders, checks stops and forks n>1 siblings; the OutputProcessor detokenizes, applies
          stop strings and builds RequestOutput deltas
Who owns what: Scheduler (+ BlockManager) the sequences' states and blocks, StepPipeline the device work
and the step in flight, OutputProcessor the text and the outputs; LLMEngine only orders their calls.
Without it (CPU default, or a step whose successor needs its tokens on the host) the previous step is
finished before the new one is scheduled."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from leanserve.server.engine.block_manager import BlockManager
from leanserve.server.engine.config import EngineConfig
from leanserve.server.engine.detokenizer import IncrementalDetokenizer
from leanserve.server.engine.engine_setup import load_engine_parts
from leanserve.server.engine.grammar import GrammarCompiler, accept_token
from leanserve.server.engine.model_runner import ModelRunner
from leanserve.server.engine.output_processor import OutputProcessor
from leanserve.server.engine.outputs import FinishReason, RequestOutput, RequestTimings
from leanserve.server.engine.request import Request, SeqStatus, Sequence
from leanserve.server.engine.sampler import Sampler
from leanserve.server.engine.sampling_params import InvalidParameter, SamplingParams
from leanserve.server.engine.scheduler import Scheduler
from leanserve.server.engine.step_pipeline import InFlightStep, StepPipeline
from leanserve.server.engine.warm_up import warm_up

logger = logging.getLogger(__name__)


@dataclass
class EngineStats:
    """The engine's state now (gauges) and its totals since it started (counters); the HTTP layer
    publishes them."""

    num_running: int
    num_waiting: int
    kv_usage: float
    free_blocks: int
    total_blocks: int
    prefix_cache_hits: int
    prefix_cache_queries: int
    num_preemptions: int
    prompt_tokens: int
    generation_tokens: int
    loop_alive: bool
    last_error: str | None


@dataclass
class StepStats:
    """What one `step()` did, for whoever observes steps (the HTTP layer's metrics)."""

    decode_attention_seconds: list[float]  # per decode step whose tokens this call collected (0 to 2)
    step_seconds: float  # wall time of the call
    sync_seconds: float  # of it, waiting for the device (the rest is host work the device did not hide)


class LLMEngine:
    """Scheduler + step pipeline + output processor, driven one `step()` at a time."""

    def __init__(
        self, config: EngineConfig, runner: ModelRunner, tokenizer, num_blocks: int, max_model_len: int
    ) -> None:
        self.config = config
        self.runner = runner
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.device = runner.device
        model_config = runner.model.config
        eos = set(model_config.eos_token_ids)
        if tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(
            self.block_manager,
            config.max_num_seqs,
            config.max_num_batched_tokens,
            max_model_len,
            frozenset(eos),
        )
        self.sampler = Sampler(model_config.vocab_size, self.device)
        self.pipeline = StepPipeline(runner, self.sampler, self.scheduler)
        self.output_processor = OutputProcessor(tokenizer, self.scheduler.finish)
        self.async_scheduling = (
            config.async_scheduling if config.async_scheduling is not None else self.device.type == "cuda"
        )
        self.grammar = GrammarCompiler(tokenizer, model_config.vocab_size, frozenset(eos))
        self.last_step = StepStats([], 0.0, 0.0)
        self._prompt_tokens = 0
        self._generation_tokens = 0

    @classmethod
    def from_config(cls, config: EngineConfig, time_attention: bool = True) -> LLMEngine:
        parts = load_engine_parts(config, time_attention)
        engine = cls(config, parts.runner, parts.tokenizer, parts.num_blocks, parts.max_model_len)
        if engine.device.type == "cuda":  # CPU runs no JIT-compiled kernels: nothing to warm
            warm_up(parts.runner, engine.sampler, config, parts.max_model_len)
        return engine

    # -- requests ----------------------------------------------------------------------------------
    @property
    def requests(self) -> dict[str, Request]:
        """Unfinished requests by id."""
        return self.output_processor.requests

    def validate(self, prompt_token_ids: list[int], params: SamplingParams, name: str = "the prompt") -> None:
        """Raise InvalidParameter (a message for the client, naming "prompt" or "max_tokens"; `name` is
        how the message calls the prompt) for a request that can never run. The one check of a request
        against the model and the cache."""
        if not prompt_token_ids:
            raise InvalidParameter("prompt", f"{name} is empty")
        vocab = self.runner.model.config.vocab_size
        if any(not 0 <= t < vocab for t in prompt_token_ids):
            raise InvalidParameter("prompt", f"{name} has token ids outside [0, {vocab})")
        prompt_len, context = len(prompt_token_ids), self.max_model_len
        if prompt_len >= context:
            raise InvalidParameter(
                "prompt", f"{name} is {prompt_len} tokens; the context holds {context} with the output"
            )
        total = prompt_len + params.max_tokens
        if total > context:
            raise InvalidParameter(
                "max_tokens",
                f"{name} ({prompt_len} tokens) + max_tokens ({params.max_tokens}) > context ({context})",
            )
        if self.block_manager.blocks_needed(total) > self.block_manager.pool.num_blocks:
            raise InvalidParameter(
                "max_tokens", f"the request needs {total} tokens of KV cache, more than the whole cache holds"
            )

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        arrival_time: float | None = None,
    ) -> Request:
        """Start a request; the engine keeps `prompt_token_ids` (the caller hands it over)."""
        self.validate(prompt_token_ids, params)
        if request_id in self.requests:
            raise ValueError(f"duplicate request id {request_id!r}")
        request = Request(
            request_id, prompt_token_ids, params, RequestTimings(arrival_time or time.monotonic())
        )
        self.output_processor.add_request(request)
        self.scheduler.add(self._new_sequence(request, 0))
        return request

    def _new_sequence(self, request: Request, index: int) -> Sequence:
        params = request.params
        generator = None
        if params.seed is not None:
            generator = torch.Generator(self.device).manual_seed(params.seed + index)
        detok = IncrementalDetokenizer(
            self.tokenizer,
            request.prompt_token_ids,
            params.stop,
            skip_special_tokens=params.skip_special_tokens,
            min_tokens=params.min_tokens,
            include_stop=params.include_stop_str_in_output,
        )
        seq = Sequence(request, index, list(request.prompt_token_ids), detok, generator)
        if params.grammar is not None:
            seq.grammar = params.grammar.deep_copy()
        request.sequences.append(seq)
        return seq

    def abort(self, request_id: str) -> list[RequestOutput]:
        """Finish a request now (idempotent). Returns the outputs still pending from the last step, then
        the aborted request's final output (nothing of it if unknown or already finished)."""
        outputs = self.output_processor.process()
        request = self.requests.get(request_id)
        if request is not None:
            self._finish_request(request, "abort")
            outputs.append(self.output_processor.drain(request))
        return outputs

    def _finish_request(self, request: Request, reason: FinishReason, error: str | None = None) -> None:
        request.error = error
        for _ in range(len(request.sequences), request.params.n):  # siblings never forked
            self._new_sequence(request, len(request.sequences)).status = SeqStatus.FINISHED
        for seq in request.sequences:
            if not seq.finished:
                self.scheduler.finish(seq, reason)

    @property
    def has_work(self) -> bool:
        return (
            self.scheduler.has_work
            or self.output_processor.has_pending
            or self.pipeline.in_flight is not None
        )

    # -- the step -----------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule and launch one step, then finish the step before it and return outputs.

        With asynchronous scheduling (the default on CUDA) step N+1 is scheduled and launched before the
        host has read step N's tokens. The host then waits for step N, applies its tokens and stop checks,
        and detokenizes them while the device runs step N+1, so the device never waits for host work. A
        sequence that step N finishes has a wasted row in step N+1, whose token is dropped. Where step
        N+1 has constrained rows, their masks need step N's tokens: step N is collected after step N+1's
        forward pass is queued and before its sampling (StepPipeline.launch). The engine finishes step N
        within its own call when step N+1 will need its tokens on the host before its launch (penalties
        read the output tokens; n > 1 siblings fork after their first token); then step N's text comes
        with the next call's outputs, as the detokenization overlaps the next step."""
        started = time.perf_counter()
        self.pipeline.sync_seconds = 0.0
        decode_attention: list[float] = []
        outputs: list[RequestOutput] = []
        launched = self._launch(self.scheduler.schedule(), outputs, decode_attention)
        if self.pipeline.in_flight is not None:  # the device runs `launched` meanwhile
            self._complete(self.pipeline.in_flight, outputs, decode_attention)
        outputs += self.output_processor.process()  # detokenization overlaps `launched` too
        self.pipeline.in_flight = launched
        if launched is not None and (not self.async_scheduling or launched.needs_host_tokens):
            self._complete(launched, outputs, decode_attention)  # its text follows with the next outputs
            if not self.scheduler.has_work:
                outputs += self.output_processor.process()
        self.last_step = StepStats(
            decode_attention, time.perf_counter() - started, self.pipeline.sync_seconds
        )
        return outputs

    def _launch(
        self, step, outputs: list[RequestOutput], decode_attention: list[float]
    ) -> InFlightStep | None:
        if step.is_empty:
            return None
        now = time.monotonic()
        for seq in step.seqs:
            if seq.request.timings.first_scheduled is None:
                seq.request.timings.first_scheduled = now
        try:
            return self.pipeline.launch(
                step,
                self._new_sequence,
                lambda: self._complete(self.pipeline.in_flight, outputs, decode_attention),
            )
        except Exception as e:  # a failing step fails its own requests; the engine goes on
            outputs += self._fail(step.seqs, e)
            return None

    def _complete(
        self, flight: InFlightStep, outputs: list[RequestOutput], decode_attention: list[float]
    ) -> None:
        """Wait for `flight`'s tokens and apply them (text is left to the output processor); its decode
        attention time goes to `decode_attention`."""
        self.pipeline.in_flight = None
        try:
            token_ids = self.pipeline.collect(flight)
        except Exception as e:
            outputs += self._fail(flight.step.seqs + flight.forked, e)
            return
        self.scheduler.step_done(flight.computed)
        if (seconds := flight.attention.attribute()) is not None:
            decode_attention.append(seconds)
        update = self.scheduler.update_from_output(
            flight.row_seqs, flight.positions, flight.forked, token_ids
        )
        self.runner.copy_blocks(update.block_copies)
        for _, seq, token_id in update.appended:
            # A constrained sequence ends when its grammar is complete (only EOS could follow).
            constrained = seq.grammar is not None and token_id is not None and not seq.finished
            if constrained and accept_token(seq.grammar, token_id):
                self.scheduler.finish(seq, "stop")
        self.output_processor.add_step(flight, update.appended)
        self._prompt_tokens += update.prompt_tokens
        self._generation_tokens += update.generated_tokens

    def _fail(self, seqs: list[Sequence], error: Exception) -> list[RequestOutput]:
        logger.error("engine step failed", exc_info=error)
        failed = {seq.request for seq in seqs}
        for request in failed:
            self._finish_request(request, "error", f"{type(error).__name__}: {error}")
        return [self.output_processor.drain(r) for r in failed]

    def fail_all(self, error: str) -> list[RequestOutput]:
        """End every request with an error (the engine loop hit a bug outside a step)."""
        self.pipeline.in_flight = None
        self.output_processor.drop_pending()
        requests = list(self.requests.values())
        for request in requests:
            self._finish_request(request, "error", error)
        return [self.output_processor.drain(r) for r in requests]

    def close(self) -> None:
        """Release what outlives the object: the tensor-parallel worker processes, if any."""
        self.runner.close()

    def stats(self, loop_alive: bool = True, last_error: str | None = None) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_usage=bm.usage,
            free_blocks=bm.num_free_blocks,
            total_blocks=bm.pool.num_blocks,
            prefix_cache_hits=bm.prefix_hits,
            prefix_cache_queries=bm.prefix_queries,
            num_preemptions=self.scheduler.num_preemptions,
            prompt_tokens=self._prompt_tokens,
            generation_tokens=self._generation_tokens,
            loop_alive=loop_alive,
            last_error=last_error,
        )
