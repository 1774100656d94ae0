"""The synchronous engine core: `LLMEngine.step()` is one iteration; server/engine.py loops it.

How a step flows (host = engine thread, device = GPU or CPU):
  host:   Scheduler.schedule() picks decodes + prefill chunks under the token budget (may preempt)
  host:   ModelRunner builds ids / positions / slots / block tables (numpy, pinned, one copy each)
  device: model forward (eager, or a CUDA-graph replay for pure-decode steps) -> logits of the rows that
          sample -> Sampler (penalties, top-k/p, seeds) -> token ids, all queued without a sync
  host:   one device->host copy of the ids (the step's only sync), attention time read from the timer
          events, then per sequence: detokenize, stop checks, fork n>1 siblings, build RequestOutput deltas"""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass

import torch
from transformers import AutoTokenizer

from models.block_manager import BlockManager
from models.kv_cache import KVCache
from models.layers import prepack_linear_weights
from models.loader import load_model, resolve_dtype
from models.weights_source import resolve_model_dir
from server import metrics
from server.config import EngineConfig
from server.detokenizer import IncrementalDetokenizer
from server.model_runner import ModelRunner
from server.outputs import FinishReason, RequestOutput, RequestTimings, SampleDelta, TokenLogprob
from server.request import Request, SeqStatus, Sequence
from server.sampler import Sampler, SamplerOutput, SamplingRow
from server.sampling_params import SamplingParams
from server.scheduler import Scheduler, SchedulerOutput
from server.tp_worker import TPWorkers, WorkerSpec

logger = logging.getLogger(__name__)

