"""Attention over the paged KV cache: the per-step batch description, the attention timer and the
attention computation itself (prefill by SDPA over cached prefix + chunk, decode by the LeanAttention
kernel on CUDA or its torch reference on CPU). The step's K/V are already in the cache: the rotary
embedding step writes them (models.layers.RotaryEmbedding)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from kernels import lean_attention_decode, reference_decode_attention


@dataclass
class AttentionBatch:
    """What attention needs for one step. New tokens are laid out prefill chunks first, then one
    token per decoding sequence. For a CUDA-graph decode step every tensor here is a static buffer
    (num_prefill_tokens == 0); padded rows must point their slot at a scratch block and may have
    seq_len 1."""

    slot_mapping: torch.Tensor  # [T] int64: flat cache slot (block_id * block_size + offset) per new token
    num_prefill_tokens: int  # tokens [0, num_prefill_tokens) are prefill chunk tokens
    prefill_cu_seqlens_q: torch.Tensor  # [P+1] int32: query tokens of prefill sequence i = [cu[i], cu[i+1])
    prefill_context_lens: torch.Tensor  # [P] int32: tokens in the cache after this chunk (prefix + chunk)
    prefill_block_tables: torch.Tensor  # [P, max_blocks] int32
    decode_block_tables: torch.Tensor  # [Bd, max_blocks] int32
    decode_seq_lens: torch.Tensor  # [Bd] int32: cache length incl. the new token
    # host copies the runner already has (no device sync needed to read them):
    prefill_context_lens_host: list[int]
    prefill_query_lens_host: list[int]
    timer: AttentionTimer | None = None  # accumulates attention time of all layers in this step


class AttentionTimer:
    """Attention time of one step, summed over layers, split into prefill and decode.

    CUDA: a pair of timing events around each attention call, read by `result()` after the step's own
    synchronisation (no extra sync). The events are created with `external=True`, so recording them
    while a CUDA graph is captured adds event-record nodes to the graph, and each replay re-records
    them: a timer used while capturing a graph keeps its events and reports the latest replay (do not
    `reset()` it between replays; PyTorch's own graph-timing test uses this pattern). `result()` costs
    one `elapsed_time` per layer and kind (prefill, decode) on the host. CPU: `perf_counter` around
    each call (the ops are synchronous)."""

    def __init__(self, device: torch.device) -> None:
        self._cuda = device.type == "cuda"
        self._pool: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self.reset()

    def reset(self) -> None:
        """Forget the spans of the previous step (the CUDA events are kept for reuse)."""
        self._spans: tuple[list, list] = ([], [])  # event pairs of (prefill, decode)
        self._seconds = [0.0, 0.0]

    @contextmanager
    def prefill(self) -> Iterator[None]:
        yield from self._span(0)

    @contextmanager
    def decode(self) -> Iterator[None]:
        yield from self._span(1)

    def _span(self, kind: int) -> Iterator[None]:
        if not self._cuda:
            start = time.perf_counter()
            yield
            self._seconds[kind] += time.perf_counter() - start
            return
        used = len(self._spans[0]) + len(self._spans[1])
        if used == len(self._pool):
            self._pool.append(tuple(torch.cuda.Event(enable_timing=True, external=True) for _ in range(2)))
        pair = self._pool[used]
        pair[0].record()
        yield
        pair[1].record()
        self._spans[kind].append(pair)

    def result(self) -> tuple[float, float]:
        """(prefill_seconds, decode_seconds) of the step; on CUDA call it after the step's sync."""
        if not self._cuda:
            return self._seconds[0], self._seconds[1]
        prefill, decode = (
            sum(start.elapsed_time(end) for start, end in spans) / 1e3 for spans in self._spans
        )
        return prefill, decode


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    batch: AttentionBatch,
    scale: float,
) -> torch.Tensor:
    """Causal attention of the step's new tokens over their sequences' caches, which only reads them.

    q: [T, Hq, D]; k, v: [T, Hkv, D] (new tokens, any strides, already written to the caches at
    batch.slot_mapping); k_cache, v_cache: [num_blocks, block_size, Hkv, D]. Returns [T, Hq, D]."""
    out = torch.empty_like(q)
    timer = batch.timer
    num_prefill = batch.num_prefill_tokens
    if num_prefill:
        with timer.prefill() if timer else nullcontext():
            _prefill(q, k, v, k_cache, v_cache, batch, scale, out)
    if num_prefill < q.shape[0]:
        decode = lean_attention_decode if q.is_cuda else reference_decode_attention
        with timer.decode() if timer else nullcontext():
            decode(
                q[num_prefill:],
                k_cache,
                v_cache,
                batch.decode_block_tables,
                batch.decode_seq_lens,
                sm_scale=scale,
                out=out[num_prefill:],
            )
    return out


def _prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    batch: AttentionBatch,
    scale: float,
    out: torch.Tensor,
) -> None:
    """One SDPA per prefill sequence (host lengths, no sync). A chunk with no cached prefix attends to
    its own K/V with the plain causal mask (flash with GQA on CUDA); a chunk after a prefix (chunked
    prefill, prefix-cache hit) gathers the sequence's pages and uses a bottom-right-aligned causal mask."""
    block_size = k_cache.shape[1]
    start = 0
    for i, (query_len, context_len) in enumerate(
        zip(batch.prefill_query_lens_host, batch.prefill_context_lens_host, strict=True)
    ):
        end = start + query_len
        # SDPA's fused kernels (flash, memory-efficient, CPU flash) want [batch, heads, tokens, D].
        q_i = q[start:end].transpose(0, 1).unsqueeze(0)
        if context_len == query_len:
            k_i, v_i = (t[start:end].transpose(0, 1).unsqueeze(0) for t in (k, v))
            o_i = F.scaled_dot_product_attention(q_i, k_i, v_i, is_causal=True, scale=scale, enable_gqa=True)
        else:
            blocks = batch.prefill_block_tables[i, : -(-context_len // block_size)]
            k_i, v_i = (_gather(cache, blocks, context_len, q.shape[1]) for cache in (k_cache, v_cache))
            # Query j sits at position context_len - query_len + j and sees the keys up to it.
            mask = causal_lower_right(query_len, context_len)
            o_i = F.scaled_dot_product_attention(q_i, k_i, v_i, attn_mask=mask, scale=scale)
        out[start:end] = o_i[0].transpose(0, 1)
        start = end


def _gather(cache: torch.Tensor, blocks: torch.Tensor, length: int, num_heads: int) -> torch.Tensor:
    """The first `length` cached tokens of a sequence as [1, num_heads, length, D], KV heads repeated
    for GQA (the memory-efficient kernel, the one that takes a bottom-right causal mask on CUDA, has no
    GQA mode)."""
    kv = cache[blocks].flatten(0, 1)[:length].transpose(0, 1)  # [Hkv, length, D]
    return kv.repeat_interleave(num_heads // kv.shape[0], dim=0).unsqueeze(0)
