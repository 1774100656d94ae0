"""Continuous-batching scheduler: decides, every step, which sequences compute which tokens.

FCFS over sequences, except that when the batch is full a request waiting with no sequence running gets
a slot from the request holding the most (fairness: one large request cannot starve the others). Each
step spends a token budget: first one token per running decode (growing its block table; when the pool
is empty the newest running sequence is preempted by recompute), then prefill chunks of running
sequences, then new admissions, each chunked to what is left of the budget, so a long prompt never
stalls decode. After a step's tokens reach the host, `update_from_output` appends them and ends the
sequences they finish (stop token, EOS, length). Pure bookkeeping: no tensors."""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass, field

from leanserve.server.engine.block_manager import BlockManager
from leanserve.server.engine.outputs import FinishReason
from leanserve.server.engine.request import SeqStatus, Sequence


@dataclass
class PrefillChunk:
    seq: Sequence
    num_tokens: int  # tokens [seq.num_computed_tokens, + num_tokens) are computed this step

    @property
    def completes_prompt(self) -> bool:
        """This chunk reaches the end of the sequence's tokens: the step samples its next token."""
        return self.seq.num_computed_tokens + self.num_tokens == len(self.seq.token_ids)

    @property
    def num_scored(self) -> int:
        """Prompt tokens whose logprobs this chunk computes, while the sequence scores its prompt: one per
        position whose next token is in the prompt (scored by that position's logits). Read it before
        `Scheduler.step_launched` advances the computed count."""
        seq = self.seq
        if not seq.scores_prompt:
            return 0
        return min(self.num_tokens, seq.num_prompt_tokens - 1 - seq.num_computed_tokens)


@dataclass
class SchedulerOutput:
    prefills: list[PrefillChunk] = field(default_factory=list)
    decodes: list[Sequence] = field(default_factory=list)  # one new token each (the last of token_ids)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def seqs(self) -> list[Sequence]:
        """Every sequence of the step: its prefill chunks' then its decodes."""
        return [c.seq for c in self.prefills] + self.decodes

    @property
    def is_empty(self) -> bool:
        return not self.prefills and not self.decodes

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.prefills) + len(self.decodes)


@dataclass
class StepUpdate:
    """What `update_from_output` did with a step's tokens."""

    # (row, sequence, token id) per token appended; token None: the sequence ended with its prefill and
    # no token (max_tokens 0), only its output is due.
    appended: list[tuple[int, Sequence, int | None]] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)  # forks to apply before the next step
    prompt_tokens: int = 0  # prompts of the requests whose first token this was
    generated_tokens: int = 0


