"""Prefill chunks through torch's SDPA, one call per chunk (host lengths, no sync). On an H100 torch runs
them on cuDNN's Hopper flash kernel, which attends at 601 TFLOP/s where the paged prefill kernel reaches
398 (bench_long_context.py's attention part, docs/benchmarks.md).

A chunk without a cached prefix attends over its own K/V under the causal mask. A chunk after a prefix
(chunked prefill, a prefix-cache hit) is split at it: one call over the prefix gathered out of the paged
cache (no mask: every prefix key precedes every query), one over its own K/V under the square causal mask,
the two merged by their log-sum-exps. GQA natively in both calls: no KV head is repeated on the GPU."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from leanserve.kernels.kv_quant import gather_pages


def splits_at_prefix(q: torch.Tensor) -> bool:
    """Whether chunks after a prefix can take the split path here: on CUDA cuDNN's attention, which returns
    the log-sum-exps, takes fp16/bf16, head dims up to 128 and GPUs of compute capability 8.0 or newer; on
    CPU torch's flash attention takes all."""
    if not q.is_cuda:
        return True
    half = q.dtype in (torch.float16, torch.bfloat16)
    return half and q.shape[-1] <= 128 and _ampere_or_later(q.device)


@functools.cache
def _ampere_or_later(device: torch.device) -> bool:
    """Cached: every prefill step asks, in every layer."""
    return torch.cuda.get_device_capability(device) >= (8, 0)


def prefix_gather_bytes(max_prefix: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """The most memory one chunk's gathered prefix holds while it is attended (the chunks of a step take
    turns): its K and V in dtype and, from an fp8 cache, one of them also as e4m3 bytes and as the fp32
    products of its dequantization (kernels.fp8.dequantize)."""
    elements = max_prefix * num_kv_heads * head_dim
    return elements * (2 * dtype.itemsize + 1 + 4)


def sdpa_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_scale: torch.Tensor | None,
    v_scale: torch.Tensor | None,
    query_lens: list[int],
    context_lens: list[int],
    block_tables: torch.Tensor,
    scale: float,
    out: torch.Tensor,
) -> None:
    """Attention of each prefill chunk, written into out[T, Hq, D]. q: [T, Hq, D], k, v: [T, Hkv, D], the
    chunks' tokens back to back; query_lens, context_lens: per chunk, its tokens and the tokens in the
    cache after it (prefix + chunk); block_tables: [P, max_blocks] int32 of the caches (an fp8 cache's
    prefix is dequantized to q's dtype with its scales). The chunks' own K/V come from k and v, not the
    cache."""
    block_size = k_cache.shape[1]
    start = 0
    for i, (query_len, context_len) in enumerate(zip(query_lens, context_lens, strict=True)):
        end = start + query_len
        q_i, k_i, v_i = (_heads_first(t[start:end]) for t in (q, k, v))
        prefix = context_len - query_len
        if prefix == 0:
            o_i = F.scaled_dot_product_attention(q_i, k_i, v_i, is_causal=True, scale=scale, enable_gqa=True)
        else:
            pages = block_tables[i, : -(-prefix // block_size)]
            k_p, v_p = (
                _heads_first(gather_pages(cache, scales, pages, q.dtype)[:prefix])
                for cache, scales in ((k_cache, k_scale), (v_cache, v_scale))
            )
            o_i = _merge(*_attend(q_i, k_p, v_p, False, scale), *_attend(q_i, k_i, v_i, True, scale))
        out[start:end] = o_i[0].transpose(0, 1)
        start = end


def _heads_first(t: torch.Tensor) -> torch.Tensor:
    """[L, H, D] -> [1, H, L, D], SDPA's layout, as a view."""
    return t.transpose(0, 1).unsqueeze(0)


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention and its log-sum-exp (natural log, fp32): q [1, Hq, Lq, D], k, v [1, Hkv, Lk, D] ->
    ([1, Hq, Lq, D], [1, Hq, Lq]). The causal mask is square (Lq == Lk)."""
    if q.is_cuda:
        o, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, True, 0.0, causal, False, scale=scale
        )[:2]
        return o, lse.reshape(q.shape[:3])
    # CPU flash attention wants as many KV heads as query heads.
    group = q.shape[1] // k.shape[1]
    k, v = (t.repeat_interleave(group, dim=1) for t in (k, v))
    o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
    return o, lse


def _merge(o_a: torch.Tensor, lse_a: torch.Tensor, o_b: torch.Tensor, lse_b: torch.Tensor) -> torch.Tensor:
    """Attention over the union of two disjoint key sets from each set's output and log-sum-exp."""
    lse = torch.logaddexp(lse_a, lse_b)
    w_a, w_b = (torch.exp(x - lse).unsqueeze(-1) for x in (lse_a, lse_b))
    return o_a.float() * w_a + o_b.float() * w_b
