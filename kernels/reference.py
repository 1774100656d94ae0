"""Plain-torch attention over a paged KV cache, decode and prefill: the twins of the Triton kernels
(kernels/lean_attention.py, prefill_attention.py), used by tests and as the CPU path of the engine. Each
gathers the sequences' pages and computes the attention in fp32."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from leanserve.kernels.kv_quant import gather_pages


def reference_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    sm_scale: float | None = None,
    out: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode attention of one new token per sequence against its paged cache.

    q: [B, Hq, D]; k_cache, v_cache: [num_blocks, block_size, Hkv, D]; block_tables: [B, max_blocks]
    int32; seq_lens: [B] int32 (0 gives a zero output). Returns [B, Hq, D] in q's dtype (written into
    `out` when given). Reads the lengths on the host: this is a reference, not a graph-capturable path.
    float8_e4m3fn caches come with k_scale, v_scale: [num_blocks, block_size, Hkv] fp32 (kernels.kv_quant).
    """
    batch, num_q_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else sm_scale
    if batch == 0:
        return out if out is not None else torch.empty_like(q)
    lens = seq_lens.tolist()
    max_len = max(max(lens), 1)

    # Whole pages of every sequence, padded to the longest (padding and table entries past a sequence's
    # pages read some block, masked): one gather per cache. The CPU engine runs this once per layer
    # and step, so it is kept to few ops (faster than gathering slot by slot at short contexts).
    num_pages = -(-max_len // block_size)
    pages = block_tables[:, :num_pages].reshape(-1).clamp(0, k_cache.shape[0] - 1)
    padded = (batch, num_pages * block_size, num_kv_heads, head_dim)
    k, v = (  # [B, Hkv, L, D] fp32
        gather_pages(cache, scales, pages, torch.float32).view(padded)[:, :max_len].transpose(1, 2)
        for cache, scales in ((k_cache, k_scale), (v_cache, v_scale))
    )

    # The query heads of a KV group attend together: [B, Hkv, group, D] against [B, Hkv, L, D]. One
    # fused SDPA call (fp32) is the CPU engine's decode path, faster than spelled-out einsums.
    qg = q.float().view(batch, num_kv_heads, group, head_dim)
    mask = None
    if min(lens) != max_len:
        mask = (torch.arange(max_len, device=q.device) < seq_lens[:, None])[:, None, None, :]
    result = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=scale)
    # A sequence with no tokens has an all-masked row (SDPA gives NaN): its output is defined as 0.
    # (reshape: CUDA's SDPA returns a transposed view that .view cannot flatten)
    if min(lens) == 0:
        result = torch.where((seq_lens > 0)[:, None, None, None], result, 0.0)
    result = result.reshape(batch, num_q_heads, head_dim)
    if out is None:
        return result.to(q.dtype)
    out.copy_(result)
    return out


def reference_prefill_attention(
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
    """Causal attention of each prefill chunk against its paged cache (the chunk's prefix and itself).

    q: [T, Hq, D]; k_cache, v_cache: [num_blocks, block_size, Hkv, D]; cu_seqlens_q: [P+1] int32;
    context_lens: [P] int32 (chunk i's token j sits at position context_lens[i] - query_len + j);
    block_tables: [P, max_blocks] int32; float8_e4m3fn caches come with k_scale, v_scale as in
    `reference_decode_attention`. Returns [T, Hq, D] in q's dtype (written into `out` when given).
    Computes in fp32 and reads the lengths on the host: one SDPA per chunk."""
    head_dim = q.shape[-1]
    block_size = k_cache.shape[1]
    scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else sm_scale
    if out is None:
        out = torch.empty_like(q)
    cu = cu_seqlens_q.tolist()
    for i, context_len in enumerate(context_lens.tolist()):
        start, end = cu[i], cu[i + 1]
        query_len = end - start
        if query_len == 0:
            continue
        # The sequence's first context_len cached tokens, whole pages gathered at once: [Hkv, L, D].
        pages = block_tables[i, : -(-context_len // block_size)]
        k, v = (
            gather_pages(cache, scales, pages, torch.float32)[:context_len].transpose(0, 1)[None]
            for cache, scales in ((k_cache, k_scale), (v_cache, v_scale))
        )
        q_i = q[start:end].transpose(0, 1)[None].float()  # [1, Hq, query_len, D]: SDPA's fused layout
        if context_len == query_len:  # no prefix: the plain causal mask (CPU's fused kernel takes it)
            o_i = F.scaled_dot_product_attention(q_i, k, v, is_causal=True, scale=scale, enable_gqa=True)
        else:  # query j sees the keys up to position context_len - query_len + j
            keys = torch.arange(context_len, device=q.device)
            mask = keys[None, :] <= keys[context_len - query_len :, None]
            o_i = F.scaled_dot_product_attention(q_i, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        out[start:end] = o_i[0].transpose(0, 1)
    return out
