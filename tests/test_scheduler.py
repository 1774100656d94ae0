"""Scheduler: decode before prefill under the token budget (chunked prefill), FCFS admission, the
max_num_seqs cap, and recompute preemption of the newest running sequence when blocks run out."""

from __future__ import annotations

import pytest

from leanserve.server.engine.block_manager import BlockManager
from leanserve.server.engine.outputs import RequestTimings
from leanserve.server.engine.request import Request, SeqStatus, Sequence
from leanserve.server.engine.sampling_params import SamplingParams
from leanserve.server.engine.scheduler import Scheduler, SchedulerOutput

BS = 4


def make_seq(prompt_len: int, start: int = 0) -> Sequence:
    request = Request(
        f"r{start}", list(range(start, start + prompt_len)), SamplingParams(), RequestTimings(0.0)
    )
    seq = Sequence(request, 0, list(request.prompt_token_ids), detokenizer=None)
    request.sequences.append(seq)
    return seq


def run_step(scheduler: Scheduler) -> SchedulerOutput:
    """Schedule, pretend the forward ran, append one sampled token to each sequence that sampled."""
    out = scheduler.schedule()
    sampling = [c.seq for c in out.prefills if c.completes_prompt] + out.decodes
    computed = scheduler.step_launched(out)
    for seq in sampling:
        seq.token_ids.append(7)
    scheduler.step_done(computed)
    return out


@pytest.mark.parametrize("budget", [16, 23, 64])
def test_long_prompt_is_chunked_and_never_stalls_decode(budget):
    scheduler = Scheduler(BlockManager(128, BS), max_num_seqs=8, max_num_batched_tokens=budget)
    short = make_seq(5)
    scheduler.add(short)
    run_step(scheduler)  # short's prompt done: it decodes from now on
    long = make_seq(150, start=1000)
    scheduler.add(long)
    chunks = []
    while long.num_computed_tokens < 150:
        out = run_step(scheduler)
        assert out.decodes == [short], "the decode runs in every step"
        assert out.num_tokens <= budget
        chunks += [c.num_tokens for c in out.prefills]
    assert sum(chunks) == 150
    assert all(c == budget - 1 for c in chunks[:-1])


def test_fcfs_and_max_num_seqs():
    scheduler = Scheduler(BlockManager(10, BS), max_num_seqs=2, max_num_batched_tokens=1000)
    big, small1, small2 = make_seq(30), make_seq(3, 100), make_seq(3, 200)
    for seq in (big, small1, small2):
        scheduler.add(seq)
    out = scheduler.schedule()
    assert [c.seq for c in out.prefills] == [big, small1]  # 8 + 1 blocks, then the seq cap
    assert list(scheduler.waiting) == [small2]
    blocked = Scheduler(BlockManager(4, BS), max_num_seqs=8, max_num_batched_tokens=1000)
    for seq in (make_seq(30, 300), make_seq(3, 400)):
        blocked.add(seq)
    assert blocked.schedule().is_empty  # the head does not fit and nobody overtakes it


def test_newest_sequence_is_preempted_and_requeued_first():
    bm = BlockManager(4, BS)
    scheduler = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=1000)
    old, new = make_seq(7), make_seq(7, 100)  # 2 blocks each: the pool is full after admission
    scheduler.add(old)
    scheduler.add(new)
    run_step(scheduler)  # prompts
    run_step(scheduler)  # 8th tokens
    out = run_step(scheduler)  # old needs a 3rd block for its 9th token: new is preempted
    assert out.preempted == [new] and out.decodes == [old]
    assert new.status is SeqStatus.WAITING and new.num_computed_tokens == 0
    assert list(scheduler.waiting) == [new] and scheduler.num_preemptions == 1
    assert new.token_ids[-1] == 7, "its sampled token is kept and recomputed"
    scheduler.finish(old)
    out = run_step(scheduler)
    # Recompute of all 9 tokens; the preempted blocks stayed cached except the tail one that old took.
    assert [c.seq for c in out.prefills] == [new] and out.prefills[0].num_tokens == 9 - BS
    scheduler.finish(new)
    bm.check_invariants()
    assert bm.num_free_blocks == 4


def test_sequence_that_cannot_grow_preempts_itself():
    bm = BlockManager(2, BS)
    scheduler = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=1000)
    seq = make_seq(8)
    scheduler.add(seq)
    run_step(scheduler)
    out = scheduler.schedule()  # token 9 needs a third block: nobody else to preempt
    assert out.preempted == [seq] and out.is_empty
    assert bm.num_free_blocks == 2


def make_request(request_id: str, n: int, prompt_len: int = 3, start: int = 0) -> list[Sequence]:
    """A request's n sequences (as if its siblings had been forked), all waiting."""
    request = Request(
        request_id, list(range(start, start + prompt_len)), SamplingParams(n=n), RequestTimings(0.0)
    )
    request.sequences = [
        Sequence(request, i, list(request.prompt_token_ids), detokenizer=None) for i in range(n)
    ]
    return request.sequences


def test_a_request_holding_every_slot_gives_one_to_a_newcomer():
    """Issue 26: one request's 4 sequences fill max_num_seqs=4; a later request must not wait until they
    all end. The large request's newest sequence is preempted and the newcomer admitted next step; a
    second sibling-only wait (the preempted sequence) triggers nothing more."""
    scheduler = Scheduler(BlockManager(64, BS), max_num_seqs=4, max_num_batched_tokens=1000)
    big = make_request("big", 4)
    for seq in big:
        scheduler.add(seq)
    run_step(scheduler)
    assert len(scheduler.running) == 4
    small = make_seq(3, 500)
    scheduler.add(small)
    out = run_step(scheduler)
    assert out.preempted == [big[3]] and list(scheduler.waiting) == [small, big[3]]
    out = run_step(scheduler)
    assert small in [c.seq for c in out.prefills] and not out.preempted
    assert len(scheduler.running) == 4 and list(scheduler.waiting) == [big[3]]
    for _ in range(3):  # the preempted sibling waits for a slot; no preemption back and forth
        assert not run_step(scheduler).preempted
    scheduler.finish(small)
    run_step(scheduler)
    assert big[3] in scheduler.running
    scheduler.block_manager.check_invariants()


def test_single_sequence_requests_keep_fcfs():
    scheduler = Scheduler(BlockManager(64, BS), max_num_seqs=2, max_num_batched_tokens=1000)
    seqs = [make_seq(3, 100 * i) for i in range(4)]
    for seq in seqs:
        scheduler.add(seq)
    for _ in range(3):
        assert not run_step(scheduler).preempted
    assert scheduler.running == seqs[:2] and list(scheduler.waiting) == seqs[2:]
