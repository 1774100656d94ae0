"""Rotary embedding and KV-cache write in one launch (Triton), and its torch twin: the q and k heads of
a fused qkv projection are rotated in place (HF "rotate_half" layout) with cos/sin looked up by
position, then every token's rotated k and its v are stored at its slot of the paged KV cache. The same
rotation and cache write also run as the epilogue of the skinny decode product (`rotate_and_store_heads`,
used by kernels.skinny_linear.skinny_linear_rope). The writers address a slot's row through the caches'
block, offset and head strides, so they take any [num_blocks, block_size, Hkv, D] layout: the engine's
head-major blocks (models.kv_cache) and token-major ones alike."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from leanserve.kernels.fp8 import fp8_scale, quantize_rows
from leanserve.kernels.kv_quant import check_cache_scales, is_fp8, is_slot_major, store_slots
from leanserve.kernels.launch import use_pdl, wait_for_previous_kernel


@triton.jit
def _rotate_pair(x1, x2, cos, sin):
    """The rotated halves (x1, x2) of head elements j and j + D/2, in fp32: x * [cos, cos] +
    rotate_half(x) * [sin, sin], with rotate_half(x) = [-x2, x1]."""
    x1, x2 = x1.to(tl.float32), x2.to(tl.float32)
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin


@triton.jit
def _rotate(
    ptr, cos, sin, offs_h, offs_d, NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HALF: tl.constexpr
):
    """Rotate heads [0, NUM_HEADS) of one token at `ptr` in place; returns the rotated halves (fp32)."""
    mask = (offs_h[:, None] < NUM_HEADS) & (offs_d[None, :] < HALF)
    first = ptr + offs_h[:, None] * HEAD_DIM + offs_d[None, :]
    x1 = tl.load(first, mask=mask, other=0.0)
    x2 = tl.load(first + HALF, mask=mask, other=0.0)
    out1, out2 = _rotate_pair(x1, x2, cos, sin)
    tl.store(first, out1.to(ptr.dtype.element_ty), mask=mask)
    tl.store(first + HALF, out2.to(ptr.dtype.element_ty), mask=mask)
    return out1, out2


@triton.jit
def _slot_offset(slot, block_size, stride_block, stride_offset):
    """Where cached slot `slot` (block * block_size + offset) starts, in elements, given the block and
    offset strides of a [num_blocks, block_size, ...] cache or of its scales."""
    return slot // block_size * stride_block + slot % block_size * stride_offset


@triton.jit
def _rope_and_cache_kernel(
    qkv_ptr,
    positions_ptr,
    cos_sin_ptr,
    k_cache_ptr,
    v_cache_ptr,
    k_scale_ptr,  # FP8: [num_blocks, block_size, Hkv] fp32 scales of the cached rows
    v_scale_ptr,
    slot_mapping_ptr,
    stride_qkv,
    stride_pos,  # cos_sin: one position's [2, D] rows
    stride_sin,  # cos_sin: from the cos row to the sin row
    block_size,  # a slot is block * block_size + offset
    stride_block,  # k_cache: [num_blocks, block_size, Hkv, D], unit D stride
    stride_offset,
    stride_head,
    stride_v_block,  # v_cache: the same shape; unit D stride, or slot-major pages (fp8: unit offset stride)
    stride_v_offset,
    stride_v_head,
    stride_v_dim,
    stride_scale_block,  # scales: [num_blocks, block_size, Hkv], K and V alike
    stride_scale_offset,
    stride_scale_head,
    NUM_Q_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HKV: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_D: tl.constexpr,
    FP8: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_previous_kernel(PDL)
    token = tl.program_id(0).to(tl.int64)
    row = qkv_ptr + token * stride_qkv
    offs_half = tl.arange(0, BLOCK_HALF)
    half_mask = offs_half < HALF
    # The table holds [cos, cos] and [-sin, sin] over the whole head dim: one half of each is enough.
    table = cos_sin_ptr + tl.load(positions_ptr + token) * stride_pos
    cos = tl.load(table + offs_half, mask=half_mask, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(table + stride_sin + HALF + offs_half, mask=half_mask, other=0.0).to(tl.float32)[None, :]

    _rotate(row, cos, sin, tl.arange(0, BLOCK_HQ), offs_half, NUM_Q_HEADS, HEAD_DIM, HALF)
    offs_kv = tl.arange(0, BLOCK_HKV)
    k1, k2 = _rotate(row + NUM_Q_HEADS * HEAD_DIM, cos, sin, offs_kv, offs_half, NUM_KV_HEADS, HEAD_DIM, HALF)

    slot = tl.load(slot_mapping_ptr + token)
    cache_row = _slot_offset(slot, block_size, stride_block, stride_offset)
    scale_row = _slot_offset(slot, block_size, stride_scale_block, stride_scale_offset)
    k_dst = k_cache_ptr + cache_row + offs_kv[:, None] * stride_head + offs_half[None, :]
    k_mask = (offs_kv[:, None] < NUM_KV_HEADS) & half_mask[None, :]
    kv_heads_mask = offs_kv < NUM_KV_HEADS
    if FP8:
        # Quantized from k as stored in qkv (rounded to its dtype), as the torch twin reads it.
        k1 = k1.to(row.dtype.element_ty).to(tl.float32)
        k2 = k2.to(row.dtype.element_ty).to(tl.float32)
        k_scale = fp8_scale(tl.maximum(tl.max(tl.abs(k1), axis=1), tl.max(tl.abs(k2), axis=1)))
        k1, k2 = k1 / k_scale[:, None], k2 / k_scale[:, None]
        tl.store(k_scale_ptr + scale_row + offs_kv * stride_scale_head, k_scale, mask=kv_heads_mask)
    tl.store(k_dst, k1.to(k_cache_ptr.dtype.element_ty), mask=k_mask)
    tl.store(k_dst + HALF, k2.to(k_cache_ptr.dtype.element_ty), mask=k_mask)

    offs_d = tl.arange(0, BLOCK_D)
    v_mask = kv_heads_mask[:, None] & (offs_d[None, :] < HEAD_DIM)
    v_src = row + (NUM_Q_HEADS + NUM_KV_HEADS) * HEAD_DIM + offs_kv[:, None] * HEAD_DIM + offs_d[None, :]
    v = tl.load(v_src, mask=v_mask, other=0.0)
    if FP8:
        v = v.to(tl.float32)
        v_scale = fp8_scale(tl.max(tl.abs(v), axis=1))
        v = v / v_scale[:, None]
        tl.store(v_scale_ptr + scale_row + offs_kv * stride_scale_head, v_scale, mask=kv_heads_mask)
    v_row = _slot_offset(slot, block_size, stride_v_block, stride_v_offset)
    v_dst = v_cache_ptr + v_row + offs_kv[:, None] * stride_v_head + offs_d[None, :] * stride_v_dim
    tl.store(v_dst, v.to(v_cache_ptr.dtype.element_ty), mask=v_mask)


@triton.jit
def rotate_and_store_heads(
    head, pairs, offs_m, M, qkv_ptr, stride_qkv, positions_ptr, cos_sin_ptr, k_cache_ptr, v_cache_ptr,
    slot_mapping_ptr, stride_pos, stride_sin, block_size, stride_block, stride_offset, stride_head,
    NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
):  # fmt: skip
    """What `_rope_and_cache_kernel` does, for the rotation pairs `pairs` of one head of qkv (`head`, a
    runtime scalar: q, k or v) and the tokens offs_m (those >= M are left alone): q and k rotated in
    place, k and v also stored to the caches (addressed as in `_rope_and_cache_kernel`). The skinny
    product's epilogue (kernels.skinny_linear)."""
    HALF: tl.constexpr = HEAD_DIM // 2
    m_mask = offs_m < M
    mask = m_mask[:, None]
    first = qkv_ptr + offs_m[:, None] * stride_qkv + head * HEAD_DIM + pairs[None, :]
    x1 = tl.load(first, mask=mask, other=0.0)
    x2 = tl.load(first + HALF, mask=mask, other=0.0)
    if head < NUM_Q_HEADS + NUM_KV_HEADS:
        positions = tl.load(positions_ptr + offs_m, mask=m_mask, other=0)
        # The table holds [cos, cos] and [-sin, sin]: the first half of one and the second of the other.
        table = cos_sin_ptr + positions[:, None] * stride_pos + pairs[None, :]
        cos = tl.load(table, mask=mask, other=0.0).to(tl.float32)
        sin = tl.load(table + stride_sin + HALF, mask=mask, other=0.0).to(tl.float32)
        x1, x2 = _rotate_pair(x1, x2, cos, sin)
        x1, x2 = x1.to(qkv_ptr.dtype.element_ty), x2.to(qkv_ptr.dtype.element_ty)
        tl.store(first, x1, mask=mask)
        tl.store(first + HALF, x2, mask=mask)
    if head >= NUM_Q_HEADS:
        slots = tl.load(slot_mapping_ptr + offs_m, mask=m_mask, other=0)
        # k and v heads both map to KV head (head - NUM_Q_HEADS) mod NUM_KV_HEADS.
        rows = _slot_offset(slots, block_size, stride_block, stride_offset)
        offset = rows[:, None] + (head - NUM_Q_HEADS) % NUM_KV_HEADS * stride_head + pairs[None, :]
        cache = k_cache_ptr + offset if head < NUM_Q_HEADS + NUM_KV_HEADS else v_cache_ptr + offset
        tl.store(cache, x1, mask=mask)
        tl.store(cache + HALF, x2, mask=mask)


