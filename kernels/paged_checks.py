"""Input checks shared by the launchers of the attention kernels over the paged KV cache (decode:
lean_attention.py, prefill: prefill_attention.py): the query's and the caches' shapes, dtypes and strides."""

from __future__ import annotations

import torch

from leanserve.kernels.kv_quant import check_cache_scales, is_fp8


def check_query_and_caches(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_scale: torch.Tensor | None,
    v_scale: torch.Tensor | None,
) -> None:
    """ValueError unless q ([rows, Hq, D], fp16/bf16/fp32) and the caches ([num_blocks, block_size, Hkv,
    D], q's dtype or float8_e4m3fn with their scales) fit together: the same D, Hq a multiple of Hkv, unit
    stride in D (fp8 V: or in block_size)."""
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            "k_cache and v_cache must both be [num_blocks, block_size, num_kv_heads, head_dim], got "
            f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q must be float16, bfloat16 or float32, got {q.dtype}")
    check_cache_scales(k_cache, v_cache, k_scale, v_scale)
    if not is_fp8(k_cache) and (k_cache.dtype != q.dtype or v_cache.dtype != q.dtype):
        raise ValueError(
            f"q, k_cache and v_cache must share a dtype (or the caches be float8_e4m3fn), got {q.dtype}, "
            f"{k_cache.dtype}, {v_cache.dtype}"
        )
    num_q_heads, head_dim = q.shape[1:]
    num_kv_heads = k_cache.shape[2]
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"head_dim of q ({head_dim}) and of the cache ({k_cache.shape[3]}) differ")
    if num_q_heads % num_kv_heads != 0:
        raise ValueError(f"num_q_heads ({num_q_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1:
        raise ValueError("q and k_cache must be contiguous in head_dim (stride 1 in the last dim)")
    check_v_layout(v_cache)


def check_v_layout(v_cache: torch.Tensor) -> None:
    """ValueError unless v_cache is contiguous in head_dim, or is fp8 with slot-major pages (contiguous in
    block_size, kernels.kv_quant.is_slot_major)."""
    if v_cache.stride(-1) == 1:
        return
    if not is_fp8(v_cache) or v_cache.stride(1) != 1:
        raise ValueError(
            "v_cache must be contiguous in head_dim (stride 1 in the last dim), or float8_e4m3fn with "
            f"slot-major pages (stride 1 in block_size), got {v_cache.dtype} strides {v_cache.stride()}"
        )
