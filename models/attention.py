"""Attention over the paged KV cache: the per-step batch description, the attention timer and the
attention computation itself (prefill by SDPA per chunk or by the paged prefill kernel over cached prefix +
chunk, decode by the LeanAttention kernel; on CPU the kernels' torch references). The step's K/V are
already in the cache: the rotary embedding step writes them (models.layers.RotaryEmbedding)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch

from leanserve.kernels import ops
from leanserve.models.prefetch import SideStreamPrefetch
from leanserve.models.sdpa_prefill import sdpa_prefill, splits_at_prefix

# Prefill steps of up to SDPA_MAX_CHUNKS chunks, and steps of whole prompts only, run SDPA per chunk
# (models.sdpa_prefill: cuDNN on an H100); other steps, one paged prefill kernel launch. In
# bench_long_context.py's TTFT part (H100, docs/benchmarks.md) against the paged kernel: whole prompts 8k
# 225 against 236 ms, 32k 1219 against 1486; 32k in 2k chunks 1388 against 1508. The benchmark turns
# SDPA_PREFILL off to time the paged kernel.
SDPA_PREFILL = True
SDPA_MAX_CHUNKS = 4


@dataclass
class AttentionBatch:
    """What attention needs for one step. New tokens are laid out prefill chunks first, then one
    token per decoding sequence. For a CUDA-graph decode step every tensor here is a static buffer
    (num_prefill_tokens == 0); padded rows must point their slot at a scratch block and may have
    seq_len 1."""

    slot_mapping: torch.Tensor  # [T] int64: cache slot (block_id * block_size + offset) per new token
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
    # Small decode steps on Hopper: each layer's output projection weights are prefetched into L2 while
    # its attention runs (models.prefetch); the model runner decides per step.
    prefetch: SideStreamPrefetch | None = None


_NO_LAUNCH = (torch.iinfo(torch.int64).max, 0)  # a stamps row no kernel has folded a span into


@dataclass
class AttentionReading:
    """What one step's timer recorded, read after the step's own synchronisation (no extra sync):
    `seconds()` is (prefill, decode). Each step gets its own reading, so a step launched while the host
    still reads the previous one never overwrites it."""

    prefill_events: list[tuple[torch.cuda.Event, torch.cuda.Event]]
    decode_stamps: torch.Tensor | None  # [calls, 2] int64 ns in pinned host memory (CUDA)
    host_seconds: tuple[float, float]  # CPU: perf_counter sums

    def seconds(self) -> tuple[float, float]:
        prefill, decode = self.host_seconds
        prefill += sum(start.elapsed_time(end) for start, end in self.prefill_events) / 1e3
        if self.decode_stamps is not None:
            spans = self.decode_stamps[:, 1] - self.decode_stamps[:, 0]
            decode += spans.clamp(min=0).sum().item() / 1e9  # rows no kernel ran for count 0
        return prefill, decode


class AttentionTimer:
    """Attention time of one step, summed over layers, split into prefill and decode.

    CUDA decode: the LeanAttention kernel folds its own GPU-side span (global-timer ns) into one row of
    a device buffer per call; `start()` queues the rows' reset, so a timer used while a CUDA graph is
    captured puts one small copy into the graph, and each replay re-stamps the same rows (call
    `finish()` after each replay, never `start()`). Events would cost device time inside a graph: 64 of
    them (a Llama-3-8B step's) add ~230 us a step at batch 8 (a microbenchmark, docs/benchmarks.md).
    CUDA prefill (eager steps only): a pair of events per call. CPU: `perf_counter` around each call
    (the ops are synchronous)."""

    def __init__(self, device: torch.device, max_decode_calls: int) -> None:
        self._cuda = device.type == "cuda"
        if self._cuda:
            blank = torch.tensor([_NO_LAUNCH], dtype=torch.int64)
            self._blank = blank.expand(max_decode_calls, 2).contiguous().to(device)
            self._stamps = torch.empty_like(self._blank)
        self.start()

    def start(self) -> None:
        """Begin a step: forget the last step's calls and (CUDA) queue the stamps' reset."""
        self._prefill_events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._decode_calls = 0
        self._seconds = [0.0, 0.0]
        if self._cuda:
            self._stamps.copy_(self._blank)

    @contextmanager
    def prefill(self) -> Iterator[None]:
        if not self._cuda:
            yield from self._host_span(0)
            return
        pair = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        pair[0].record()
        yield
        pair[1].record()
        self._prefill_events.append(pair)

    @contextmanager
    def decode(self) -> Iterator[torch.Tensor | None]:
        """Yields the stamps row for the kernel's `timestamps` argument on CUDA, None on CPU."""
        if not self._cuda:
            yield from self._host_span(1)
            return
        if self._decode_calls == len(self._stamps):
            raise RuntimeError(f"more than {len(self._stamps)} decode attention calls in one step")
        self._decode_calls += 1
        yield self._stamps[self._decode_calls - 1]

    def _host_span(self, kind: int) -> Iterator[None]:
        start = time.perf_counter()
        yield None
        self._seconds[kind] += time.perf_counter() - start

    def finish(self) -> AttentionReading:
        """End a step (or a graph replay): queue the copy of the stamps to the host, non-blocking."""
        stamps = None
        if self._cuda:
            stamps = torch.empty((self._decode_calls, 2), dtype=torch.int64, pin_memory=True)
            stamps.copy_(self._stamps[: self._decode_calls], non_blocking=True)
        return AttentionReading(list(self._prefill_events), stamps, (self._seconds[0], self._seconds[1]))


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    batch: AttentionBatch,
    scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of the step's new tokens over their sequences' caches, which only reads them.

    q: [T, Hq, D]; k, v: [T, Hkv, D] (new tokens, any strides, already written to the caches at
    batch.slot_mapping); k_cache, v_cache: [num_blocks, block_size, Hkv, D], float8_e4m3fn with their
    scales k_scale, v_scale [num_blocks, block_size, Hkv] or in q's dtype. Returns [T, Hq, D]."""
    out = torch.empty_like(q)
    timer = batch.timer
    num_prefill = batch.num_prefill_tokens
    if num_prefill:
        with timer.prefill() if timer else nullcontext():
            _prefill(q, k, v, k_cache, v_cache, k_scale, v_scale, batch, scale, out)
    if num_prefill < q.shape[0]:
        args = (q[num_prefill:], k_cache, v_cache, batch.decode_block_tables, batch.decode_seq_lens)
        with timer.decode() if timer else nullcontext() as stamps:
            ops.decode_attention(
                *args,
                sm_scale=scale,
                out=out[num_prefill:],
                timestamps=stamps,
                k_scale=k_scale,
                v_scale=v_scale,
            )
    return out


def _prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_scale: torch.Tensor | None,
    v_scale: torch.Tensor | None,
    batch: AttentionBatch,
    scale: float,
    out: torch.Tensor,
) -> None:
    """Every prefill chunk of the step: SDPA per chunk (SDPA_PREFILL) or one call over the paged cache
    (ops.prefill_attention: the Triton kernel on CUDA, its twin elsewhere), each chunk's causal mask
    aligned to its prefix."""
    num_prefill = batch.num_prefill_tokens
    query_lens, context_lens = batch.prefill_query_lens_host, batch.prefill_context_lens_host
    whole_prompts = query_lens == context_lens
    few_chunks = len(query_lens) <= SDPA_MAX_CHUNKS and splits_at_prefix(q)
    if SDPA_PREFILL and (whole_prompts or few_chunks):
        args = (k_cache, v_cache, k_scale, v_scale, query_lens, context_lens, batch.prefill_block_tables)
        sdpa_prefill(q[:num_prefill], k, v, *args, scale, out)
        return
    ops.prefill_attention(
        q[:num_prefill],
        k_cache,
        v_cache,
        batch.prefill_cu_seqlens_q,
        batch.prefill_context_lens,
        batch.prefill_block_tables,
        sm_scale=scale,
        out=out[:num_prefill],
        k_scale=k_scale,
        v_scale=v_scale,
    )
