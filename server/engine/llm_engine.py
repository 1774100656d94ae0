"""The synchronous engine core: `LLMEngine.step()` is one iteration; server/engine.py loops it.

How a step flows (host = engine thread, device = GPU or CPU), with asynchronous scheduling:
  host:   Scheduler.schedule() picks decodes + prefill chunks under the token budget (may preempt); the
          sequences of the step still in flight carry a placeholder for the token it is sampling
  host:   ModelRunner builds ids / positions / slots / block tables (numpy, pinned, one copy each)
  device: placeholders resolved from the in-flight step's sampled ids, model forward (eager, or a
          CUDA-graph replay for pure-decode steps) -> logits of the rows that sample -> Sampler
          (penalties, top-k/p, seeds) -> token ids, all queued without a sync; prompts that are
          scored (prompt logprobs) get the logprobs of their chunk's positions too
  host:   one device->host copy of the previous step's ids (its only sync; the device is busy with the
          new step meanwhile), attention time from its timer reading, then per sequence: fill the
          placeholder, stop checks, fork n>1 siblings; then detokenize and build RequestOutput deltas
Without it (CPU default, or a step whose successor needs its tokens on the host) the previous step is
finished before the new one is scheduled."""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass

import torch

from leanserve.models.attention import AttentionReading
from leanserve.server.api import metrics
from leanserve.server.engine.block_manager import BlockManager
from leanserve.server.engine.config import EngineConfig
from leanserve.server.engine.detokenizer import IncrementalDetokenizer
from leanserve.server.engine.engine_setup import load_engine_parts
from leanserve.server.engine.model_runner import ModelRunner
from leanserve.server.engine.output_builder import drain_output, logprob_entries, token_texts
from leanserve.server.engine.outputs import FinishReason, RequestOutput, RequestTimings, TokenLogprob
from leanserve.server.engine.request import Request, SeqStatus, Sequence
from leanserve.server.engine.sampler import Sampler, SamplerOutput, SamplingRow, has_penalty
from leanserve.server.engine.sampling_params import SamplingParams
from leanserve.server.engine.scheduler import Scheduler, SchedulerOutput
from leanserve.server.engine.warm_up import warm_up

logger = logging.getLogger(__name__)


def _placeholder(row: int) -> int:
    """The token id standing for row `row` of the in-flight step's sampled ids (ModelRunner resolves it)."""
    return -1 - row


@dataclass
class _InFlight:
    """A launched step whose sampled tokens the host has not read yet."""

    step: SchedulerOutput
    row_seqs: list[Sequence]  # the sequence of each sampled row
    positions: list[int]  # where each row's token goes in its sequence's token_ids (a placeholder now)
    forked: list[Sequence]  # n > 1 siblings created by this step (they fork when it completes)
    rows: list[SamplingRow]
    sampled: SamplerOutput  # on the device: the next step's placeholders resolve from it
    host_sampled: SamplerOutput  # its host copy, complete once `ready` is
    ready: torch.cuda.Event | None  # None on CPU
    attention: AttentionReading | None
    decode_shares: list[tuple[Request, float]]  # (request, KV tokens) per decode
    prefill_work: list[tuple[Request, float]]  # (request, attention work) per prefill chunk
    computed: list[tuple[Sequence, int]]  # for Scheduler.step_done
    needs_host_tokens: bool  # the next step must not be scheduled before this one's tokens are known
    scored: list[tuple[Request, int, int]]  # (request, first prompt position, count) per scoring chunk
    host_scores: SamplerOutput | None  # host copy of the runner's prompt scores, complete with `ready`


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_usage: float
    free_blocks: int
    total_blocks: int
    prefix_cache_hits: int
    prefix_cache_queries: int
    num_preemptions: int
    loop_alive: bool
    last_error: str | None


