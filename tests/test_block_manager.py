"""Block manager: random admit / grow / fork / finish / abort / preempt / prefix-hit workloads keep the
invariants, never leak a block, and prefix caching finds exactly the computed full blocks."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from leanserve.server.engine.block_manager import BlockManager, BlockPool

BS = 4

# A few shared prompt stems so that random prompts often share prefixes.
_STEMS = [[1, 2, 3, 4, 5, 6, 7, 8], [9, 9, 9, 9], []]
ops = st.lists(
    st.tuples(
        st.sampled_from(["admit", "grow", "fork", "finish", "preempt"]),
        st.integers(0, 2),  # stem
        st.lists(st.integers(0, 5), min_size=1, max_size=9),  # prompt tail / growth amount
        st.integers(0, 50),  # which live sequence
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(ops=ops, num_blocks=st.integers(1, 12), prefix=st.booleans())
def test_random_workload_keeps_invariants_and_frees_everything(ops, num_blocks, prefix):
    bm = BlockManager(num_blocks, BS, enable_prefix_caching=prefix)
    live: dict[int, list[int]] = {}  # seq id -> its tokens (all computed)
    next_id = 0
    for op, stem, tail, pick in ops:
        ids = sorted(live)
        target = ids[pick % len(ids)] if ids else None
        if op == "admit":
            tokens = _STEMS[stem] + tail
            free_before = bm.num_free_blocks
            allocation = bm.allocate(next_id, tokens)
            if allocation is None:
                assert bm.num_free_blocks == free_before
            else:
                assert allocation.num_cached_tokens % BS == 0
                assert allocation.num_cached_tokens < len(tokens)
                assert len(bm.block_table(next_id)) == bm.blocks_needed(len(tokens))
                bm.mark_computed(next_id, tokens, len(tokens))
                live[next_id] = tokens
            next_id += 1
        elif target is None:
            continue
        elif op == "grow":
            tokens = live[target] + tail
            if bm.ensure_capacity(target, len(tokens)):
                bm.mark_computed(target, tokens, len(tokens))
                live[target] = tokens
        elif op == "fork":
            copies = bm.fork(target, next_id, len(live[target]))
            if copies is not None:
                assert len(copies) == (1 if len(live[target]) % BS else 0)
                table, parent_table = bm.block_table(next_id), bm.block_table(target)
                full = len(live[target]) // BS
                assert table[:full] == parent_table[:full]
                live[next_id] = list(live[target])
            next_id += 1
        else:  # finish, abort and preempt all release the sequence's blocks
            bm.free(target)
            del live[target]
        bm.check_invariants()
        assert sum(bm.blocks_needed(len(t)) for t in live.values()) >= bm.pool.num_blocks - bm.num_free_blocks
    for seq_id in list(live):
        bm.free(seq_id)
    bm.check_invariants()
    assert bm.num_free_blocks == num_blocks
    assert bm.prefix_hits <= bm.prefix_queries


@pytest.mark.parametrize("prompt_len", [1, 4, 5, 8, 9, 13])
def test_repeated_prompt_hits_all_full_blocks_but_the_last_token(prompt_len):
    bm = BlockManager(16, BS)
    tokens = list(range(100, 100 + prompt_len))
    assert bm.allocate("a", tokens).num_cached_tokens == 0
    bm.mark_computed("a", tokens, len(tokens))
    bm.free("a")  # freed blocks stay cached
    hit = bm.allocate("b", tokens).num_cached_tokens
    assert hit == ((prompt_len - 1) // BS) * BS
    assert bm.prefix_hits == hit and bm.prefix_queries == 2 * prompt_len
    # A prompt that differs in its first block shares nothing.
    assert bm.allocate("c", [7, *tokens[1:]]).num_cached_tokens == 0
    bm.free("b")
    bm.free("c")
    bm.check_invariants()
    assert bm.num_free_blocks == 16


def test_a_sequence_that_needs_every_logit_takes_no_cached_block_but_leaves_its_own():
    bm = BlockManager(8, BS)
    tokens = list(range(100, 113))  # three full blocks and a partial one
    bm.allocate("a", tokens)
    bm.mark_computed("a", tokens, len(tokens))
    assert bm.allocate("scored", tokens, reuse_prefix=False).num_cached_tokens == 0
    assert set(bm.block_table("scored")).isdisjoint(bm.block_table("a"))
    assert bm.prefix_queries == len(tokens) and bm.prefix_hits == 0  # no lookup, none counted
    bm.free("a")
    bm.mark_computed("scored", tokens, len(tokens))  # equal blocks cached already: those stay
    bm.free("scored")
    assert bm.allocate("b", tokens).num_cached_tokens == 12
    bm.free("b")
    bm.check_invariants()
    assert bm.num_free_blocks == 8


def test_uncomputed_blocks_are_not_found_and_lru_evicts_oldest_cached():
    bm = BlockManager(3, BS)
    a, b = [1] * 9, [2] * 9
    bm.allocate("a", a)
    assert bm.allocate("a2", a) is None  # pool full: nothing changes
    bm.free("a")  # never marked computed: no cache entry
    assert bm.allocate("a3", a).num_cached_tokens == 0
    bm.mark_computed("a3", a, 9)
    bm.free("a3")
    bm.allocate("b", b)  # evicts a's blocks (the only ones)
    bm.free("b")
    assert bm.allocate("a4", a).num_cached_tokens == 0
    bm.free("a4")
    bm.check_invariants()


def test_pool_hands_out_empty_blocks_before_cached_ones():
    pool = BlockPool(2)
    x, y = pool.allocate(), pool.allocate()
    pool.register(x, 123)
    pool.release(x)
    pool.release(y)
    assert pool.allocate() == y  # x still holds cached content
    assert pool.lookup(123) == x
    pool.check_invariants()
