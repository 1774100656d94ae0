"""The paged prefill attention kernel (Triton), flash-attention-2 style: every prefill chunk of a step in
one launch, K/V read straight from the paged cache through the block table, the GQA group's query heads
stacked in one tile, the causal mask aligned after each chunk's prefix. Its launcher is
kernels/prefill_attention.py; design notes: docs/kernel_notes.md."""

from __future__ import annotations

import triton
import triton.language as tl

from leanserve.kernels.kv_quant import load_slot_major, run_pages


# num_seqs and the block-table width are plain runtime values: Triton would otherwise compile variants for
# a step of one chunk or one page, and for widths that are multiples of 16.
@triton.jit(do_not_specialize=["num_seqs", "stride_btb"])
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, k_scale_ptr, v_scale_ptr, cu_seqlens_ptr, context_lens_ptr, block_tables_ptr,
    out_ptr, num_seqs, qk_scale,
    stride_qt, stride_qh, stride_kn, stride_kb, stride_kh, stride_vn, stride_vb, stride_vh, stride_vd,
    stride_btb, stride_sn, stride_sb, stride_sh, stride_ot, stride_oh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAGE_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    FP8: tl.constexpr, V_SLOT_MAJOR: tl.constexpr,
):  # fmt: skip
    """Grid: (query-tile programs, KV heads). A tile holds TOKENS = BLOCK_M // GROUP query tokens times the
    GROUP query heads of KV head h: row r is token r // GROUP, head h * GROUP + r % GROUP. qk_scale:
    sm_scale * log2(e), so scores come out in log2 units for exp2. k_scale_ptr, v_scale_ptr (FP8): the fp32
    scales [num_blocks, block_size, Hkv] of the fp8 caches' rows (strides stride_sn, stride_sb, stride_sh,
    both alike). V_SLOT_MAJOR: an fp8 V whose pages are slot-major (stride_vb 1, stride_vd its page
    size; kernels.kv_quant.load_slot_major)."""
    TOKENS: tl.constexpr = BLOCK_M // GROUP
    # The programs run in reverse: the last tiles of a sequence see the most keys, so they start first.
    pid = tl.num_programs(0) - 1 - tl.program_id(0)
    h = tl.program_id(1)

    # Work item: the sequence whose first program is the last one at or before pid, and its tile.
    seq = _find_sequence(cu_seqlens_ptr, pid, num_seqs, TOKENS)
    q_begin = tl.load(cu_seqlens_ptr + seq)
    query_len = tl.load(cu_seqlens_ptr + seq + 1) - q_begin
    tile = pid - (q_begin // TOKENS + seq)
    if tile * TOKENS >= query_len:
        return
    context_len = tl.load(context_lens_ptr + seq)

    # The query tile: token t of the chunk sits at position context_len - query_len + t.
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    tok = tile * TOKENS + offs_m // GROUP
    head = h * GROUP + offs_m % GROUP
    row_mask = (offs_m < TOKENS * GROUP) & (tok < query_len)
    d_mask = offs_d < HEAD_DIM
    q_rows = (q_begin + tok).to(tl.int64) * stride_qt + head * stride_qh
    q = tl.load(
        q_ptr + q_rows[:, None] + offs_d[None, :], mask=row_mask[:, None] & d_mask[None, :], other=0.0
    )
    if UPCAST:
        q = q.to(tl.float32)
    pos = context_len - query_len + tok

    # Key tiles wholly at or before the tile's first query need no mask; the rest, up to its last valid
    # query, are masked causally; tiles past that are skipped.
    first_pos = context_len - query_len + tile * TOKENS
    last_pos = context_len - query_len + tl.minimum(tile * TOKENS + TOKENS, query_len) - 1
    unmasked_end = (first_pos + 1) // BLOCK_N * BLOCK_N
    masked_end = last_pos + 1
    table = block_tables_ptr + seq.to(tl.int64) * stride_btb

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    m_i, l_i, acc = _attend_range(
        q, m_i, l_i, acc, k_ptr, v_ptr, k_scale_ptr, v_scale_ptr, table, h, pos, 0, unmasked_end,
        context_len, qk_scale, stride_kn, stride_kb, stride_kh, stride_vn, stride_vb, stride_vh, stride_vd,
        stride_sn, stride_sb, stride_sh, offs_d, d_mask, HEAD_DIM, BLOCK_D, PAGE_SIZE, BLOCK_N, False,
        DOT_PRECISION, FP8, V_SLOT_MAJOR,
    )  # fmt: skip
    m_i, l_i, acc = _attend_range(
        q, m_i, l_i, acc, k_ptr, v_ptr, k_scale_ptr, v_scale_ptr, table, h, pos, unmasked_end, masked_end,
        context_len, qk_scale, stride_kn, stride_kb, stride_kh, stride_vn, stride_vb, stride_vh, stride_vd,
        stride_sn, stride_sb, stride_sh, offs_d, d_mask, HEAD_DIM, BLOCK_D, PAGE_SIZE, BLOCK_N, True,
        DOT_PRECISION, FP8, V_SLOT_MAJOR,
    )  # fmt: skip

    # Every row saw at least its first key, so l_i > 0 (padding rows too: they are not stored).
    o_rows = (q_begin + tok).to(tl.int64) * stride_ot + head * stride_oh
    o = (acc / l_i[:, None]).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + o_rows[:, None] + offs_d[None, :], o, mask=row_mask[:, None] & d_mask[None, :])


