"""Paged prefill attention: the launch parameters per head dim, input checks and the launcher of the Triton
kernel (kernels/prefill_kernel.py), which runs every prefill chunk of a step in one launch,
flash-attention-2 style, reading K/V straight from the paged cache. A chunk may follow a cached prefix
(chunked prefill, a prefix-cache hit): its causal mask is aligned to its position after the prefix. The
query heads of a KV head's GQA group are stacked into one tile, so each K/V tile is read once per query
tile whatever the group.

Work items are (sequence, query tile) pairs, laid out without a host pass: sequence i owns the programs
from cu_seqlens_q[i] // TOKENS + i on (an upper bound of the tiles before it), and a program finds its
sequence by a binary search over cu_seqlens_q; programs past a sequence's last tile exit at once."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import triton

from leanserve.kernels.kv_quant import is_slot_major
from leanserve.kernels.launch import interpreted, max_shared_memory
from leanserve.kernels.paged_checks import check_query_and_caches
from leanserve.kernels.prefill_kernel import _prefill_kernel

_LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class PrefillConfig:
    """Launch parameters of one head dim: query rows (tokens x GQA group) and keys per tile, warps,
    pipeline stages."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# D=128 from `bench_long_context.py --tune` (H100, bf16, Llama-3-8B heads; tiles 64/128 x 32-128 keys,
# 4/8 warps, 2-4 stages): 128 query rows (32 tokens x 4 heads) against 128-key tiles in 8 warps and 3
# stages is the fastest on every case, whole 8k / 32k and the last 2k chunk of 32k 1.47 / 21.7 / 2.72 ms
# (64-key tiles: 1.67 / 25.1 / 3.16). The other head dims are not swept: the shapes of Triton's fused-
# attention tutorial for Hopper, 64-key tiles; 80 and 96 pad to 128; 256 halves both tiles to keep the
# fp32 accumulator in registers.
_CONFIGS: dict[int, PrefillConfig] = {
    64: PrefillConfig(block_m=128, block_n=64, num_warps=4, num_stages=3),
    80: PrefillConfig(block_m=128, block_n=64, num_warps=8, num_stages=3),
    96: PrefillConfig(block_m=128, block_n=64, num_warps=8, num_stages=3),
    128: PrefillConfig(block_m=128, block_n=128, num_warps=8, num_stages=3),
    256: PrefillConfig(block_m=64, block_n=32, num_warps=8, num_stages=2),
}
SUPPORTED_HEAD_DIMS = tuple(sorted(_CONFIGS))


def _fitted(config: PrefillConfig, head_dim: int, itemsize: int, device: torch.device) -> PrefillConfig:
    """The config shrunk to fit the device's shared memory: fewer pipeline stages down to two, then half
    the key tiles (fp32 at D=128: the query tile and three stages of 128-key K/V tiles take 448 KB; it
    runs 64-key tiles in two stages). Each stage holds a K and a V tile; the query tile stays resident."""
    row_bytes = triton.next_power_of_2(head_dim) * itemsize
    limit = max_shared_memory(device)

    def fits(c: PrefillConfig) -> bool:
        return (c.block_m + 2 * c.num_stages * c.block_n) * row_bytes <= limit

    while not fits(config) and config.num_stages > 2:
        config = replace(config, num_stages=config.num_stages - 1)
    while not fits(config) and config.block_n > 16:
        config = replace(config, block_n=config.block_n // 2)
    return config


def _validate(
    q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, out, block_m, k_scale=None, v_scale=None
) -> None:
    if q.dim() != 3:
        raise ValueError(f"q must be [tokens, num_q_heads, head_dim], got shape {tuple(q.shape)}")
    check_query_and_caches(q, k_cache, v_cache, k_scale, v_scale)
    num_q_heads, head_dim = q.shape[1:]
    num_kv_heads = k_cache.shape[2]
    if head_dim not in _CONFIGS:
        raise ValueError(f"head_dim {head_dim} is not supported (supported: {list(SUPPORTED_HEAD_DIMS)})")
    if num_q_heads // num_kv_heads > block_m:
        raise ValueError(f"at most {block_m} query heads per KV head, got {num_q_heads // num_kv_heads}")
    num_seqs = context_lens.shape[0] if context_lens.dim() == 1 else -1
    if context_lens.dtype != torch.int32 or not context_lens.is_contiguous() or num_seqs < 0:
        raise ValueError(
            f"context_lens must be a contiguous int32 [num_seqs], got {context_lens.dtype} "
            f"{tuple(context_lens.shape)}"
        )
    if cu_seqlens_q.dtype != torch.int32 or tuple(cu_seqlens_q.shape) != (num_seqs + 1,):
        raise ValueError(
            f"cu_seqlens_q must be int32 [num_seqs + 1 = {num_seqs + 1}], got {cu_seqlens_q.dtype} "
            f"{tuple(cu_seqlens_q.shape)}"
        )
    if not cu_seqlens_q.is_contiguous():
        raise ValueError("cu_seqlens_q must be contiguous")
    if block_tables.dtype != torch.int32 or block_tables.dim() != 2 or block_tables.shape[0] != num_seqs:
        raise ValueError(
            f"block_tables must be int32 [num_seqs={num_seqs}, max_blocks], got {block_tables.dtype} "
            f"{tuple(block_tables.shape)}"
        )
    if block_tables.stride(-1) != 1:
        raise ValueError("block_tables must be contiguous in its last dim")
    devices = {t.device for t in (q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables)}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype or out.device != q.device):
        raise ValueError(
            f"out must be {tuple(q.shape)} {q.dtype} on {q.device}, "
            f"got {tuple(out.shape)} {out.dtype} on {out.device}"
        )
    if out is not None and out.stride(-1) != 1:
        raise ValueError("out must be contiguous in head_dim")