class LLMEngine:
    """Scheduler + model runner + sampler + detokenization, driven one `step()` at a time."""

    def __init__(
        self, config: EngineConfig, runner: ModelRunner, tokenizer, num_blocks: int, max_model_len: int
    ) -> None:
        self.config = config
        self.runner = runner
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.device = runner.device
        model_config = runner.model.config
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens)
        self.sampler = Sampler(model_config.vocab_size, self.device)
        eos = set(model_config.eos_token_ids)
        if tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(eos)
        self.requests: dict[str, Request] = {}
        # Tokens appended but not yet detokenized; None: the sequence ended without one (max_tokens=0).
        self._pending: list[tuple[Sequence, int | None]] = []
        self._inflight: _InFlight | None = None  # the launched step whose tokens the host has not read
        self.async_scheduling = (
            config.async_scheduling if config.async_scheduling is not None else self.device.type == "cuda"
        )
        # Wall time of the last step and the part of it spent waiting for the device (benchmarks: the
        # difference is host work that the device does not overlap).
        self.step_seconds = 0.0
        self.sync_seconds = 0.0
        self._counted = (0, 0)  # prefix hits/queries already added to the metrics

    @classmethod
    def from_config(cls, config: EngineConfig, time_attention: bool = True) -> LLMEngine:
        parts = load_engine_parts(config, time_attention)
        engine = cls(config, parts.runner, parts.tokenizer, parts.num_blocks, parts.max_model_len)
        if engine.device.type == "cuda":  # CPU runs no JIT-compiled kernels: nothing to warm
            warm_up(parts.runner, engine.sampler, config, parts.max_model_len)
        # The model, tokenizer and graphs are many long-lived objects: keep them out of the cyclic
        # collector, whose full passes otherwise stall decode steps by milliseconds.
        gc.freeze()
        return engine

    # -- requests ----------------------------------------------------------------------------------
    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError (a message for the client) for a request that can never run."""
        if not prompt_token_ids:
            raise ValueError("the prompt is empty")
        total = len(prompt_token_ids) + params.max_tokens
        if total > self.max_model_len:
            raise ValueError(
                f"this model's maximum context length is {self.max_model_len} tokens, but the request needs "
                f"{total} ({len(prompt_token_ids)} in the prompt + {params.max_tokens} max_tokens)"
            )
        if self.block_manager.blocks_needed(total) > self.block_manager.pool.num_blocks:
            raise ValueError(f"the request needs {total} tokens of KV cache, more than the whole cache holds")
        vocab = self.runner.model.config.vocab_size
        if any(not 0 <= t < vocab for t in prompt_token_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        arrival_time: float | None = None,
    ) -> Request:
        self.validate(prompt_token_ids, params)
        if request_id in self.requests:
            raise ValueError(f"duplicate request id {request_id!r}")
        request = Request(
            request_id, list(prompt_token_ids), params, RequestTimings(arrival_time or time.monotonic())
        )
        if params.prompt_logprobs is not None:  # the first token has no logprob: nothing comes before it
            (text,) = token_texts(self.tokenizer, prompt_token_ids[:1])
            request.prompt_logprobs = [TokenLogprob(prompt_token_ids[0], text, None)]
        self.requests[request_id] = request
        self.scheduler.add(self._new_sequence(request, 0))
        return request

    def _new_sequence(self, request: Request, index: int) -> Sequence:
        params = request.params
        generator = None
        if params.seed is not None:
            generator = torch.Generator(self.device).manual_seed(params.seed + index)
        detok = IncrementalDetokenizer(
            self.tokenizer, request.prompt_token_ids, params.stop, min_tokens=params.min_tokens
        )
        seq = Sequence(request, index, list(request.prompt_token_ids), detok, generator)
        request.sequences.append(seq)
        return seq

    def abort(self, request_id: str) -> list[RequestOutput]:
        """Finish a request now (idempotent). Returns the outputs still pending from the last step, then
        the aborted request's final output (nothing of it if unknown or already finished)."""
        outputs = self._finish_pending()
        request = self.requests.get(request_id)
        if request is not None:
            self._finish_request(request, "abort")
            outputs.append(self._drain_output(request))
        return outputs

    def _finish_request(self, request: Request, reason: FinishReason, error: str | None = None) -> None:
        request.error = error
        for _ in range(len(request.sequences), request.params.n):  # siblings never forked
            self._new_sequence(request, len(request.sequences)).status = SeqStatus.FINISHED
        for seq in request.sequences:
            if not seq.finished:
                self._end(seq, reason)

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work or bool(self._pending) or self._inflight is not None

    # -- the step -----------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule and launch one step, then finish the step before it and return outputs.

        With asynchronous scheduling (the default on CUDA) step N+1 is scheduled and launched before the
        host has read step N's tokens: its sequences carry placeholders that the device resolves from
        step N's sampled ids. The host then waits for step N, applies its tokens and stop checks, and
        detokenizes them while the device runs step N+1, so the device never waits for host work. A
        sequence that step N finishes has a wasted row in step N+1, whose token is dropped. The engine
        finishes step N within its own call when step N+1 will need its tokens on the host (penalties
        read the output tokens; n > 1 siblings fork after their first token); then step N's text comes
        with the next call's outputs, as the detokenization overlaps the next step."""
        started = time.perf_counter()
        self.sync_seconds = 0.0
        outputs: list[RequestOutput] = []
        step = self.scheduler.schedule()
        if step.preempted:
            metrics.num_preemptions.inc(len(step.preempted))
        launched = None
        if not step.is_empty:
            now = time.monotonic()
            for seq in step.seqs:
                if seq.request.timings.first_scheduled is None:
                    seq.request.timings.first_scheduled = now
            try:
                launched = self._launch(step)
            except Exception as e:  # a failing step fails its own requests; the engine goes on
                outputs += self._fail(step.seqs, e)
        if self._inflight is not None:
            outputs += self._complete()  # the device runs `launched` meanwhile
        outputs += self._finish_pending()  # detokenization overlaps `launched` too
        self._inflight = launched
        if launched is not None and not self._may_run_ahead(launched):
            outputs += self._complete()  # its text follows with the next step's outputs
            if not self.scheduler.has_work:
                outputs += self._finish_pending()
        self._observe_gauges()
        self.step_seconds = time.perf_counter() - started
        return outputs

    def _may_run_ahead(self, flight: _InFlight) -> bool:
        return self.async_scheduling and not flight.needs_host_tokens

    def _fail(self, seqs: list[Sequence], error: Exception) -> list[RequestOutput]:
        logger.error("engine step failed", exc_info=error)
        failed = {seq.request for seq in seqs}
        for request in failed:
            self._finish_request(request, "error", f"{type(error).__name__}: {error}")
        return [self._drain_output(r) for r in failed]

    def fail_all(self, error: str) -> list[RequestOutput]:
        """End every request with an error (the engine loop hit a bug outside a step)."""
        self._inflight, self._pending = None, []
        requests = list(self.requests.values())
        for request in requests:
            self._finish_request(request, "error", error)
        return [self._drain_output(r) for r in requests]

    def _launch(self, step: SchedulerOutput) -> _InFlight:
        """Queue forward + sampling on the device (no sync) and do the step's host bookkeeping: computed
        counts advance and every sampling sequence gets a placeholder for its token. The n-1 siblings of
        a sequence 0 that completes its prompt are created here (status WAITING, not yet scheduled) and
        sample their first token from its logits row."""
        tables = {seq.seq_id: self.block_manager.block_table(seq.seq_id) for seq in step.seqs}
        pending = self._inflight.sampled.token_ids if self._inflight is not None else None
        # The prompt tokens each chunk scores: n from the one after its first position on (read before
        # step_launched advances that position).
        scored = [
            (c.seq.request, c.seq.num_computed_tokens + 1, n) for c in step.prefills if (n := c.num_scored)
        ]
        logits, attention, scores = self.runner.execute(step, tables, pending)
        row_seqs = [c.seq for c in step.prefills if c.completes_prompt] + step.decodes
        row_index = list(range(len(row_seqs)))
        forked = []
        for i, seq in enumerate(list(row_seqs)):
            if seq.needs_fork:
                for index in range(len(seq.request.sequences), seq.request.params.n):
                    forked.append(self._new_sequence(seq.request, index))
                    row_seqs.append(forked[-1])
                    row_index.append(i)
        if len(row_index) != logits.shape[0]:
            logits = logits.index_select(0, torch.tensor(row_index, device=logits.device))
        rows = [
            SamplingRow(
                s.request.params, s.request.prompt_token_ids, s.output_token_ids, s.generator, self._banned(s)
            )
            for s in row_seqs
        ]
        sampled = self.sampler(logits, rows)
        # The scores' copies are queued before the sampled ids', so the step's `ready` event covers them.
        host_scores = scores.to_host()[0] if scores is not None else None
        host_sampled, ready = sampled.to_host()
        # Attention shares are fixed now: decode by KV tokens, prefill by the keys each query sees.
        shares = [(seq.request, len(seq.token_ids)) for seq in step.decodes]
        prefill_work = []
        for chunk in step.prefills:
            q, ctx = chunk.num_tokens, chunk.seq.num_computed_tokens + chunk.num_tokens
            prefill_work.append((chunk.seq.request, q * ctx - q * (q - 1) / 2))
        computed = self.scheduler.step_launched(step)
        positions = []
        for row, seq in enumerate(row_seqs):
            positions.append(len(seq.token_ids))
            seq.token_ids.append(_placeholder(row))
        needs_host_tokens = bool(forked) or any(has_penalty(r.params) for r in rows)
        return _InFlight(
            step, row_seqs, positions, forked, rows, sampled, host_sampled, ready, attention, shares,
            prefill_work, computed, needs_host_tokens, scored, host_scores,
        )  # fmt: skip

    def _complete(self) -> list[RequestOutput]:
        """Wait for the in-flight step's tokens and apply them (text is left to `_finish_pending`)."""
        flight, self._inflight = self._inflight, None
        try:
            sampled = self._collect(flight)
        except Exception as e:
            return self._fail(flight.step.seqs + flight.forked, e)
        self.scheduler.step_done(flight.computed)
        self._attribute_attention(flight)
        self._record_prompt_logprobs(flight)
        self._append_tokens(flight, sampled)
        return []

    def _collect(self, flight: _InFlight) -> list[tuple[int, TokenLogprob | None]]:
        """(new token, logprob entry) per sampled row."""
        out, rows = flight.host_sampled, flight.rows
        waited = time.perf_counter()
        if flight.ready is not None:
            flight.ready.synchronize()  # the step's one wait for the device
        self.sync_seconds += time.perf_counter() - waited
        token_ids = out.token_ids.tolist()
        entries: list[TokenLogprob | None] = [None] * len(rows)
        if out.logprobs is not None:
            entries = logprob_entries(self.tokenizer, [row.params.logprobs for row in rows], out)
        return list(zip(token_ids, entries, strict=True))

    def _record_prompt_logprobs(self, flight: _InFlight) -> None:
        """Put the step's prompt scores into their requests' lists, by prompt position: steps complete
        in launch order, so a chunk's entries follow those before it, and a chunk recomputed after a
        preemption writes the same entries again."""
        if flight.host_scores is None:
            return
        ks = [request.params.prompt_logprobs for request, _, n in flight.scored for _ in range(n)]
        entries = logprob_entries(self.tokenizer, ks, flight.host_scores)
        row = 0
        for request, start, n in flight.scored:
            if request.prompt_logprobs is not None:  # None: handed out already (the request was aborted)
                request.prompt_logprobs[start : start + n] = entries[row : row + n]
            row += n

    def _banned(self, seq: Sequence) -> frozenset[int]:
        """The tokens that must not end `seq` yet: its EOS (unless ignored) and stop token ids while it
        has fewer than min_tokens output tokens (in-flight placeholders count: only their number matters
        here, so min_tokens needs no host sync). Stop strings wait too (the detokenizer's min_tokens)."""
        params = seq.request.params
        if len(seq.token_ids) - seq.num_prompt_tokens >= params.min_tokens:
            return frozenset()
        return frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_token_ids)

    def _attribute_attention(self, flight: _InFlight) -> None:
        """Split the step's measured attention time over its sequences' requests: decode time by KV
        tokens (each sequence's share of the lean tiles), prefill time by attention work (query tokens
        times the keys each sees under the causal mask)."""
        prefill_s, decode_s = flight.attention.seconds() if flight.attention is not None else (0.0, 0.0)
        for seconds, shares in ((decode_s, flight.decode_shares), (prefill_s, flight.prefill_work)):
            if shares and seconds:
                total = sum(w for _, w in shares)
                for request, w in shares:
                    request.attention_seconds += seconds * w / total
        if flight.decode_shares:
            metrics.step_attention.observe(decode_s)

    def _append_tokens(self, flight: _InFlight, sampled: list[tuple[int, TokenLogprob | None]]) -> None:
        """Token-level bookkeeping right after the sync: fill the placeholders, stop token / EOS / length
        checks (they decide what the next step schedules). Text is left to `_finish_pending`."""
        now = time.monotonic()
        for seq in flight.forked:
            if not seq.finished:  # share the parent's prompt blocks (before the parent can finish below)
                self.runner.copy_blocks(self.scheduler.fork(seq.request.sequences[0], seq))
        appended = 0
        for seq, position, (token_id, entry) in zip(flight.row_seqs, flight.positions, sampled, strict=True):
            if seq.finished:  # ended (stop string, abort) after this step was launched: token dropped
                continue
            request, params = seq.request, seq.request.params
            if request.timings.first_token is None:
                request.timings.first_token = now
                metrics.prompt_tokens.inc(len(request.prompt_token_ids))
            if params.max_tokens == 0:  # the prompt alone (echo): the token its prefill sampled is dropped
                self._end(seq, "length")
                self._pending.append((seq, None))
                continue
            seq.token_ids[position] = token_id
            seq.new_token_ids.append(token_id)
            if entry is not None:
                seq.new_logprobs.append(entry)
            self._pending.append((seq, token_id))
            appended += 1
            if token_id in params.stop_token_ids:
                self._end(seq, "stop", token_id)
            elif not params.ignore_eos and token_id in self.eos_token_ids:
                self._end(seq, "stop")
            elif position + 1 >= min(seq.num_prompt_tokens + params.max_tokens, self.max_model_len):
                self._end(seq, "length")
        metrics.generation_tokens.inc(appended)

    def _end(self, seq: Sequence, reason: FinishReason, stop_reason: str | int | None = None) -> None:
        """Finish a sequence: release its blocks; a token a later in-flight step is still sampling for it
        (a placeholder at the end of its tokens) is dropped."""
        self.scheduler.finish(seq)
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        while seq.token_ids[-1] < 0:
            seq.token_ids.pop()

    def _finish_pending(self) -> list[RequestOutput]:
        """Detokenize the tokens appended by the last completed step, apply stop strings, build the
        outputs."""
        touched: dict[str, Request] = {}
        for seq, token_id in self._pending:
            touched[seq.request.request_id] = seq.request
            if token_id is None:  # ended by its prefill (max_tokens=0): no text, only the output is due
                continue
            delta = seq.detokenizer.add_tokens([token_id])
            seq.new_text += delta.text
            if delta.stop_reason is not None:
                if not seq.finished:
                    self._end(seq, "stop", delta.stop_reason)
                seq.finish_reason, seq.stop_reason = "stop", delta.stop_reason
            elif seq.finished:  # finished by its last token: release the text held back
                seq.new_text += seq.detokenizer.flush()
        self._pending = []
        return [self._drain_output(r) for r in touched.values()]

    def _drain_output(self, request: Request) -> RequestOutput:
        output = drain_output(request)
        if output.finished:
            self.requests.pop(request.request_id, None)
        return output

    def _observe_gauges(self) -> None:
        bm = self.block_manager
        metrics.num_requests_running.set(len(self.scheduler.running))
        metrics.num_requests_waiting.set(len(self.scheduler.waiting))
        metrics.kv_cache_usage.set(bm.usage)
        hits, queries = self._counted
        metrics.prefix_cache_hits.inc(bm.prefix_hits - hits)
        metrics.prefix_cache_queries.inc(bm.prefix_queries - queries)
        self._counted = (bm.prefix_hits, bm.prefix_queries)

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
            loop_alive=loop_alive,
            last_error=last_error,
        )
