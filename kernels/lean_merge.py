"""The fix-up of LeanAttention's split outputs (kernels/lean_attention.py): every program that holds part
of an output publishes its partial (running max, denominator, accumulator) and counts its tiles in; the one
that completes the count merges all partials into the output. Also the scratch memory the partials live in.
Protocol: docs/kernel_notes.md."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@triton.jit
def merge_partials(
    part_acc_ptr,
    part_ml_ptr,
    first,
    last,
    first_slot,
    GROUP: tl.constexpr,
    GROUP_RED: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    BLOCK_D: tl.constexpr,
    RED_CHUNK: tl.constexpr,
):
    """Merge the published partials of programs first..last (the caller's own included) into one
    (denominator, accumulator) pair over GROUP_RED rows. Contributors are folded in one at a time with
    the online-softmax update, which is elementwise per row: no reduction across threads. The loop is
    unrolled RED_CHUNK contributors deep with masked loads whose addresses depend on nothing loaded, so a
    chunk's loads are in flight together: one L2 round trip per chunk instead of one (~0.5 us on an H100)
    per contributor. No per-contributor divisions here: a 64-bit division is a ~100-instruction routine
    per element, and with one per contributor a round takes 3-4 us on an H100 (bench_decode_attention.py
    and a %globaltimer trace, docs/kernel_notes.md)."""
    offs_r = tl.arange(0, GROUP_RED)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_r < GROUP
    m_run = tl.full([GROUP_RED], float("-inf"), tl.float32)
    l_run = tl.zeros([GROUP_RED], tl.float32)
    acc_run = tl.zeros([GROUP_RED, BLOCK_D], tl.float32)
    for c0 in range(first, last + 1, RED_CHUNK):
        for i in tl.static_range(RED_CHUNK):
            p = c0 + i
            # Every contributor after the first starts inside this output: its partial is in its first slot.
            slot = tl.where(p == first, first_slot, 2 * p)
            ok = row_ok & (tl.zeros_like(offs_r) + p <= last)  # a [R] mask (the interpreter wants one)
            ml = part_ml_ptr + slot * (2 * GROUP_PAD) + offs_r
            # .cg: these lines were written by other SMs; never serve them from a stale L1.
            m_p = tl.load(ml, mask=ok, other=float("-inf"), cache_modifier=".cg")
            l_p = tl.load(ml + GROUP_PAD, mask=ok, other=0.0, cache_modifier=".cg")
            acc_p = tl.load(
                part_acc_ptr + slot * (GROUP_PAD * BLOCK_D) + offs_r[:, None] * BLOCK_D + offs_d[None, :],
                mask=ok[:, None],
                other=0.0,
                cache_modifier=".cg",
            )
            # Rows past GROUP stay -inf and turn NaN here; they are never stored. A masked contributor of
            # a real row has weight exp2(-inf) = 0 and scale 1.
            m_new = tl.maximum(m_run, m_p)
            alpha = tl.exp2(m_run - m_new)
            w = tl.exp2(m_p - m_new)
            l_run = l_run * alpha + w * l_p
            acc_run = acc_run * alpha[:, None] + w[:, None] * acc_p
            m_run = m_new
    return l_run, acc_run


@triton.jit
def count_in(
    counters_ptr,
    part_acc_ptr,
    part_ml_ptr,
    out_ptr,
    b,
    h,
    out_begin,
    n_tiles,
    count,
    total,
    active,
    stride_ob,
    stride_oh,
    GROUP: tl.constexpr,
    GROUP_RED: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    RED_CHUNK: tl.constexpr,
):
    """Add `count` tiles to split output (b, h)'s counter after this program's partial of it is stored;
    the contributor that completes the count merges all partials into the output and resets the counter."""
    tl.debug_barrier()  # all threads' partial stores are issued before the release below
    # Program p < A owns [p * total // A, (p + 1) * total // A), so unit x lies in the last program whose
    # start is <= x. The output's counter lives at its first contributor's slot.
    out_end = out_begin + n_tiles
    first = (((out_begin.to(tl.int64) + 1) * active - 1) // total).to(tl.int32)
    last = ((out_end.to(tl.int64) * active - 1) // total).to(tl.int32)
    first_start = (first * total // active).to(tl.int32)
    # The first contributor holds its partial of this output in its first slot if the output begins at
    # its start, else in its last slot; that slot also indexes the output's counter.
    first_slot = 2 * first + (first_start < out_begin).to(tl.int32)
    counter = counters_ptr + first_slot
    done = tl.atomic_add(counter, count, sem="acq_rel", scope="gpu") + count
    if done == n_tiles:
        l_out, acc_out = merge_partials(
            part_acc_ptr, part_ml_ptr, first, last, first_slot,
            GROUP, GROUP_RED, GROUP_PAD, BLOCK_D, RED_CHUNK,
        )  # fmt: skip
        offs_r = tl.arange(0, GROUP_RED)
        offs_d = tl.arange(0, BLOCK_D)
        o_ptrs = out_ptr + b * stride_ob + (h * GROUP + offs_r)[:, None] * stride_oh + offs_d[None, :]
        mask = (offs_r < GROUP)[:, None] & (offs_d[None, :] < HEAD_DIM)
        tl.store(o_ptrs, (acc_out / l_out[:, None]).to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(counter, 0)  # ready for the next launch or graph replay, no memset needed


_RED_ELEMENTS = 8192  # fp32 partial elements a reducer loads per round trip (64 registers a thread)
# Contributors unrolled per round at most: each costs its address and mask arithmetic even when masked
# (MHA at D=128 would otherwise unroll 64, and 32/32 heads at 4k has ~8 contributors an output).
_MAX_RED_CHUNK = 16


def red_chunk(group: int, head_dim: int) -> int:
    """Contributors a reducer loads per round: as many [group, head_dim] fp32 partials as fit
    _RED_ELEMENTS, at most _MAX_RED_CHUNK (B=1 with 8 KV heads has ~33 per output on an H100: 3 rounds
    at D=128, GQA 4)."""
    fit = _RED_ELEMENTS // (triton.next_power_of_2(group) * triton.next_power_of_2(head_dim))
    return max(1, min(_MAX_RED_CHUNK, fit))


@dataclass
class Workspace:
    """Scratch for split outputs, sized by the grid only (never by lengths), allocated once and reused
    so a warmed-up call can be captured in a CUDA graph. Counters start at 0 and the reducer resets them."""

    part_acc: torch.Tensor  # [2P, GROUP_PAD, BLOCK_D] fp32: 2p program p's first split output, 2p+1 its last
    part_ml: torch.Tensor  # [2P, 2, GROUP_PAD] fp32: running max (log2 units) and softmax denominator
    counters: torch.Tensor  # [2P] int32: tiles merged so far per split output, at its first partial's slot


_WORKSPACES: dict[tuple, Workspace] = {}


def workspace(device: torch.device, num_programs: int, group_pad: int, block_d: int) -> Workspace:
    """The workspace of a grid of `num_programs` programs on `device`: one per shape, created once."""
    key = (device, num_programs, group_pad, block_d)
    if key not in _WORKSPACES:
        slots = 2 * num_programs
        _WORKSPACES[key] = Workspace(
            part_acc=torch.empty(slots, group_pad, block_d, dtype=torch.float32, device=device),
            part_ml=torch.empty(slots, 2, group_pad, dtype=torch.float32, device=device),
            counters=torch.zeros(slots, dtype=torch.int32, device=device),
        )
    return _WORKSPACES[key]