# One program per token holds all its heads (Llama-3-8B: 40 rotated heads of 64 pairs, 8 V heads of
# 128) in 4 warps: about 20 fp32 values per thread and operand, no spills; decode batches are small, so
# more programs per token would only add launch-wide overhead.
_NUM_WARPS = 4


def _split_heads(
    qkv: torch.Tensor, num_kv_heads: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Views of qkv [T, (Hq + 2 Hkv) * D]: q and k together [T, Hq + Hkv, D], q [T, Hq, D], k and v
    [T, Hkv, D]."""
    heads = qkv.view(qkv.shape[0], qkv.shape[1] // head_dim, head_dim)
    num_q_heads = heads.shape[1] - 2 * num_kv_heads
    qk, v = heads[:, : num_q_heads + num_kv_heads], heads[:, num_q_heads + num_kv_heads :]
    return qk, qk[:, :num_q_heads], qk[:, num_q_heads:], v


def slot_strides(cache: torch.Tensor | None, prefix: str = "") -> dict[str, int]:
    """The block, offset and head strides of `cache` ([num_blocks, block_size, Hkv, ...], any strides) as
    the writer kernels' arguments stride_{prefix}block, ..._offset, ..._head; zeros for None (scales
    that an unquantized cache has not: the kernel reads none)."""
    strides = cache.stride()[:3] if cache is not None else (0, 0, 0)
    names = (f"stride_{prefix}{dim}" for dim in ("block", "offset", "head"))
    return dict(zip(names, strides, strict=True))


def check_rope_inputs(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    cos_sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """ValueError unless the arguments are as `rope_and_cache` documents them (qkv: its output too)."""
    if (
        k_cache.dim() != 4
        or k_cache.shape != v_cache.shape
        or (k_cache.stride() != v_cache.stride() and not is_slot_major(v_cache))
    ):
        raise ValueError(
            "k_cache and v_cache must be [num_blocks, block_size, Hkv, D] of one shape and strides (an fp8 "
            f"V's pages may be slot-major), got {tuple(k_cache.shape)} {k_cache.stride()} and "
            f"{tuple(v_cache.shape)} {v_cache.stride()}"
        )
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    if k_cache.stride(3) != 1 or head_dim % 2:
        raise ValueError(
            f"the caches need an even head dim of unit stride, got D={head_dim} of stride {k_cache.stride(3)}"
        )
    width = (qkv.shape[1] // head_dim) * head_dim if qkv.dim() == 2 else -1
    if width != qkv.shape[-1] or width <= 2 * num_kv_heads * head_dim or qkv.stride(-1) != 1:
        raise ValueError(
            f"qkv must be [T, (Hq + 2 * {num_kv_heads}) * {head_dim}] with unit column stride, "
            f"got {tuple(qkv.shape)} {qkv.stride()}"
        )
    check_cache_scales(k_cache, v_cache, k_scale, v_scale)
    dtypes = {qkv.dtype, cos_sin.dtype} | (set() if is_fp8(k_cache) else {k_cache.dtype, v_cache.dtype})
    if len(dtypes) != 1:
        raise ValueError(
            f"qkv, cos_sin and the (not fp8) caches must share a dtype, got {sorted(map(str, dtypes))}"
        )
    if cos_sin.dim() != 3 or cos_sin.shape[1:] != (2, head_dim) or cos_sin.stride(2) != 1:
        raise ValueError(f"cos_sin must be [max_pos, 2, {head_dim}], got {tuple(cos_sin.shape)}")
    for name, t in (("positions", positions), ("slot_mapping", slot_mapping)):
        if t.dtype != torch.int64 or t.shape != qkv.shape[:1] or not t.is_contiguous():
            raise ValueError(
                f"{name} must be a contiguous int64 [{qkv.shape[0]}], got {t.dtype} {tuple(t.shape)}"
            )
    devices = {t.device for t in (qkv, positions, cos_sin, k_cache, v_cache, slot_mapping)}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")


def rope_and_cache(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    cos_sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rotate q and k of qkv in place and write k and v to the cache, in one launch.

    qkv: [T, (Hq + 2 Hkv) * D] fp16/bf16/fp32, q heads then k then v (any row stride); positions: [T]
    int64; cos_sin: [max_pos, 2, D] in qkv's dtype ([cos, cos] and [-sin, sin] per position, see
    models.layers.RotaryEmbedding); k_cache, v_cache: [num_blocks, block_size, Hkv, D] in qkv's dtype,
    of one set of strides with unit D stride (head-major or token-major blocks alike; an fp8 V's pages may
    be slot-major instead, models.kv_cache); slot_mapping: [T]
    int64 slots (block * block_size + offset). Returns the views q [T, Hq, D], k, v [T, Hkv, D] of qkv.
    No host synchronisation (CUDA-graph capturable); positions and slots are not bounds-checked. With
    float8_e4m3fn caches, k_scale and v_scale ([num_blocks, block_size, Hkv] fp32, any strides shared by
    both) receive each written row's scale and the caches its quantized values (kernels.kv_quant)."""
    check_rope_inputs(qkv, positions, cos_sin, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    _, q, k, v = _split_heads(qkv, num_kv_heads, head_dim)
    if qkv.shape[0]:
        pdl = use_pdl(qkv.device)
        _rope_and_cache_kernel[(qkv.shape[0],)](
            qkv,
            positions,
            cos_sin,
            k_cache,
            v_cache,
            k_scale,
            v_scale,
            slot_mapping,
            qkv.stride(0),
            cos_sin.stride(0),
            cos_sin.stride(1),
            block_size=k_cache.shape[1],
            **slot_strides(k_cache),
            **slot_strides(v_cache, "v_"),
            stride_v_dim=v_cache.stride(3),
            **slot_strides(k_scale, "scale_"),
            NUM_Q_HEADS=q.shape[1],
            NUM_KV_HEADS=num_kv_heads,
            HEAD_DIM=head_dim,
            HALF=head_dim // 2,
            BLOCK_HQ=triton.next_power_of_2(q.shape[1]),
            BLOCK_HKV=triton.next_power_of_2(num_kv_heads),
            BLOCK_HALF=triton.next_power_of_2(head_dim // 2),
            BLOCK_D=triton.next_power_of_2(head_dim),
            FP8=k_scale is not None,
            PDL=pdl,
            num_warps=_NUM_WARPS,
            launch_pdl=pdl,
        )
    return q, k, v


def reference_rope_and_cache(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    cos_sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Torch twin of `rope_and_cache`, with the same in-place effects: q and k rotated together with the
    full-width tables (3 ops), then k and v stored at their slots' (block, offset) of the caches, any
    strides (quantized, with their scales, for fp8 caches)."""
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    qk, q, k, v = _split_heads(qkv, num_kv_heads, head_dim)
    cos, sin = cos_sin.index_select(0, positions).unsqueeze(1).unbind(2)  # [T, 1, D] each
    half = head_dim // 2
    swapped = torch.cat((qk[..., half:], qk[..., :half]), dim=-1)
    qk.mul_(cos).addcmul_(swapped, sin)
    for cache, scales, new in ((k_cache, k_scale, k), (v_cache, v_scale, v)):
        if scales is not None:
            new, new_scales = quantize_rows(new)
            store_slots(scales, slot_mapping, new_scales)
        store_slots(cache, slot_mapping, new)
    return q, k, v