@triton.jit
def _find_sequence(cu_seqlens_ptr, pid, num_seqs, TOKENS: tl.constexpr):
    """The last sequence i whose first program cu_seqlens[i] // TOKENS + i is <= pid (binary search)."""
    lo = 0
    hi = num_seqs
    while hi - lo > 1:
        mid = (lo + hi) // 2
        first = tl.load(cu_seqlens_ptr + mid) // TOKENS + mid
        lo = tl.where(first <= pid, mid, lo)
        hi = tl.where(first <= pid, hi, mid)
    return lo


@triton.jit
def _attend_range(
    q, m_i, l_i, acc, k_ptr, v_ptr, k_scale_ptr, v_scale_ptr, table, h, pos, start, end, context_len,
    qk_scale, stride_kn, stride_kb, stride_kh, stride_vn, stride_vb, stride_vh, stride_vd, stride_sn,
    stride_sb, stride_sh, offs_d, d_mask, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    FP8: tl.constexpr, V_SLOT_MAJOR: tl.constexpr,
):  # fmt: skip
    """Online softmax over the key tiles from `start` (a multiple of BLOCK_N) to `end`: the running max
    m_i, denominator l_i and accumulator acc of the query tile, updated tile by tile. CAUSAL masks each
    key past its row's position `pos` (and past the context); without it every key is visible.
    FP8: K/V arrive converted to q's dtype (exact: e4m3 fits in fp16 and bf16); their per-key scales
    multiply the [BLOCK_M, BLOCK_N] scores and probabilities rather than the [BLOCK_N, D] tiles."""
    offs_n = tl.arange(0, BLOCK_N)
    page = _page_ids(table, start + offs_n, context_len, PAGE_SIZE)
    runs = run_pages(table, start, context_len, PAGE_SIZE, BLOCK_N) if V_SLOT_MAJOR else 0
    for n in range(start, end, BLOCK_N):
        key = n + offs_n
        key_mask = key < context_len
        # Page ids are fetched a tile ahead: a K/V load that waited on a load of its own iteration would
        # keep Triton's pipeliner from putting the next tiles' K/V in flight.
        next_page = _page_ids(table, key + BLOCK_N, context_len, PAGE_SIZE)
        next_runs = run_pages(table, n + BLOCK_N, context_len, PAGE_SIZE, BLOCK_N) if V_SLOT_MAJOR else 0
        k, v = _load_kv_tile(k_ptr, v_ptr, page, runs, key, key_mask, n, context_len, h, stride_kn,
                             stride_kb, stride_kh, stride_vn, stride_vb, stride_vh, stride_vd, offs_d, d_mask,
                             HEAD_DIM, BLOCK_D, PAGE_SIZE, BLOCK_N, q.dtype, V_SLOT_MAJOR)  # fmt: skip
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
        if FP8:
            scale_offs = page * stride_sn + (key % PAGE_SIZE) * stride_sb + h * stride_sh
            s = s * tl.load(k_scale_ptr + scale_offs, mask=key_mask, other=0.0)[None, :]
        if CAUSAL:
            s = tl.where((key[None, :] <= pos[:, None]) & key_mask[None, :], s, float("-inf"))
        # The first tile of a range holds each row's first visible key, so m_new is finite.
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if FP8:
            p = p * tl.load(v_scale_ptr + scale_offs, mask=key_mask, other=0.0)[None, :]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
        page, runs = next_page, next_runs
    return m_i, l_i, acc


@triton.jit
def _page_ids(table, key, context_len, PAGE_SIZE: tl.constexpr):
    """The cache page of each of the sequence's positions `key` (0 past the context)."""
    return tl.load(table + key // PAGE_SIZE, mask=key < context_len, other=0).to(tl.int64)


@triton.jit
def _load_kv_tile(
    k_ptr, v_ptr, page, runs, key, key_mask, first, context_len, h, stride_kn, stride_kb, stride_kh,
    stride_vn, stride_vb, stride_vh, stride_vd, offs_d, d_mask, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, dtype: tl.constexpr, V_SLOT_MAJOR: tl.constexpr,
):  # fmt: skip
    """K and V of KV head h at the sequence's positions `key` = first + [0, BLOCK_N) (on pages `page`, V's
    runs on `runs` if slot-major; masked ones read as 0, but for slot-major V, see load_slot_major):
    [BLOCK_N, BLOCK_D] each in `dtype` (the query tile's), gathered row by row, so any page size works and
    a tile may span pages."""
    slot = key % PAGE_SIZE
    mask = key_mask[:, None] & d_mask[None, :]
    k_rows = page * stride_kn + slot * stride_kb + h * stride_kh
    k = tl.load(k_ptr + k_rows[:, None] + offs_d[None, :], mask=mask, other=0.0)
    if V_SLOT_MAJOR:
        vt = load_slot_major(v_ptr, runs, h, first, context_len, stride_vn, stride_vh, stride_vd, offs_d,
                             HEAD_DIM, BLOCK_D, PAGE_SIZE, BLOCK_N)  # fmt: skip
        v = tl.trans(vt)
    else:
        v_rows = page * stride_vn + slot * stride_vb + h * stride_vh
        v = tl.load(v_ptr + v_rows[:, None] + offs_d[None, :], mask=mask, other=0.0)
    return k.to(dtype), v.to(dtype)
