"""LeanAttention decode kernel (Triton): one persistent launch splits all lean tiles (sequence x KV head x
context tile) of a paged KV cache evenly over the programs, stream-K style; outputs split between
programs are merged in the same launch by the last contributor to arrive (kernels/lean_merge.py). See
shared/design/lean_attention.md for the algorithm and the fix-up protocol."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from leanserve.kernels.launch import interpreted, sm_count, use_pdl
from leanserve.kernels.lean_merge import count_in, red_chunk, workspace

_LOG2E = 1.4426950408889634


# batch and min_tiles are plain runtime values: Triton would otherwise compile a variant for value 1.
@triton.jit(do_not_specialize=["batch", "min_tiles"])
def _lean_decode_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    out_ptr,
    part_acc_ptr,  # [2 * programs, GROUP_PAD, BLOCK_D] fp32: slot 2p = program p's first, 2p+1 its last
    part_ml_ptr,  # [2 * programs, 2, GROUP_PAD] fp32: running max (log2 units) and softmax denominator
    counters_ptr,  # [2 * programs] int32: tiles merged so far per split output, indexed by its first slot
    stamps_ptr,  # [2] int64 (TIMED): the launch's first start and last end in ns, folded in by atomics
    batch,
    min_tiles,  # fewest tiles per active program
    qk_scale,  # sm_scale * log2(e): scores come out in log2 units for exp2
    stride_qb,
    stride_qh,
    stride_kn,
    stride_kb,
    stride_kh,
    stride_vn,
    stride_vb,
    stride_vh,
    stride_btb,
    stride_ob,
    stride_oh,
    NUM_KV_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    GROUP_RED: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    TILE: tl.constexpr,
    BLOCK_B: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    RED_CHUNK: tl.constexpr,
    TIMED: tl.constexpr,
    PDL: tl.constexpr,
):
    pid = tl.program_id(0)
    num_progs = tl.num_programs(0)

    # Partition, on the device from seq_lens: tile units ordered (sequence, KV head, tile).
    offs_b = tl.arange(0, BLOCK_B)
    lens = tl.maximum(tl.load(seq_lens_ptr + offs_b, mask=offs_b < batch, other=0), 0)
    units = tl.cdiv(lens, TILE) * NUM_KV_HEADS
    units_end = tl.cumsum(units, axis=0)  # inclusive: sequence b owns units [end[b] - units[b], end[b])
    total = tl.sum(units, axis=0).to(tl.int64)
    active = _active_programs(units, batch, total, num_progs, min_tiles, NUM_KV_HEADS)
    start = (tl.minimum(pid, active) * total // active).to(tl.int32)
    end = (tl.minimum(pid + 1, active) * total // active).to(tl.int32)

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, BLOCK_D)
    offs_t = tl.arange(0, TILE)
    g_mask = offs_g < GROUP
    gd_mask = g_mask[:, None] & (offs_d[None, :] < HEAD_DIM)
    td_mask_d = offs_d[None, :] < HEAD_DIM

    # One flat loop over the program's units, so the software pipeline never restarts at an output
    # boundary: the next unit's location, page ids and K/V loads never wait for the current epilogue.
    b, h, out_begin, n_tiles, seq_len = _locate(start, units_end, lens, offs_b, NUM_KV_HEADS, TILE)
    tile = start - out_begin
    tok = tile * TILE + offs_t
    next_page = tl.load(block_tables_ptr + b.to(tl.int64) * stride_btb + tok // PAGE_SIZE, mask=tok < seq_len)
    # With PDL the grid is scheduled while the previous kernel (RoPE + cache write) still runs: lengths,
    # partition and first page ids above are done by then; q, K/V and every write wait for it here.
    if PDL:
        tl.extra.cuda.gdc_wait()
    if TIMED:
        tl.atomic_min(stamps_ptr + tl.arange(0, 1), _global_time_ns(), sem="relaxed")

    # Sequences with no tokens own no units: spread their zero outputs over the programs.
    for zb in range(pid, batch, num_progs):
        if tl.load(seq_lens_ptr + zb) <= 0:
            for zh in range(NUM_KV_HEADS):
                o_ptrs = (
                    out_ptr + zb * stride_ob + (zh * GROUP + offs_g)[:, None] * stride_oh + offs_d[None, :]
                )
                tl.store(o_ptrs, tl.zeros([GROUP_PAD, BLOCK_D], tl.float32), mask=gd_mask)

    # A program with no units (start == end) locates b one past the batch: it must read nothing there.
    q_rows = tl.where(start < end, GROUP, 0)
    q = _load_q(q_ptr, b, h, q_rows, stride_qb, stride_qh, offs_g, offs_d, HEAD_DIM, GROUP, UPCAST)
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, BLOCK_D], tl.float32)
    seg_begin = start
    # The split outputs this program counts in after the loop: (b, h, first unit, tiles, own tiles).
    first_b, first_h, first_begin, first_n, first_tiles = 0, 0, 0, 1, 0
    last_b, last_h, last_begin, last_n, last_tiles = 0, 0, 0, 1, 0
    for u in range(start, end):
        # Where unit u + 1 lies: the same output's next tile, or the first tile of the next output.
        out_done = tile + 1 == n_tiles
        if out_done:
            nb, nh, n_begin, n_n, n_len = _locate(u + 1, units_end, lens, offs_b, NUM_KV_HEADS, TILE)
            n_tile = u + 1 - n_begin
        else:
            nb, nh, n_begin, n_n, n_len, n_tile = b, h, out_begin, n_tiles, seq_len, tile + 1
        # Page ids and the query are fetched a tile ahead, so the K/V loads of a tile depend on no load of
        # their own iteration and the pipeliner keeps num_stages - 1 K/V tiles in flight (the query of
        # the same output comes from L1).
        page = next_page.to(tl.int64)
        # (past the program's last unit, nb may be one past the batch: nothing is read there)
        has_next = u + 1 < end
        q_rows = tl.where(has_next, GROUP, 0)
        next_q = _load_q(q_ptr, nb, nh, q_rows, stride_qb, stride_qh, offs_g, offs_d, HEAD_DIM, GROUP, UPCAST)
        n_tok = n_tile * TILE + offs_t
        next_page = tl.load(
            block_tables_ptr + nb.to(tl.int64) * stride_btb + n_tok // PAGE_SIZE,
            mask=n_tok < tl.where(has_next, n_len, 0),
            other=0,
        )
        tok = tile * TILE + offs_t
        tok_mask = tok < seq_len
        row = (tok % PAGE_SIZE)[:, None]
        kv_mask = tok_mask[:, None] & td_mask_d
        k = tl.load(
            k_ptr + h * stride_kh + page[:, None] * stride_kn + row * stride_kb + offs_d[None, :],
            mask=kv_mask,
            other=0.0,
        )
        v = tl.load(
            v_ptr + h * stride_vh + page[:, None] * stride_vn + row * stride_vb + offs_d[None, :],
            mask=kv_mask,
            other=0.0,
        )
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [GROUP_PAD, TILE]
        s = tl.where(tok_mask[None, :], s, float("-inf"))
        # Every tile holds at least one token, so m_new is finite and exp2(-inf - m_new) is 0.
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

        if out_done | (u + 1 == end):
            # The end of a segment: this program's tiles [seg_begin, u] of output (b, h).
            if (seg_begin == out_begin) & out_done:
                o_ptrs = out_ptr + b * stride_ob + (h * GROUP + offs_g)[:, None] * stride_oh + offs_d[None, :]
                tl.store(o_ptrs, (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=gd_mask)
            else:
                # A split output: publish the partial (its real rows), then count its tiles in.
                slot = 2 * pid + (seg_begin != start).to(tl.int32)
                acc_ptrs = (
                    part_acc_ptr + slot * (GROUP_PAD * BLOCK_D) + offs_g[:, None] * BLOCK_D + offs_d[None, :]
                )
                ml_ptrs = part_ml_ptr + slot * (2 * GROUP_PAD) + offs_g
                tl.store(acc_ptrs, acc, mask=g_mask[:, None])
                tl.store(ml_ptrs, m_i, mask=g_mask)
                tl.store(ml_ptrs + GROUP_PAD, l_i, mask=g_mask)
                # Count in after the loop (no atomics or merges inside keeps it pipelined): a program has
                # at most two split outputs, its first and its last. Counting the first in late also
                # finds its stores long landed, so the release before the atomic costs nothing.
                if seg_begin == start:
                    first_b, first_h, first_begin, first_n, first_tiles = (
                        b,
                        h,
                        out_begin,
                        n_tiles,
                        u + 1 - seg_begin,
                    )
                else:
                    last_b, last_h, last_begin, last_n, last_tiles = (
                        b,
                        h,
                        out_begin,
                        n_tiles,
                        u + 1 - seg_begin,
                    )
            m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
            l_i = tl.zeros([GROUP_PAD], tl.float32)
            acc = tl.zeros([GROUP_PAD, BLOCK_D], tl.float32)
            seg_begin = u + 1
        b, h, out_begin, n_tiles, seq_len, tile, q = nb, nh, n_begin, n_n, n_len, n_tile, next_q
    if first_tiles > 0:
        count_in(
            counters_ptr, part_acc_ptr, part_ml_ptr, out_ptr, first_b, first_h, first_begin, first_n,
            first_tiles, total, active, stride_ob, stride_oh,
            GROUP, GROUP_RED, GROUP_PAD, HEAD_DIM, BLOCK_D, RED_CHUNK,
        )  # fmt: skip
    if last_tiles > 0:
        count_in(
            counters_ptr, part_acc_ptr, part_ml_ptr, out_ptr, last_b, last_h, last_begin, last_n,
            last_tiles, total, active, stride_ob, stride_oh,
            GROUP, GROUP_RED, GROUP_PAD, HEAD_DIM, BLOCK_D, RED_CHUNK,
        )  # fmt: skip
    if TIMED:
        tl.atomic_max(stamps_ptr + 1 + tl.arange(0, 1), _global_time_ns(), sem="relaxed")


@triton.jit
def _active_programs(units, batch, total, num_progs, min_tiles, NUM_KV_HEADS: tl.constexpr):
    """How many programs share the units (units: [BLOCK_B] a sequence, 0 past the batch; total: their
    sum). Short batches use fewer (>= min_tiles each): fewer partials per output to merge. Where every
    sequence has the same tile count and a grid of whole outputs per program leaves at most 1/16 of the
    programs idle, that grid: no output is split, so there is no partial, count-in or merge at all (an
    H100 at 64 x 1.5k tokens: 154 -> 148 us; B=32 x 4k 193 -> 189; docs/kernel_notes.md, session 14)."""
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
def _global_time_ns():
    """[1] int64: the GPU's global timer in ns (%globaltimer; it ticks every 32 ns on an H100, measured).
    The dummy operand gives the result its shape; is_pure=False keeps each read where it is written."""
    zero = tl.zeros([1], tl.int32)
    return tl.inline_asm_elementwise(
        "mov.u64 $0, %globaltimer;", "=l,r", [zero], dtype=tl.int64, is_pure=False, pack=1
    )


@triton.jit
def _locate(u, units_end, lens, offs_b, NUM_KV_HEADS: tl.constexpr, TILE: tl.constexpr):
    """Unit u's sequence b, KV head h, the first unit of output (b, h), its tile count and the
    sequence length; from the partition vectors in registers (no memory access)."""
    b = tl.sum((units_end <= u).to(tl.int32), axis=0)
    seq_end = tl.sum(tl.where(offs_b == b, units_end, 0), axis=0)
    seq_len = tl.sum(tl.where(offs_b == b, lens, 0), axis=0)
    n_tiles = tl.cdiv(seq_len, TILE)
    seq_begin = seq_end - n_tiles * NUM_KV_HEADS
    h = (u - seq_begin) // tl.maximum(n_tiles, 1)
    return b, h, seq_begin + h * n_tiles, n_tiles, seq_len


@triton.jit
def _load_q(
    q_ptr, b, h, rows, stride_qb, stride_qh, offs_g, offs_d, HEAD_DIM: tl.constexpr, GROUP: tl.constexpr,
    UPCAST: tl.constexpr,
):  # fmt: skip
    """The first `rows` of the GROUP query heads of KV head h of sequence b: [GROUP_PAD, BLOCK_D],
    other rows 0."""
    mask = (offs_g < rows)[:, None] & (offs_d < HEAD_DIM)[None, :]
    q = tl.load(
        q_ptr + b * stride_qb + (h * GROUP + offs_g)[:, None] * stride_qh + offs_d[None, :],
        mask=mask,
        other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)
    return q


@dataclass(frozen=True)
class LeanConfig:
    """Launch parameters of one head dim: tokens per lean tile, warps, pipeline stages, programs per SM,
    and the fewest tiles an active program takes (short batches run on fewer programs)."""

    tile: int
    num_warps: int
    num_stages: int
    programs_per_sm: int
    min_tiles: int = 2


# Tuned on an H100 (sweep 3 of docs/kernel_notes.md: tile 64/128 x warps 4/8 x stages 2-4 x programs per
# SM 1-3 x min_tiles 1/2/4; best geometric mean of % floor over B=1 1k/4k/128k, B=32 4k, B=256 1k and a
# ragged batch, within 1% of the runner-up). The page ids are prefetched a tile ahead, so num_stages - 1
# K/V tiles are in flight per program: D=128 64-token tiles (32 KB of K+V) x 2 in flight x 2 programs per
# SM (~200 registers a thread allow 2). 8 warps lost everywhere. min_tiles 2 puts short batches on fewer
# programs, so fewer partials per output are merged. D=64 shares the D=128 choice (best on the batched
# default-model shape); D=96 pads to 128; D=256 is checked for correctness only (not tuned).
_CONFIGS: dict[int, LeanConfig] = {
    64: LeanConfig(tile=64, num_warps=4, num_stages=3, programs_per_sm=2),
    96: LeanConfig(tile=64, num_warps=4, num_stages=3, programs_per_sm=2),
    128: LeanConfig(tile=64, num_warps=4, num_stages=3, programs_per_sm=2),
    256: LeanConfig(tile=64, num_warps=8, num_stages=2, programs_per_sm=1),
}
_MAX_GROUP = 64  # query heads per KV head accepted: the [GROUP_PAD, D] fp32 accumulator grows with it
_INTERPRETER_PROGRAMS = 4  # programs when run under TRITON_INTERPRET (no SMs to fill; programs run serially)


def _default_programs(device: torch.device, config: LeanConfig) -> int:
    if device.type != "cuda":
        return _INTERPRETER_PROGRAMS
    return sm_count(device) * config.programs_per_sm


def _validate(q, k_cache, v_cache, block_tables, seq_lens, out) -> None:
    if q.dim() != 3:
        raise ValueError(f"q must be [batch, num_q_heads, head_dim], got shape {tuple(q.shape)}")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            "k_cache and v_cache must both be [num_blocks, block_size, num_kv_heads, head_dim], got "
            f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q must be float16, bfloat16 or float32, got {q.dtype}")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(
            f"q, k_cache and v_cache must share a dtype, got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}"
        )
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"head_dim of q ({head_dim}) and of the cache ({k_cache.shape[3]}) differ")
    if head_dim not in _CONFIGS:
        raise ValueError(f"head_dim {head_dim} is not supported (supported: {sorted(_CONFIGS)})")
    if num_q_heads % num_kv_heads != 0:
        raise ValueError(f"num_q_heads ({num_q_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    if num_q_heads // num_kv_heads > _MAX_GROUP:
        raise ValueError(f"at most {_MAX_GROUP} query heads per KV head, got {num_q_heads // num_kv_heads}")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("q, k_cache and v_cache must be contiguous in head_dim (stride 1 in the last dim)")
    if block_tables.dtype != torch.int32 or block_tables.dim() != 2 or block_tables.shape[0] != batch:
        raise ValueError(
            f"block_tables must be int32 [batch={batch}, max_blocks], got {block_tables.dtype} "
            f"{tuple(block_tables.shape)}"
        )
    if block_tables.stride(-1) != 1:
        raise ValueError("block_tables must be contiguous in its last dim")
    if seq_lens.dtype != torch.int32 or tuple(seq_lens.shape) != (batch,) or not seq_lens.is_contiguous():
        raise ValueError(
            f"seq_lens must be a contiguous int32 [batch={batch}], "
            f"got {seq_lens.dtype} {tuple(seq_lens.shape)}"
        )
    devices = {t.device for t in (q, k_cache, v_cache, block_tables, seq_lens)}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype or out.device != q.device):
        raise ValueError(
            f"out must be {tuple(q.shape)} {q.dtype} on {q.device}, "
            f"got {tuple(out.shape)} {out.dtype} on {out.device}"
        )
    if out is not None and out.stride(-1) != 1:
        raise ValueError("out must be contiguous in head_dim")


def _validate_timestamps(timestamps: torch.Tensor | None, device: torch.device) -> None:
    if timestamps is None:
        return
    if interpreted() or device.type != "cuda":
        raise ValueError(
            "timestamps read the GPU's global timer: they need a CUDA device (not the interpreter)"
        )
    if timestamps.dtype != torch.int64 or tuple(timestamps.shape) != (2,) or not timestamps.is_contiguous():
        raise ValueError(
            f"timestamps must be a contiguous int64 [2], got {timestamps.dtype} {tuple(timestamps.shape)}"
        )
    if timestamps.device != device:
        raise ValueError(f"timestamps must be on {device}, got {timestamps.device}")


def _launch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    sm_scale: float | None,
    out: torch.Tensor | None,
    config: LeanConfig,
    num_programs: int | None = None,
    timestamps: torch.Tensor | None = None,
) -> torch.Tensor:
    """The launcher behind `lean_attention_decode` with explicit launch parameters; `num_programs`
    overrides the grid (tests force a few programs so outputs split across 3+ of them; tuning sweeps)."""
    _validate(q, k_cache, v_cache, block_tables, seq_lens, out)
    _validate_timestamps(timestamps, q.device)
    batch, num_q_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    group_pad = max(16, triton.next_power_of_2(group))  # tl.dot needs >= 16 rows
    block_d = triton.next_power_of_2(head_dim)
    if out is None:
        out = torch.empty_like(q)
    if batch == 0:
        return out
    programs = num_programs or _default_programs(q.device, config)
    ws = workspace(q.device, programs, group_pad, block_d)
    scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else sm_scale
    pdl = use_pdl(q.device)
    _lean_decode_kernel[(programs,)](
        q,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        out,
        ws.part_acc,
        ws.part_ml,
        ws.counters,
        timestamps,
        batch,
        config.min_tiles,
        scale * _LOG2E,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        NUM_KV_HEADS=num_kv_heads,
        GROUP=group,
        GROUP_PAD=group_pad,
        GROUP_RED=triton.next_power_of_2(group),
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        PAGE_SIZE=block_size,
        TILE=config.tile,
        BLOCK_B=max(2, triton.next_power_of_2(batch)),
        # The interpreter computes bf16 tl.dot wrongly (triton issue 11584): upcast its operands there.
        UPCAST=interpreted(),
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        RED_CHUNK=red_chunk(group, head_dim),
        TIMED=timestamps is not None,
        PDL=pdl,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        launch_pdl=pdl,
    )
    return out


def lean_attention_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    sm_scale: float | None = None,
    out: torch.Tensor | None = None,
    timestamps: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode attention of one new token per sequence against its paged cache, in one persistent launch.

    q: [B, Hq, D] fp16/bf16/fp32; k_cache, v_cache: [num_blocks, block_size, Hkv, D] same dtype;
    block_tables: [B, max_blocks] int32; seq_lens: [B] int32 (0 gives a zero output); sm_scale defaults
    to 1/sqrt(D); out: optional [B, Hq, D] buffer. Returns [B, Hq, D] in q's dtype. No host
    synchronisation: after one warm-up call (which allocates the workspace) it can be captured in a
    CUDA graph and replayed with new seq_lens and block tables.

    On Hopper it is launched with programmatic dependent launch: it reads seq_lens and block_tables
    (and partitions the work) while the kernel before it may still run, and waits for that kernel only
    before reading q and K/V and writing anything. So the kernel launched right before it must not be
    one of ours (kernels.launch) that writes seq_lens or block_tables; torch's kernels never let it in early.

    timestamps (CUDA only): an int64 [2] tensor the launch folds its GPU-side span into, in ns of the
    global timer: [0] = min(itself, first program start), [1] = max(itself, last program end). Fill it
    with (int64 max, 0) before the launch; end - start is then the kernel's own duration, measured
    without timing events (which cost ~3.5 us each inside a CUDA graph).
    """
    config = _CONFIGS.get(q.shape[-1]) if q.dim() == 3 else None
    if config is None:
        _validate(q, k_cache, v_cache, block_tables, seq_lens, out)  # raises the precise error
    return _launch(q, k_cache, v_cache, block_tables, seq_lens, sm_scale, out, config, timestamps=timestamps)
