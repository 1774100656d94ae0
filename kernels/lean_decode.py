"""LeanAttention's decode kernel (Triton): one persistent launch splits all lean tiles (sequence x KV head
x context tile) of a paged KV cache evenly over the programs (kernels/lean_partition.py), stream-K style;
outputs split between programs are merged in the same launch by the last contributor to arrive
(kernels/lean_merge.py). Its launcher is kernels/lean_attention.py. Algorithm and fix-up protocol:
docs/kernel_notes.md."""

from __future__ import annotations

import triton
import triton.language as tl

from leanserve.kernels.kv_quant import load_slot_major, run_pages
from leanserve.kernels.lean_merge import count_in
from leanserve.kernels.lean_partition import locate, partition


# batch and min_tiles are plain runtime values: Triton would otherwise compile a variant for value 1.
@triton.jit(do_not_specialize=["batch", "min_tiles"])
def _lean_decode_kernel(
    q_ptr, k_ptr, v_ptr, k_scale_ptr, v_scale_ptr, block_tables_ptr, seq_lens_ptr, out_ptr,
    part_acc_ptr, part_ml_ptr, counters_ptr, stamps_ptr,
    batch, min_tiles, qk_scale,
    stride_qb, stride_qh, stride_kn, stride_kb, stride_kh, stride_vn, stride_vb, stride_vh, stride_vd,
    stride_btb, stride_sn, stride_sb, stride_sh, stride_ob, stride_oh,
    NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, GROUP_RED: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAGE_SIZE: tl.constexpr, TILE: tl.constexpr,
    BLOCK_B: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, RED_CHUNK: tl.constexpr,
    TIMED: tl.constexpr, FP8: tl.constexpr, HALF_Q: tl.constexpr, E4M3: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """part_acc_ptr, part_ml_ptr, counters_ptr: the workspace (lean_merge.Workspace). stamps_ptr (TIMED):
    int64 [2], the launch's first start and last end in ns, folded in by atomics. min_tiles: fewest tiles
    per active program. qk_scale: sm_scale * log2(e), so scores come out in log2 units for exp2.
    k_scale_ptr, v_scale_ptr (FP8): the fp32 scales [num_blocks, block_size, Hkv] of the fp8 caches'
    rows (strides stride_sn, stride_sb, stride_sh, both alike). HALF_Q: q is fp16 or bf16 (see
    _attend_tile). stride_vd: V's stride along D, 1 but for an fp8 cache with slot-major V pages
    (stride_vb 1), which E4M3 (q half-precision too) multiplies in e4m3 on the tensor cores
    (_attend_tile_e4m3); the accumulator is then [BLOCK_D, GROUP_PAD], transposed."""
    pid = tl.program_id(0)
    num_progs = tl.num_programs(0)

    # Partition, on the device from seq_lens: tile units ordered (sequence, KV head, tile).
    lens, units_end, offs_b, total, active, start, end = partition(
        seq_lens_ptr, batch, min_tiles, pid, num_progs, NUM_KV_HEADS, TILE, BLOCK_B
    )
    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, BLOCK_D)
    offs_t = tl.arange(0, TILE)
    g_mask = offs_g < GROUP
    gd_mask = g_mask[:, None] & (offs_d[None, :] < HEAD_DIM)
    td_mask_d = offs_d[None, :] < HEAD_DIM

    # One flat loop over the program's units, so the software pipeline never restarts at an output
    # boundary: the next unit's location, page ids and K/V loads never wait for the current epilogue.
    b, h, out_begin, n_tiles, seq_len = locate(start, units_end, lens, offs_b, NUM_KV_HEADS, TILE)
    tile = start - out_begin
    tok = tile * TILE + offs_t
    table = block_tables_ptr + b.to(tl.int64) * stride_btb
    next_page = tl.load(table + tok // PAGE_SIZE, mask=tok < seq_len)
    next_runs = run_pages(table, tile * TILE, seq_len, PAGE_SIZE, TILE) if E4M3 else 0
    # With PDL the grid is scheduled while the previous kernel (RoPE + cache write) still runs: lengths,
    # partition and first page ids above are done by then; q, K/V and every write wait for it here.
    if PDL:
        tl.extra.cuda.gdc_wait()
    if TIMED:
        tl.atomic_min(stamps_ptr + tl.arange(0, 1), _global_time_ns(), sem="relaxed")
    _zero_empty_outputs(seq_lens_ptr, out_ptr, pid, batch, num_progs, stride_ob, stride_oh, offs_g, offs_d,
                        gd_mask, NUM_KV_HEADS, GROUP, GROUP_PAD, BLOCK_D)  # fmt: skip

    # A program with no units (start == end) locates b one past the batch: it must read nothing there.
    q_rows = tl.where(start < end, GROUP, 0)
    q = _load_q(q_ptr, b, h, q_rows, stride_qb, stride_qh, offs_g, offs_d, HEAD_DIM, GROUP, UPCAST)
    q_lo, q_scale = q, qk_scale
    if E4M3:
        q, q_lo, q_scale = _quantize_q(q, qk_scale, UPCAST)
    m_i, l_i, acc = _empty_state(GROUP_PAD, BLOCK_D, E4M3)
    seg_begin = start
    # The split outputs this program counts in after the loop: (b, h, first unit, tiles, own tiles).
    first_b, first_h, first_begin, first_n, first_tiles = 0, 0, 0, 1, 0
    last_b, last_h, last_begin, last_n, last_tiles = 0, 0, 0, 1, 0
    for u in range(start, end):
        out_done = tile + 1 == n_tiles
        nb, nh, n_begin, n_n, n_len, n_tile = _next_unit(
            u, out_done, b, h, out_begin, n_tiles, seq_len, tile, units_end, lens, offs_b, NUM_KV_HEADS, TILE
        )
        # Page ids and the query are fetched a tile ahead, so the K/V loads of a tile depend on no load of
        # their own iteration and the pipeliner keeps num_stages - 1 K/V tiles in flight.
        page, runs = next_page.to(tl.int64), next_runs
        prefetched_q, next_page, next_runs = _prefetch(
            q_ptr, block_tables_ptr, u, end, nb, nh, n_tile, n_len, stride_qb, stride_qh, stride_btb,
            offs_g, offs_d, offs_t, HEAD_DIM, GROUP, PAGE_SIZE, TILE, UPCAST, E4M3,
        )  # fmt: skip
        if E4M3:
            m_i, l_i, acc = _attend_tile_e4m3(
                q, q_lo, q_scale, k_ptr, v_ptr, k_scale_ptr, v_scale_ptr, page, runs, h, tile, seq_len, m_i,
                l_i, acc, stride_kn, stride_kb, stride_kh, stride_vn, stride_vh, stride_vd, stride_sn,
                stride_sb, stride_sh, offs_d, offs_t, HEAD_DIM, BLOCK_D, PAGE_SIZE, TILE, UPCAST,
            )  # fmt: skip
        else:
            m_i, l_i, acc = _attend_tile(
                q, k_ptr, v_ptr, k_scale_ptr, v_scale_ptr, page, h, tile, seq_len, m_i, l_i, acc, qk_scale,
                stride_kn, stride_kb, stride_kh, stride_vn, stride_vb, stride_vh, stride_vd, stride_sn,
                stride_sb, stride_sh, offs_d, offs_t, td_mask_d, PAGE_SIZE, TILE, UPCAST, DOT_PRECISION, FP8,
                HALF_Q,
            )  # fmt: skip

        if out_done | (u + 1 == end):
            # The end of a segment: this program's tiles [seg_begin, u] of output (b, h).
            if E4M3:
                acc = tl.trans(acc)
            if (seg_begin == out_begin) & out_done:
                _store_output(out_ptr, b, h, acc, l_i, stride_ob, stride_oh, offs_g, offs_d, gd_mask, GROUP)
            else:
                # A split output: publish the partial (its real rows), then count its tiles in.
                slot = 2 * pid + (seg_begin != start).to(tl.int32)
                _publish_partial(part_acc_ptr, part_ml_ptr, slot, acc, m_i, l_i, offs_g, offs_d, g_mask,
                                 GROUP_PAD, BLOCK_D)  # fmt: skip
                # Count in after the loop (no atomics or merges inside keeps it pipelined): a program has
                # at most two split outputs, its first and its last. Counting the first in late also
                # finds its stores long landed, so the release before the atomic costs nothing.
                if seg_begin == start:
                    first_b, first_h, first_begin, first_n = b, h, out_begin, n_tiles
                    first_tiles = u + 1 - seg_begin
                else:
                    last_b, last_h, last_begin, last_n = b, h, out_begin, n_tiles
                    last_tiles = u + 1 - seg_begin
            m_i, l_i, acc = _empty_state(GROUP_PAD, BLOCK_D, E4M3)
            seg_begin = u + 1
        if E4M3:
            # The query changes with the output only: quantized once an output, not once a tile.
            next_q = q
            if out_done:
                q_rows = tl.where(u + 1 < end, GROUP, 0)
                next_q = _load_q(q_ptr, nb, nh, q_rows, stride_qb, stride_qh, offs_g, offs_d, HEAD_DIM, GROUP,
                                 UPCAST)  # fmt: skip
                next_q, q_lo, q_scale = _quantize_q(next_q, qk_scale, UPCAST)
        else:
            next_q = prefetched_q
        b, h, out_begin, n_tiles, seq_len, tile, q = nb, nh, n_begin, n_n, n_len, n_tile, next_q
    if first_tiles > 0:
        count_in(counters_ptr, part_acc_ptr, part_ml_ptr, out_ptr, first_b, first_h, first_begin, first_n,
                 first_tiles, total, active, stride_ob, stride_oh,
                 GROUP, GROUP_RED, GROUP_PAD, HEAD_DIM, BLOCK_D, RED_CHUNK)  # fmt: skip
    if last_tiles > 0:
        count_in(counters_ptr, part_acc_ptr, part_ml_ptr, out_ptr, last_b, last_h, last_begin, last_n,
                 last_tiles, total, active, stride_ob, stride_oh,
                 GROUP, GROUP_RED, GROUP_PAD, HEAD_DIM, BLOCK_D, RED_CHUNK)  # fmt: skip
    if TIMED:
        tl.atomic_max(stamps_ptr + 1 + tl.arange(0, 1), _global_time_ns(), sem="relaxed")


@triton.jit
def _empty_state(GROUP_PAD: tl.constexpr, BLOCK_D: tl.constexpr, TRANSPOSED: tl.constexpr):
    """A segment's online-softmax state before its first tile: running max, denominator, accumulator
    ([BLOCK_D, GROUP_PAD] if TRANSPOSED)."""
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    if TRANSPOSED:
        acc = tl.zeros([BLOCK_D, GROUP_PAD], tl.float32)
    else:
        acc = tl.zeros([GROUP_PAD, BLOCK_D], tl.float32)
    return m_i, l_i, acc


@triton.jit
def _zero_empty_outputs(
    seq_lens_ptr, out_ptr, pid, batch, num_progs, stride_ob, stride_oh, offs_g, offs_d, gd_mask,
    NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Sequences with no tokens own no units: their zero outputs, spread over the programs."""
    for zb in range(pid, batch, num_progs):
        if tl.load(seq_lens_ptr + zb) <= 0:
            for zh in range(NUM_KV_HEADS):
                o_ptrs = (
                    out_ptr + zb * stride_ob + (zh * GROUP + offs_g)[:, None] * stride_oh + offs_d[None, :]
                )
                tl.store(o_ptrs, tl.zeros([GROUP_PAD, BLOCK_D], tl.float32), mask=gd_mask)


@triton.jit
def _next_unit(
    u, out_done, b, h, out_begin, n_tiles, seq_len, tile, units_end, lens, offs_b, NUM_KV_HEADS: tl.constexpr,
    TILE: tl.constexpr,
):  # fmt: skip
    """Where unit u + 1 lies: the same output's next tile, or the first tile of the next output.
    Returns its (b, h, first unit of the output, tile count, sequence length, tile)."""
    if out_done:
        nb, nh, n_begin, n_n, n_len = locate(u + 1, units_end, lens, offs_b, NUM_KV_HEADS, TILE)
        n_tile = u + 1 - n_begin
    else:
        nb, nh, n_begin, n_n, n_len, n_tile = b, h, out_begin, n_tiles, seq_len, tile + 1
    return nb, nh, n_begin, n_n, n_len, n_tile


@triton.jit
def _prefetch(
    q_ptr, block_tables_ptr, u, end, nb, nh, n_tile, n_len, stride_qb, stride_qh, stride_btb, offs_g, offs_d,
    offs_t, HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, PAGE_SIZE: tl.constexpr, TILE: tl.constexpr,
    UPCAST: tl.constexpr, E4M3: tl.constexpr,
):  # fmt: skip
    """The query (but for E4M3: 0), page ids and (E4M3) V's run pages (kv_quant.run_pages; else 0) of
    unit u + 1 (the query of the same output comes from L1). Past the program's last unit, nb may be one
    past the batch: nothing is read there."""
    has_next = u + 1 < end
    next_q = 0
    if not E4M3:
        q_rows = tl.where(has_next, GROUP, 0)
        next_q = _load_q(q_ptr, nb, nh, q_rows, stride_qb, stride_qh, offs_g, offs_d, HEAD_DIM, GROUP, UPCAST)
    n_tok = n_tile * TILE + offs_t
    table = block_tables_ptr + nb.to(tl.int64) * stride_btb
    n_len = tl.where(has_next, n_len, 0)
    next_page = tl.load(table + n_tok // PAGE_SIZE, mask=n_tok < n_len, other=0)
    next_runs = run_pages(table, n_tile * TILE, n_len, PAGE_SIZE, TILE) if E4M3 else 0
    return next_q, next_page, next_runs


@triton.jit
def _attend_tile(
    q, k_ptr, v_ptr, k_scale_ptr, v_scale_ptr, page, h, tile, seq_len, m_i, l_i, acc, qk_scale, stride_kn,
    stride_kb, stride_kh, stride_vn, stride_vb, stride_vh, stride_vd, stride_sn, stride_sb, stride_sh, offs_d,
    offs_t, td_mask_d, PAGE_SIZE: tl.constexpr, TILE: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr, FP8: tl.constexpr, HALF_Q: tl.constexpr,
):  # fmt: skip
    """One online-softmax step: the running max m_i, denominator l_i and accumulator acc of KV head h's
    query heads, updated with the tile's K/V (page: its page ids). Returns (m_i, l_i, acc).
    FP8: K/V are widened in registers (exact), to fp16 for a half-precision q (HALF_Q), bf16 included:
    e4m3 -> fp16 is one conversion a pair, where bf16 takes a second per element (F2F.BF16.F16, the fp8
    loop's costliest instruction on an H100: benchmarks.md, FP8 KV cache); to fp32 for an fp32 q. The
    per-token scales go on the [GROUP_PAD, TILE] scores and probabilities instead of the [TILE, D] tiles:
    s = ((q qk_scale) . k_fp8) k_scale, q scaled before it is rounded to fp16 (sm_scale keeps it far
    from fp16's range), and acc += m (p v_scale / m) @ v_fp8 with m the tile's largest V scale, so the
    fp16 probabilities stay within [0, 1]."""
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
        v_ptr + h * stride_vh + page[:, None] * stride_vn + row * stride_vb + offs_d[None, :] * stride_vd,
        mask=kv_mask,
        other=0.0,
    )
    if FP8 and HALF_Q:
        k = k.to(tl.float16)
        v = v.to(tl.float16)
        q = (q * qk_scale).to(tl.float16)
    elif FP8:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
        q = q * qk_scale
    if UPCAST:
        q = q.to(tl.float32)
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [GROUP_PAD, TILE]
    if FP8:
        scale_offs = h * stride_sh + page * stride_sn + (tok % PAGE_SIZE) * stride_sb
        s = s * tl.load(k_scale_ptr + scale_offs, mask=tok_mask, other=0.0)[None, :]
    else:
        s = s * qk_scale
    s = tl.where(tok_mask[None, :], s, float("-inf"))
    # Every tile holds at least one token, so m_new is finite and exp2(-inf - m_new) is 0.
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if FP8:
        # Scales are >= 1e-12 (kernels.fp8.fp8_scale) and a tile holds a token: v_max > 0.
        v_scale = tl.load(v_scale_ptr + scale_offs, mask=tok_mask, other=0.0)
        v_max = tl.max(v_scale, axis=0)
        p = p * (v_scale * (1.0 / v_max))[None, :]
        pv = tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION) * v_max
    else:
        pv = tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    acc = acc * alpha[:, None] + pv
    return m_new, l_i, acc


@triton.jit
def _attend_tile_e4m3(
    q_hi, q_lo, q_scale, k_ptr, v_ptr, k_scale_ptr, v_scale_ptr, page, runs, h, tile, seq_len, m_i, l_i, acc,
    stride_kn, stride_kb, stride_kh, stride_vn, stride_vh, stride_vd, stride_sn, stride_sb, stride_sh, offs_d,
    offs_t, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAGE_SIZE: tl.constexpr, TILE: tl.constexpr,
    ROUND_FIRST: tl.constexpr,
):  # fmt: skip
    """_attend_tile for an fp8 cache whose V pages are slot-major, with both products on e4m3 tensor
    cores and nothing widened: e4m3 MMAs take their operands K-major, which K's rows are along D (the
    scores' reduction) and slot-major V pages are along the slots (P V's). Scores and probabilities are
    transposed, [TILE, GROUP_PAD], with the tile's tokens on the MMA's M side (GROUP_PAD is below its 64),
    and so is the accumulator, [BLOCK_D, GROUP_PAD]. page: K's page ids a token; runs: V's a run of slots
    (kv_quant.run_pages), both fetched a tile ahead.
    q and p each enter as two e4m3 terms, hi + lo (_quantize_q, _split_e4m3): one term alone rounds to 3
    mantissa bits and moves the output by ~3% (random data), the pair by ~0.1%, for two more MMAs."""
    tok = tile * TILE + offs_t
    tok_mask = tok < seq_len
    k = tl.load(
        k_ptr + h * stride_kh + page[:, None] * stride_kn + (tok % PAGE_SIZE)[:, None] * stride_kb
        + offs_d[None, :],
        mask=tok_mask[:, None] & (offs_d < HEAD_DIM)[None, :],
        other=0.0,
    )  # fmt: skip
    vt = load_slot_major(v_ptr, runs, h, tile * TILE, seq_len, stride_vn, stride_vh, stride_vd, offs_d,
                         HEAD_DIM, BLOCK_D, PAGE_SIZE, TILE)  # fmt: skip
    st = tl.dot(k, tl.trans(q_lo), tl.dot(k, tl.trans(q_hi)))  # [TILE, GROUP_PAD]
    scale_offs = h * stride_sh + page * stride_sn + (tok % PAGE_SIZE) * stride_sb
    k_scale = tl.load(k_scale_ptr + scale_offs, mask=tok_mask, other=0.0)
    st = tl.where(tok_mask[:, None], st * k_scale[:, None] * q_scale[None, :], float("-inf"))
    # Every tile holds at least one token, so m_new is finite and exp2(-inf - m_new) is 0.
    m_new = tl.maximum(m_i, tl.max(st, axis=0))
    alpha = tl.exp2(m_i - m_new)
    pt = tl.exp2(st - m_new[None, :])
    l_i = l_i * alpha + tl.sum(pt, axis=0)
    # V's scales go on the probabilities, over the tile's largest so they stay within [0, 256]: e4m3
    # keeps 3 mantissa bits down to 2^-6, so the 256 keeps small probabilities out of its subnormals.
    # Scales are >= 1e-12 (kernels.fp8.fp8_scale) and a tile holds a token: v_max > 0.
    v_scale = tl.load(v_scale_ptr + scale_offs, mask=tok_mask, other=0.0)
    v_max = tl.max(v_scale, axis=0)
    p_hi, p_lo = _split_e4m3(pt * (v_scale * (256.0 / v_max))[:, None], ROUND_FIRST)
    pv = tl.dot(vt, p_lo, tl.dot(vt, p_hi))  # [BLOCK_D, GROUP_PAD]
    acc = acc * alpha[None, :] + pv * (v_max * (1.0 / 256.0))
    return m_new, l_i, acc


@triton.jit
def _to_e4m3(x, ROUND_FIRST: tl.constexpr):
    """fp32 x (|x| <= 448) to e4m3, rounded to nearest even. ROUND_FIRST (the interpreter, whose fp32 ->
    e4m3 conversion drops a rounding carry into the exponent: 1.95 -> 1): rounded to 3 mantissa bits in
    fp32 first, which converts exactly where x is normal in e4m3."""
    if ROUND_FIRST:
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -0x100000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(tl.float8e4nv)


@triton.jit
def _split_e4m3(x, ROUND_FIRST: tl.constexpr):
    """fp32 x (|x| <= 448) as two e4m3 terms, hi + lo ~ x to ~7 mantissa bits."""
    hi = _to_e4m3(x, ROUND_FIRST)
    return hi, _to_e4m3(x - hi.to(tl.float32), ROUND_FIRST)


@triton.jit
def _quantize_q(q, qk_scale, ROUND_FIRST: tl.constexpr):
    """q qk_scale as e4m3 terms with a scale a row: (hi, lo, scale [GROUP_PAD]), q qk_scale ~ (hi + lo)
    scale, each row's largest magnitude at 448. Rows of zeros keep a tiny positive scale."""
    q = q.to(tl.float32) * qk_scale
    amax = tl.maximum(tl.max(tl.abs(q), axis=1), 1e-30)
    hi, lo = _split_e4m3(q * (448.0 / amax)[:, None], ROUND_FIRST)
    return hi, lo, amax * (1.0 / 448.0)


@triton.jit
def _store_output(
    out_ptr, b, h, acc, l_i, stride_ob, stride_oh, offs_g, offs_d, gd_mask, GROUP: tl.constexpr
):
    """A whole output (b, h), normalised, in the output's dtype."""
    o_ptrs = out_ptr + b * stride_ob + (h * GROUP + offs_g)[:, None] * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=gd_mask)


@triton.jit
def _publish_partial(
    part_acc_ptr, part_ml_ptr, slot, acc, m_i, l_i, offs_g, offs_d, g_mask, GROUP_PAD: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    """A split output's partial (its real rows) into workspace slot `slot`, for the merge."""
    acc_ptrs = part_acc_ptr + slot * (GROUP_PAD * BLOCK_D) + offs_g[:, None] * BLOCK_D + offs_d[None, :]
    ml_ptrs = part_ml_ptr + slot * (2 * GROUP_PAD) + offs_g
    tl.store(acc_ptrs, acc, mask=g_mask[:, None])
    tl.store(ml_ptrs, m_i, mask=g_mask)
    tl.store(ml_ptrs + GROUP_PAD, l_i, mask=g_mask)


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


@triton.jit
def _global_time_ns():
    """[1] int64: the GPU's global timer in ns (%globaltimer; 32 ns ticks on an H100, docs/kernel_notes.md).
    The dummy operand gives the result its shape; is_pure=False keeps each read where it is written."""
    zero = tl.zeros([1], tl.int32)
    return tl.inline_asm_elementwise(
        "mov.u64 $0, %globaltimer;", "=l,r", [zero], dtype=tl.int64, is_pure=False, pack=1
    )