def _launch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    block_tables: torch.Tensor,
    sm_scale: float | None,
    out: torch.Tensor | None,
    config: PrefillConfig,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """The launcher behind `prefill_attention` with explicit launch parameters (tests force small tiles so
    short chunks span several of them; the benchmark's tuning sweep)."""
    _validate(
        q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, out, config.block_m, k_scale, v_scale
    )
    num_tokens, num_q_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    num_seqs = context_lens.shape[0]
    if out is None:
        out = torch.empty_like(q)
    if num_tokens == 0 or num_seqs == 0:
        return out
    tokens_per_tile = config.block_m // group
    # Sequence i's tiles fit in [cu[i] // tokens + i, cu[i + 1] // tokens + i + 1): the grid needs no lengths.
    grid = (num_tokens // tokens_per_tile + num_seqs, num_kv_heads)
    scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else sm_scale
    _prefill_kernel[grid](
        q, k_cache, v_cache, k_scale, v_scale, cu_seqlens_q, context_lens, block_tables, out,
        num_seqs, scale * _LOG2E,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), v_cache.stride(3), block_tables.stride(0),
        *(k_scale.stride() if k_scale is not None else (0, 0, 0)),  # the scales' (k and v alike)
        out.stride(0), out.stride(1),
        GROUP=group,
        HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim),
        PAGE_SIZE=block_size,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        # The interpreter computes bf16 tl.dot wrongly (triton issue 11584): upcast its operands there.
        UPCAST=interpreted(),
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        FP8=k_scale is not None,
        V_SLOT_MAJOR=is_slot_major(v_cache),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )  # fmt: skip
    return out


def prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    block_tables: torch.Tensor,
    sm_scale: float | None = None,
    out: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of every prefill chunk of a step against its sequence's paged cache, one launch.

    q: [T, Hq, D] fp16/bf16/fp32 (the chunks' tokens back to back; any token and head strides), D one of
    SUPPORTED_HEAD_DIMS; k_cache, v_cache: [num_blocks, block_size, Hkv, D] in q's dtype, or float8_e4m3fn
    with k_scale, v_scale: [num_blocks, block_size, Hkv] fp32 (kernels.kv_quant), already holding the
    chunks' own K/V; cu_seqlens_q: [P+1] int32, chunk i's tokens are q[cu[i]:cu[i+1]]; context_lens:
    [P] int32, tokens in the cache after chunk i (its prefix + itself), so its token j sits at position
    context_lens[i] - query_len + j and sees the keys up to there; block_tables: [P, max_blocks] int32;
    sm_scale defaults to 1/sqrt(D); out: optional [T, Hq, D] buffer. Returns [T, Hq, D] in q's dtype.
    Reads no lengths on the host (the grid comes from T and P)."""
    config = _CONFIGS.get(q.shape[-1]) if q.dim() == 3 else None
    if config is None:
        _validate(q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, out, 1, k_scale, v_scale)
    config = _fitted(config, q.shape[-1], q.element_size(), q.device)
    return _launch(
        q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, sm_scale, out, config, k_scale, v_scale
    )