class Scheduler:
    """Owns the waiting queue and the running list (in admission order: the newest is last).
    Invariant: a sequence has blocks exactly when it is running."""

    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int | None = None,
        eos_token_ids: frozenset[int] = frozenset(),
    ) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.eos_token_ids = eos_token_ids
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        self._make_room_for_a_newcomer(out)
        budget = self.max_num_batched_tokens
        # 1. Decodes, oldest first; growing one may preempt the newest running sequences.
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.num_uncomputed == 1:
                while not self.block_manager.ensure_capacity(seq.seq_id, len(seq.token_ids)):
                    victim = self.running[-1]
                    self._preempt(victim, out)
                    if victim is seq:
                        break
                if seq.status is not SeqStatus.RUNNING:
                    break  # it preempted itself: everything after it is gone too
                out.decodes.append(seq)
                budget -= 1
            i += 1
        # 2. Prefill chunks of running sequences, then 3. admissions, in the leftover budget.
        for seq in self.running:
            if budget == 0:
                break
            if seq.num_uncomputed > 1:
                out.prefills.append(PrefillChunk(seq, min(seq.num_uncomputed, budget)))
                budget -= out.prefills[-1].num_tokens
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not out.preempted:
            seq = self.waiting[0]
            # Cached blocks come without the logits of their positions, which a prompt that is scored
            # needs: it computes its whole prompt (as vLLM does).
            allocation = self.block_manager.allocate(seq.seq_id, seq.token_ids, not seq.scores_prompt)
            if allocation is None:
                break  # FCFS: nobody overtakes the head of the queue
            self.waiting.popleft()
            seq.num_computed_tokens = allocation.num_cached_tokens
            if seq.index == 0 and not seq.output_token_ids:
                seq.request.cached_prompt_tokens = allocation.num_cached_tokens
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            out.prefills.append(PrefillChunk(seq, min(seq.num_uncomputed, budget)))
            budget -= out.prefills[-1].num_tokens
        return out

    def _make_room_for_a_newcomer(self, out: SchedulerOutput) -> None:
        """Fairness between requests: when every sequence slot is taken and a request waits with none
        running, the request holding the most slots (if more than one) gives its newest sequence back
        (recompute preemption) and the newcomer goes first in the queue: it is admitted next step. So
        one large request (n choices, many prompts) cannot hold the whole batch until it ends while
        others wait; each waiting request gets a slot in turn, at the cost of one recomputation."""
        if len(self.running) < self.max_num_seqs or not self.waiting:
            return
        held = Counter(seq.request for seq in self.running)
        newcomer = next((seq for seq in self.waiting if seq.request not in held), None)
        if newcomer is None:
            return
        greedy, slots = held.most_common(1)[0]
        if slots < 2:
            return
        self._preempt(next(seq for seq in reversed(self.running) if seq.request is greedy), out)
        self.waiting.remove(newcomer)
        self.waiting.appendleft(newcomer)

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        """Recompute preemption: drop the KV blocks, go back to the front of the queue."""
        self.running.remove(seq)
        self.block_manager.free(seq.seq_id)
        seq.num_computed_tokens = 0
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
        out.preempted.append(seq)

    def step_launched(self, out: SchedulerOutput) -> list[tuple[Sequence, int]]:
        """The step is queued on the device: advance computed counts, which the next schedule builds on
        (it may run before this step's results are back). Returns (sequence, computed tokens) pairs for
        `step_done`."""
        for chunk in out.prefills:
            chunk.seq.num_computed_tokens += chunk.num_tokens
        for seq in out.decodes:
            seq.num_computed_tokens += 1
        return [(seq, seq.num_computed_tokens) for seq in out.seqs]

    def step_done(self, computed: list[tuple[Sequence, int]]) -> None:
        """The step succeeded and its tokens are known: publish the full blocks it computed to the prefix
        cache (never earlier, so a failed step leaves nothing findable)."""
        for seq, num_computed in computed:
            if seq.status is SeqStatus.RUNNING:  # not ended or preempted since the step was launched
                self.block_manager.mark_computed(seq.seq_id, seq.token_ids, num_computed)

    def fork(self, parent: Sequence, child: Sequence) -> list[tuple[int, int]]:
        """Start `child` from the parent's computed prompt, sharing its full blocks. Returns the block
        copies to apply before the next step. Without room (seqs or blocks) the child waits at the front
        of the queue and recomputes the prompt (prefix caching makes that cheap)."""
        copies = None
        if len(self.running) < self.max_num_seqs:
            copies = self.block_manager.fork(parent.seq_id, child.seq_id, parent.num_prompt_tokens)
        if copies is None:
            child.status = SeqStatus.WAITING
            self.waiting.appendleft(child)
            return []
        child.num_computed_tokens = parent.num_prompt_tokens
        child.status = SeqStatus.RUNNING
        self.running.append(child)
        return copies

    def update_from_output(
        self, row_seqs: list[Sequence], positions: list[int], forked: list[Sequence], token_ids: list[int]
    ) -> StepUpdate:
        """A step's sampled tokens are on the host: fork its n > 1 siblings (sharing the parent's prompt
        blocks), fill the placeholders at `positions`, and end the sequences a stop token, EOS or their
        length finishes. Text (stop strings) is the output processor's."""
        update = StepUpdate()
        for seq in forked:
            if not seq.finished:  # before the parent can finish below
                update.block_copies += self.fork(seq.request.sequences[0], seq)
        now = time.monotonic()
        for row, (seq, position, token_id) in enumerate(zip(row_seqs, positions, token_ids, strict=True)):
            if seq.finished:  # ended (stop string, abort) after this step was launched: token dropped
                continue
            request, params = seq.request, seq.request.params
            if request.timings.first_token is None:
                request.timings.first_token = now
                update.prompt_tokens += len(request.prompt_token_ids)
            if params.max_tokens == 0:  # the prompt alone (echo): the token its prefill sampled is dropped
                self.finish(seq, "length")
                update.appended.append((row, seq, None))
                continue
            seq.token_ids[position] = token_id
            seq.new_token_ids.append(token_id)
            update.appended.append((row, seq, token_id))
            if token_id in params.stop_token_ids:
                self.finish(seq, "stop", token_id)
            elif not params.ignore_eos and token_id in self.eos_token_ids:
                self.finish(seq, "stop")
            elif position + 1 >= seq.num_prompt_tokens + params.max_tokens or (
                self.max_model_len is not None and position + 1 >= self.max_model_len
            ):
                self.finish(seq, "length")
        update.generated_tokens = sum(token is not None for _, _, token in update.appended)
        return update

    def finish(
        self, seq: Sequence, reason: FinishReason = "abort", stop_reason: str | int | None = None
    ) -> None:
        """End a sequence wherever it is and release its blocks; a token a later in-flight step is still
        sampling for it (a placeholder at the end of its tokens) is dropped."""
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
            self.block_manager.free(seq.seq_id)
        elif seq in self.waiting:  # a sibling created by a failed step was never queued
            self.waiting.remove(seq)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        while seq.token_ids and seq.token_ids[-1] < 0:
            seq.token_ids.pop()

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)
