"""Plain-torch decode attention over a paged KV cache: the twin of the Triton kernel, used by tests and
as the CPU path of the engine. Gathers each sequence's pages, computes the softmax in fp32."""

from __future__ import annotations

import math

import torch


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
    max_len = int(seq_lens.max()) if batch else 0

    # Token positions of every sequence padded to the longest; padding reads page 0 and is masked.
    pos = torch.arange(max(max_len, 1), device=q.device)
    valid = pos[None, :] < seq_lens[:, None].to(pos.dtype)  # [B, L]
    page_col = (pos // block_size).clamp(max=block_tables.shape[1] - 1)
    pages = torch.where(valid, block_tables[:, page_col].long(), 0)  # [B, L]
    offsets = (pos % block_size).expand_as(pages)
    k = k_cache[pages, offsets].float()  # [B, L, Hkv, D]
    v = v_cache[pages, offsets].float()

    qg = q.float().view(batch, num_kv_heads, group, head_dim)
    scores = torch.einsum("bhgd,blhd->bhgl", qg, k) * scale
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    # A sequence with no tokens has an all -inf row (softmax gives NaN): its output is defined as 0.
    probs = torch.where(valid[:, None, None, :], probs, 0.0)
    result = torch.einsum("bhgl,blhd->bhgd", probs, v).reshape(batch, num_q_heads, head_dim)
    if out is None:
        return result.to(q.dtype)
    out.copy_(result)
    return out
