"""The device side of a step: launch the forward pass and sampling without a host sync, then collect the
sampled tokens once the device is done. With asynchronous scheduling the engine launches step N+1
before it collects step N: step N+1's sequences carry placeholders for the tokens step N is sampling,
which the model runner resolves on the device from step N's sampled ids."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np
import torch

from leanserve.models.attention import AttentionReading
from leanserve.server.engine.grammar import MaskFiller
from leanserve.server.engine.model_runner import ModelRunner
from leanserve.server.engine.request import Request, Sequence
from leanserve.server.engine.sampler import Sampler, SamplerOutput, SamplingRow, has_penalty, token_bitmask
from leanserve.server.engine.scheduler import Scheduler, SchedulerOutput


def placeholder(row: int) -> int:
    """The token id standing for row `row` of the in-flight step's sampled ids (ModelRunner resolves it)."""
    return -1 - row


@dataclass(kw_only=True)
class AttentionWork:
    """A step's attention time (read after its sync) and how it splits over requests: decode time by KV
    tokens (each sequence's share of the lean tiles), prefill time by attention work (query tokens times
    the keys each sees under the causal mask)."""

    reading: AttentionReading | None
    decode_shares: list[tuple[Request, float]]
    prefill_shares: list[tuple[Request, float]]

    def attribute(self) -> float | None:
        """Add each request's share to its `attention_seconds`. Returns the step's decode attention time
        (None when the step had no decode)."""
        prefill_s, decode_s = self.reading.seconds() if self.reading is not None else (0.0, 0.0)
        for seconds, shares in ((decode_s, self.decode_shares), (prefill_s, self.prefill_shares)):
            if shares and seconds:
                total = sum(w for _, w in shares)
                for request, w in shares:
                    request.attention_seconds += seconds * w / total
        return decode_s if self.decode_shares else None


@dataclass(kw_only=True)
class PromptScores:
    """The prompt logprobs a step computes: (request, first prompt position, count) per scoring chunk, and
    their host copy (complete with the step's `ready` event)."""

    chunks: list[tuple[Request, int, int]]
    host: SamplerOutput


@dataclass(kw_only=True)
class InFlightStep:
    """A launched step whose sampled tokens the host has not read yet."""

    step: SchedulerOutput
    row_seqs: list[Sequence]  # the sequence of each sampled row
    positions: list[int]  # where each row's token goes in its sequence's token_ids (a placeholder now)
    forked: list[Sequence]  # n > 1 siblings created by this step (they fork when it completes)
    logprobs: list[int | None]  # top logprobs each row asks for (None: no logprobs)
    sampled: SamplerOutput  # on the device: the next step's placeholders resolve from it
    host_sampled: SamplerOutput  # its host copy, complete once `ready` is
    ready: torch.cuda.Event | None  # None on CPU
    attention: AttentionWork
    computed: list[tuple[Sequence, int]]  # for Scheduler.step_done
    needs_host_tokens: bool  # the next step must not be scheduled before this one's tokens are known
    scores: PromptScores | None


