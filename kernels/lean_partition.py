"""How LeanAttention's decode kernel (kernels/lean_decode.py) shares its work among the programs, on the
device from seq_lens: the lean tiles (sequence x KV head x context tile), ordered (sequence, KV head,
tile), are split into contiguous runs of nearly equal length, stream-K style, one run a program. The
merge of outputs split between programs (kernels/lean_merge.py) recomputes the same runs. Algorithm and
fix-up protocol: docs/kernel_notes.md."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def partition(seq_lens_ptr, batch, min_tiles, pid, num_progs, NUM_KV_HEADS: tl.constexpr, TILE: tl.constexpr,
              BLOCK_B: tl.constexpr):  # fmt: skip
    """Program pid's run of tile units [start, end), with what locating a unit needs: the clamped
    lengths, the inclusive prefix sum of units per sequence (sequence b owns units [end[b] - units[b],
    end[b])), the batch offsets, the total unit count and the number of programs with work."""
    offs_b = tl.arange(0, BLOCK_B)
    lens = tl.maximum(tl.load(seq_lens_ptr + offs_b, mask=offs_b < batch, other=0), 0)
    units = tl.cdiv(lens, TILE) * NUM_KV_HEADS
    units_end = tl.cumsum(units, axis=0)
    total = tl.sum(units, axis=0).to(tl.int64)
    active = _active_programs(units, batch, total, num_progs, min_tiles, NUM_KV_HEADS)
    start = (tl.minimum(pid, active) * total // active).to(tl.int32)
    end = (tl.minimum(pid + 1, active) * total // active).to(tl.int32)
    return lens, units_end, offs_b, total, active, start, end


@triton.jit
def _active_programs(units, batch, total, num_progs, min_tiles, NUM_KV_HEADS: tl.constexpr):
    """How many programs share the units (units: [BLOCK_B] a sequence, 0 past the batch; total: their
    sum). Short batches use fewer (>= min_tiles each): fewer partials per output to merge. Where every
    sequence has the same tile count and a grid of whole outputs per program leaves at most 1/16 of the
    programs idle, that grid: no output is split, so there is no partial, count-in or merge at all. On an
    H100 that saves ~4 us a launch on batches of one length (B=32 4k 193 vs 189 us, B=256 1k 381 vs 374;
    bench_decode_attention.py, docs/benchmarks.md)."""
    active = tl.maximum(tl.minimum(total // min_tiles, num_progs), 1)
    # One reduction: every sequence has the most units iff the units sum to batch x the most.
    most = tl.max(units, axis=0)  # 0 past the batch
    equal = (most > 0) & (most.to(tl.int64) * batch == total)
    outputs = batch * NUM_KV_HEADS
    per_program = tl.cdiv(outputs, num_progs)
    whole = outputs // per_program
    use_whole = equal & (outputs % per_program == 0) & (16 * whole >= 15 * num_progs)
    use_whole = use_whole & (per_program * (most // NUM_KV_HEADS) >= min_tiles)
    return tl.where(use_whole, whole, active)


@triton.jit
def locate(u, units_end, lens, offs_b, NUM_KV_HEADS: tl.constexpr, TILE: tl.constexpr):
    """Unit u's sequence b, KV head h, the first unit of output (b, h), its tile count and the
    sequence length; from the partition vectors in registers (no memory access)."""
    b = tl.sum((units_end <= u).to(tl.int32), axis=0)
    seq_end = tl.sum(tl.where(offs_b == b, units_end, 0), axis=0)
    seq_len = tl.sum(tl.where(offs_b == b, lens, 0), axis=0)
    n_tiles = tl.cdiv(seq_len, TILE)
    seq_begin = seq_end - n_tiles * NUM_KV_HEADS
    h = (u - seq_begin) // tl.maximum(n_tiles, 1)
    return b, h, seq_begin + h * n_tiles, n_tiles, seq_len