# GPU memory kept out of the KV pool, estimated with margin for Llama-3-8B: activations of a full prefill
# step (hidden states, fused qkv and gate/up outputs, fp32 norm temporaries: under 160 KiB per token of
# the step budget), the logits of every running sequence with the sampler's copies of them (4 fp32
# vocab-sized rows each), and the CUDA graphs' own pool.
_ACTIVATION_BYTES_PER_TOKEN = 160 * 1024
_LOGIT_COPIES = 4
_GRAPH_RESERVE_BYTES = 1 << 30


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
        self._pending: list[tuple[Sequence, int]] = []  # tokens appended but not yet detokenized
        # Wall time of the last step and the part of it spent waiting for the device (benchmarks: the
        # difference is host work that the device does not overlap).
        self.step_seconds = 0.0
        self.sync_seconds = 0.0
        self._counted = (0, 0)  # prefix hits/queries already added to the metrics

    @classmethod
    def from_config(cls, config: EngineConfig, time_attention: bool = True) -> LLMEngine:
        model_dir = resolve_model_dir(config.model)
        if config.device == "auto":
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            device = torch.device(config.device)
        dtype = resolve_dtype(config.dtype, device)
        torch.manual_seed(config.seed)
        workers = None
        if config.tensor_parallel_size > 1:
            spec = WorkerSpec(str(model_dir), dtype, device.type, config.load_format, torch.get_num_threads())
            workers = TPWorkers(spec, config.tensor_parallel_size)
            model = workers.load_model(device)
        else:
            model = load_model(model_dir, dtype, device, config.load_format)
        if device.type == "cpu":
            prepack_linear_weights(model)
        tokenizer = AutoTokenizer.from_pretrained(config.tokenizer or model_dir)
        max_model_len = config.max_model_len or model.config.max_position_embeddings
        num_blocks = _num_kv_blocks(config, model, dtype, device)
        runner = ModelRunner(
            model,
            num_blocks,
            config.block_size,
            config.max_num_seqs,
            max_model_len,
            dtype,
            device,
            use_cuda_graphs=not config.enforce_eager,
            time_attention=time_attention,
            workers=workers,
        )
        engine = cls(config, runner, tokenizer, num_blocks, max_model_len)
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
        self.requests[request_id] = request
        self.scheduler.add(self._new_sequence(request, 0))
        return request

    def _new_sequence(self, request: Request, index: int) -> Sequence:
        params = request.params
        generator = None
        if params.seed is not None:
            generator = torch.Generator(self.device).manual_seed(params.seed + index)
        detok = IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids, params.stop)
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
                self.scheduler.finish(seq)
                seq.finish_reason = reason

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work or bool(self._pending)

    # -- the step -----------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule and launch one step; while the device runs it, detokenize the previous step's tokens
        and build their outputs (returned here, one step late); then wait for this step's token ids and
        apply the token-level stop checks. A stop string found late finishes its sequence one step after
        its token: the token computed meanwhile is dropped."""
        started = time.perf_counter()
        step = self.scheduler.schedule()
        if step.preempted:
            metrics.num_preemptions.inc(len(step.preempted))
        if step.is_empty:
            outputs = self._finish_pending()
        else:
            now = time.monotonic()
            for seq in self._step_seqs(step):
                if seq.request.timings.first_scheduled is None:
                    seq.request.timings.first_scheduled = now
            error: Exception | None = None
            try:
                launched = self._launch(step)
            except Exception as e:
                launched, error = None, e
            outputs = self._finish_pending()  # overlaps with the device
            if launched is not None:
                try:
                    sampled = self._collect(*launched)
                except Exception as e:
                    error = e
            if error is not None:  # a failing step fails its own requests; the engine goes on
                logger.error("engine step failed", exc_info=error)
                outputs += self._fail(step, f"{type(error).__name__}: {error}")
            else:
                self.scheduler.step_done(step)
                self._attribute_attention(step)
                self._append_tokens(sampled)
                if not self.scheduler.has_work:
                    outputs += self._finish_pending()
        self._observe_gauges()
        self.step_seconds = time.perf_counter() - started
        return outputs

    def _fail(self, step: SchedulerOutput, error: str) -> list[RequestOutput]:
        failed = {seq.request for seq in self._step_seqs(step)}
        for request in failed:
            self._finish_request(request, "error", error)
        return [self._drain_output(r) for r in failed]

    def _launch(self, step: SchedulerOutput) -> tuple[list[Sequence], list[SamplingRow], SamplerOutput]:
        """Queue forward + sampling on the device (no sync). The n-1 siblings of a sequence 0 that
        completes its prompt are created here (status WAITING, not yet scheduled) and sample their first
        token from its logits row."""
        tables = {seq.seq_id: self.block_manager.block_table(seq.seq_id) for seq in self._step_seqs(step)}
        logits = self.runner.execute(step, tables)
        row_seqs = [c.seq for c in step.prefills if c.completes_prompt] + step.decodes
        row_index = list(range(len(row_seqs)))
        for i, seq in enumerate(list(row_seqs)):
            if seq.needs_fork:
                for index in range(len(seq.request.sequences), seq.request.params.n):
                    row_seqs.append(self._new_sequence(seq.request, index))
                    row_index.append(i)
        if len(row_index) != logits.shape[0]:
            logits = logits.index_select(0, torch.tensor(row_index, device=logits.device))
        rows = [
            SamplingRow(s.request.params, s.request.prompt_token_ids, s.output_token_ids, s.generator)
            for s in row_seqs
        ]
        return row_seqs, rows, self.sampler(logits, rows)

    def _collect(
        self, row_seqs: list[Sequence], rows: list[SamplingRow], out: SamplerOutput
    ) -> list[tuple[Sequence, int, TokenLogprob | None]]:
        """(sequence, new token, logprob entry) per sampled row."""
        waited = time.perf_counter()
        token_ids = out.token_ids.tolist()  # the step's one device -> host synchronisation
        self.sync_seconds = time.perf_counter() - waited
        entries: list[TokenLogprob | None] = [None] * len(rows)
        if out.logprobs is not None:
            entries = self._logprob_entries(rows, token_ids, out)
        return list(zip(row_seqs, token_ids, entries, strict=True))

    @staticmethod
    def _step_seqs(step: SchedulerOutput) -> list[Sequence]:
        return [c.seq for c in step.prefills] + step.decodes

    def _logprob_entries(
        self, rows: list[SamplingRow], token_ids: list[int], out: SamplerOutput
    ) -> list[TokenLogprob | None]:
        logprobs = out.logprobs.tolist()
        top_ids = out.top_ids.tolist() if out.top_ids is not None else None
        top_lps = out.top_logprobs.tolist() if out.top_logprobs is not None else None
        entries: list[TokenLogprob | None] = []
        for i, row in enumerate(rows):
            k = row.params.logprobs
            if k is None:
                entries.append(None)
                continue
            top = []
            if k and top_ids is not None:
                ids = top_ids[i][:k]
                top = list(zip(ids, self._token_texts(ids), top_lps[i][:k], strict=True))
            (text,) = self._token_texts([token_ids[i]])
            entries.append(TokenLogprob(token_ids[i], text, logprobs[i], top))
        return entries

    def _token_texts(self, token_ids: list[int]) -> list[str]:
        """Each token's own text as OpenAI reports it (" unless", not the BPE symbol "Ġunless"); ids the
        tokenizer does not know (random-weight benchmarks) decode to ""."""
        return self.tokenizer.batch_decode([[i] for i in token_ids])

    def _attribute_attention(self, step: SchedulerOutput) -> None:
        """Split the step's measured attention time over its sequences' requests: decode time by KV
        tokens (each sequence's share of the lean tiles), prefill time by attention work (query tokens
        times the keys each sees under the causal mask)."""
        prefill_s, decode_s = self.runner.attention_seconds()
        if step.decodes:
            metrics.step_attention.observe(decode_s)
            total = sum(len(s.token_ids) for s in step.decodes)
            for seq in step.decodes:
                seq.request.attention_seconds += decode_s * len(seq.token_ids) / total
        if step.prefills and prefill_s:
            work = []
            for chunk in step.prefills:
                ctx, q = chunk.seq.num_computed_tokens, chunk.num_tokens  # already advanced by step_done
                work.append(q * ctx - q * (q - 1) / 2)
            total = sum(work)
            for chunk, w in zip(step.prefills, work, strict=True):
                chunk.seq.request.attention_seconds += prefill_s * w / total

    def _append_tokens(self, sampled: list[tuple[Sequence, int, TokenLogprob | None]]) -> None:
        """Token-level bookkeeping right after the sync: append, stop token / EOS / length checks (they
        decide what the next step schedules). Text is left to `_finish_pending`."""
        now = time.monotonic()
        for seq, _, _ in sampled:
            if seq.index > 0 and not seq.output_token_ids and seq.num_computed_tokens == 0:
                # A sibling created by this step: share the parent's prompt blocks (before the parent
                # can finish and release them below).
                self.runner.copy_blocks(self.scheduler.fork(seq.request.sequences[0], seq))
        for seq, token_id, entry in sampled:
            if seq.finished:  # ended by a stop string found after this step was launched
                continue
            request, params = seq.request, seq.request.params
            if request.timings.first_token is None:
                request.timings.first_token = now
                metrics.prompt_tokens.inc(len(request.prompt_token_ids))
            seq.token_ids.append(token_id)
            seq.new_token_ids.append(token_id)
            if entry is not None:
                seq.new_logprobs.append(entry)
            self._pending.append((seq, token_id))
            reason: FinishReason | None = None
            if token_id in params.stop_token_ids:
                reason, seq.stop_reason = "stop", token_id
            elif not params.ignore_eos and token_id in self.eos_token_ids:
                reason = "stop"
            elif len(seq.output_token_ids) >= params.max_tokens or len(seq.token_ids) >= self.max_model_len:
                reason = "length"
            if reason is not None:
                self.scheduler.finish(seq)
                seq.finish_reason = reason
        metrics.generation_tokens.inc(len(sampled))

    def _finish_pending(self) -> list[RequestOutput]:
        """Detokenize the tokens appended by the last step, apply stop strings, build the outputs."""
        touched: dict[str, Request] = {}
        for seq, token_id in self._pending:
            touched[seq.request.request_id] = seq.request
            delta = seq.detokenizer.add_tokens([token_id])
            seq.new_text += delta.text
            if delta.stop_reason is not None:
                if not seq.finished:
                    self.scheduler.finish(seq)
                seq.finish_reason, seq.stop_reason = "stop", delta.stop_reason
            elif seq.finished:  # finished by its last token: release the text held back
                seq.new_text += seq.detokenizer.flush()
        self._pending = []
        return [self._drain_output(r) for r in touched.values()]

    def _drain_output(self, request: Request) -> RequestOutput:
        samples = []
        for seq in request.sequences:
            if seq.new_token_ids or seq.new_text or (seq.finished and not seq.finish_reported):
                seq.finish_reported = seq.finished
                samples.append(
                    SampleDelta(
                        index=seq.index,
                        text=seq.new_text,
                        token_ids=seq.new_token_ids,
                        logprobs=seq.new_logprobs if request.params.logprobs is not None else None,
                        finish_reason=seq.finish_reason,
                        stop_reason=seq.stop_reason,
                    )
                )
                seq.new_token_ids, seq.new_text, seq.new_logprobs = [], "", []
        finished = request.finished
        if finished:
            request.timings.finished = time.monotonic()
            self.requests.pop(request.request_id, None)
        return RequestOutput(
            request_id=request.request_id,
            samples=samples,
            finished=finished,
            prompt_tokens=len(request.prompt_token_ids),
            completion_tokens=request.num_generated_tokens,
            attention_seconds=request.attention_seconds,
            timings=request.timings,
            cached_prompt_tokens=request.cached_prompt_tokens,
            error=request.error,
        )

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


def _num_kv_blocks(config: EngineConfig, model, dtype: torch.dtype, device: torch.device) -> int:
    """CPU: `kv_cache_tokens`. GPU: what `gpu_memory_utilization` of the card leaves after the weights,
    the step's activations and the CUDA graphs."""
    if device.type != "cuda":
        return config.kv_cache_tokens // config.block_size
    free, total = torch.cuda.mem_get_info(device)
    logits = config.max_num_seqs * model.config.vocab_size * 4 * _LOGIT_COPIES
    reserve = config.max_num_batched_tokens * _ACTIVATION_BYTES_PER_TOKEN + logits + _GRAPH_RESERVE_BYTES
    budget = total * config.gpu_memory_utilization - (total - free) - reserve
    num_blocks = int(budget // KVCache.bytes_per_block(model.config, config.block_size, dtype, model.tp_size))
    if num_blocks < 1:
        raise RuntimeError(
            f"no GPU memory left for the KV cache (gpu_memory_utilization={config.gpu_memory_utilization})"
        )
    return num_blocks