class StepPipeline:
    """Launches steps on the device and collects them, at most one in flight."""

    def __init__(self, runner: ModelRunner, sampler: Sampler, scheduler: Scheduler) -> None:
        self.runner = runner
        self.sampler = sampler
        self.scheduler = scheduler
        self.in_flight: InFlightStep | None = None
        self.sync_seconds = 0.0  # host time spent waiting for the device in the last collect
        self.mask_filler = MaskFiller()

    def launch(
        self,
        step: SchedulerOutput,
        spawn: Callable[[Request, int], Sequence],
        settle_in_flight: Callable[[], None],
    ) -> InFlightStep:
        """Queue forward + sampling on the device and do the step's host bookkeeping: computed counts
        advance and every sampling sequence gets a placeholder for its token. The n-1 siblings of a
        sequence 0 that completes its prompt are created here by `spawn` (not yet scheduled) and sample
        their first token from its logits row. No host sync, except where a constrained row's mask needs
        the in-flight step's tokens: then this step's forward pass is queued first, and
        `settle_in_flight` waits for that step and applies its tokens (the grammars among them) while the
        device runs the forward pass; the masks are filled after it, before sampling."""
        block_manager = self.scheduler.block_manager
        tables = {seq.seq_id: block_manager.block_table(seq.seq_id) for seq in step.seqs}
        pending = self.in_flight.sampled.token_ids if self.in_flight is not None else None
        # The prompt tokens each chunk scores: n from the one after its first position on (read before
        # step_launched advances that position).
        scored = [
            (c.seq.request, c.seq.num_computed_tokens + 1, n) for c in step.prefills if (n := c.num_scored)
        ]
        row_seqs = [c.seq for c in step.prefills if c.completes_prompt] + step.decodes
        settle = pending is not None and any(seq.grammar is not None for seq in row_seqs)
        masks = None if settle else self._start_token_mask(row_seqs)  # filled while the device works
        logits, reading, scores = self.runner.execute(step, tables, pending)
        if settle:
            settle_in_flight()
            masks = self._start_token_mask(row_seqs)
        row_index = list(range(len(row_seqs)))
        forked = []
        for i, seq in enumerate(list(row_seqs)):
            if seq.needs_fork:
                for index in range(len(seq.request.sequences), seq.request.params.n):
                    forked.append(spawn(seq.request, index))
                    row_seqs.append(forked[-1])
                    row_index.append(i)
        if len(row_index) != logits.shape[0]:
            logits = logits.index_select(0, torch.tensor(row_index, device=logits.device))
        rows = [self._sampling_row(seq) for seq in row_seqs]
        sampled = self.sampler(logits, rows, self._finish_token_mask(masks, row_index))
        # The scores' copies are queued before the sampled ids', so the step's `ready` event covers them.
        host_scores = scores.to_host()[0] if scores is not None else None
        host_sampled, ready = sampled.to_host()
        attention = AttentionWork(
            reading=reading,
            decode_shares=[(seq.request, len(seq.token_ids)) for seq in step.decodes],
            prefill_shares=[
                (c.seq.request, _causal_work(c.num_tokens, c.seq.num_computed_tokens)) for c in step.prefills
            ],
        )
        computed = self.scheduler.step_launched(step)
        positions = []
        for row, seq in enumerate(row_seqs):
            positions.append(len(seq.token_ids))
            if not seq.finished:  # settled above as finished: the row's token is dropped
                seq.token_ids.append(placeholder(row))
        return InFlightStep(
            step=step,
            row_seqs=row_seqs,
            positions=positions,
            forked=forked,
            logprobs=[row.params.logprobs for row in rows],
            sampled=sampled,
            host_sampled=host_sampled,
            ready=ready,
            attention=attention,
            computed=computed,
            needs_host_tokens=bool(forked)
            or any(has_penalty(r.params) or r.params.needs_output_tokens for r in rows),
            scores=PromptScores(chunks=scored, host=host_scores) if host_scores is not None else None,
        )

    def collect(self, flight: InFlightStep) -> list[int]:
        """Wait for the step's device work (its one sync) and return the sampled token id of each row."""
        waited = time.perf_counter()
        if flight.ready is not None:
            flight.ready.synchronize()
        self.sync_seconds += time.perf_counter() - waited
        return flight.host_sampled.token_ids.tolist()

    def _sampling_row(self, seq: Sequence) -> SamplingRow:
        # Only penalties read the output tokens: other rows skip the slice (a copy every step).
        params = seq.request.params
        output = seq.output_token_ids if has_penalty(params) else []
        return SamplingRow(params, seq.request.prompt_token_ids, output, seq.generator, self._banned(seq))

    def _banned(self, seq: Sequence) -> frozenset[int]:
        """The tokens `seq` must not pick now: the last token of each bad word whose other tokens end its
        output (those of several tokens make the step need its tokens on the host), and, while it has
        fewer than min_tokens output tokens, its EOS (unless ignored) and stop token ids (in-flight
        placeholders count: only their number matters here, so min_tokens needs no host sync). Stop
        strings wait too (the detokenizer's min_tokens)."""
        params = seq.request.params
        banned = frozenset()
        if params.bad_words_token_ids:
            output = seq.output_token_ids
            banned = frozenset(ids[-1] for ids in params.bad_words_token_ids if _ends_with(output, ids[:-1]))
        if len(seq.token_ids) - seq.num_prompt_tokens >= params.min_tokens:
            return banned
        eos = frozenset() if params.ignore_eos else self.scheduler.eos_token_ids
        return banned | frozenset(params.stop_token_ids) | eos

    def _start_token_mask(self, row_seqs: list[Sequence]) -> _TokenMask | None:
        """Start the sampler's bitmask of the step's rows (None when every row may pick any token): the
        rows of constrained sequences are filled by their grammars in the background, the rows with
        allowed_token_ids get theirs, the others every bit. A sequence the in-flight step finished (its
        grammar may be complete) keeps every bit: its row's token is dropped."""
        vocab = self.sampler.vocab_size
        allowed = [self._allowed_mask(seq.request, vocab) for seq in row_seqs]
        grammars = [
            (seq.grammar, i) for i, seq in enumerate(row_seqs) if seq.grammar is not None and not seq.finished
        ]
        if not grammars and all(m is None for m in allowed):
            return None
        table = np.full((len(row_seqs), -(-vocab // 32)), -1, dtype=np.int32)
        filling = self.mask_filler.submit(grammars, table) if grammars else None
        return _TokenMask(table, allowed, filling)

    def _finish_token_mask(self, masks: _TokenMask | None, row_index: list[int]) -> np.ndarray | None:
        """Wait for the grammars' rows, narrow them by allowed_token_ids, and give the forked siblings
        their parent's row (they sample their first token from its logits)."""
        if masks is None:
            return None
        if masks.filling is not None:
            masks.filling.result()
        table = masks.table
        for i, mask in enumerate(masks.allowed):
            if mask is not None:
                table[i] &= mask
        return table if len(row_index) == len(table) else table[row_index]

    @staticmethod
    def _allowed_mask(request: Request, vocab: int) -> np.ndarray | None:
        if request.params.allowed_token_ids is None:
            return None
        if request.allowed_mask is None:
            request.allowed_mask = token_bitmask(request.params.allowed_token_ids, vocab)
        return request.allowed_mask


@dataclass
class _TokenMask:
    table: np.ndarray  # [rows, words] int32, filled in the background where `filling` runs
    allowed: list[np.ndarray | None]  # each row's allowed_token_ids mask
    filling: Future | None


def _ends_with(tokens: list[int], suffix: list[int]) -> bool:
    return not suffix or (len(tokens) >= len(suffix) and tokens[-len(suffix) :] == suffix)


def _causal_work(num_queries: int, num_cached: int) -> float:
    """Query-key pairs of a prefill chunk of `num_queries` tokens after `num_cached` computed ones."""
    context = num_cached + num_queries
    return num_queries * context - num_queries * (num_queries - 1) / 2
