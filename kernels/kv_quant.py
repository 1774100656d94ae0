"""The FP8 (e4m3) KV cache: every cached (token, KV head) row of D values is stored as float8_e4m3fn with
one fp32 scale, amax / 448 of that row, computed when the row is written (kernels/fp8.py's
`quantize_rows`, the CPU path and the twin; the cache writer, RoPE + cache write, computes the scale with
its `fp8_scale`). The readers (decode and prefill attention) apply the scales to their scores and
probabilities. Here: the cache's checks, its block selection and the torch store of rows at their slots.
Why per-row dynamic scales: docs/kernel_notes.md, FP8 KV cache."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from leanserve.kernels.fp8 import FP8, dequantize


def is_fp8(cache: torch.Tensor) -> bool:
    return cache.dtype == FP8


def is_slot_major(cache: torch.Tensor) -> bool:
    """Whether an fp8 cache's pages are slot-major, [D, block_size] a page, rather than [block_size, D]:
    the layout of V that e4m3 tensor-core products read (models.kv_cache; kernels/lean_decode.py)."""
    return is_fp8(cache) and cache.stride(-1) != 1


@triton.jit
def run_pages(table, first, seq_len, PAGE_SIZE: tl.constexpr, TOKENS: tl.constexpr):
    """The pages of the runs of min(PAGE_SIZE, TOKENS) slots that the sequence's positions first ..
    first + TOKENS - 1 fall in (0 for a run past seq_len): [TOKENS // run] int64. table: the sequence's
    block-table row."""
    RUN: tl.constexpr = min(PAGE_SIZE, TOKENS)
    run_first = first + tl.arange(0, TOKENS // RUN) * RUN
    return tl.load(table + run_first // PAGE_SIZE, mask=run_first < seq_len, other=0).to(tl.int64)


@triton.jit
def load_slot_major(
    cache_ptr, page, h, first, seq_len, stride_n, stride_h, stride_d, offs_d, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, PAGE_SIZE: tl.constexpr, TOKENS: tl.constexpr,
):  # fmt: skip
    """The transposed rows of a slot-major cache (V) for KV head h at the sequence's positions first ..
    first + TOKENS - 1 (first a multiple of min(PAGE_SIZE, TOKENS)): [BLOCK_D, TOKENS], read as runs of
    min(PAGE_SIZE, TOKENS) slots of one page (`page`: run_pages'), so that loads move 16 bytes at once. A
    run is read whole if its first position is below seq_len: the slots past the sequence's end lie in its
    own last page (zeroed at allocation, or rows an earlier owner wrote: finite e4m3 values), which the
    caller weights by a probability of 0."""
    RUN: tl.constexpr = min(PAGE_SIZE, TOKENS)
    run_first = first + tl.arange(0, TOKENS // RUN) * RUN
    run_mask = run_first < seq_len
    run = page * stride_n + run_first % PAGE_SIZE
    offs = h * stride_h + run[None, :, None] + offs_d[:, None, None] * stride_d
    offs += tl.arange(0, RUN)[None, None, :]
    mask = run_mask[None, :, None] & (offs_d < HEAD_DIM)[:, None, None]
    return tl.reshape(tl.load(cache_ptr + offs, mask=mask, other=0.0), [BLOCK_D, TOKENS])


def select_blocks(cache: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """cache.index_select(0, index), for fp8 caches too (CPU torch has no fp8 index kernels: the bytes
    are selected as uint8)."""
    if not is_fp8(cache):
        return cache.index_select(0, index)
    return cache.view(torch.uint8).index_select(0, index).view(cache.dtype)


def gather_pages(
    cache: torch.Tensor, scales: torch.Tensor | None, pages: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """The rows of the cache's `pages` (1-D block ids) back to back, [len(pages) * block_size, Hkv, D] in
    dtype; an fp8 cache's dequantized with its `scales`."""
    values = select_blocks(cache, pages).flatten(0, 1)
    if scales is None:
        return values.to(dtype)
    return dequantize(values, scales.index_select(0, pages).flatten(0, 1), dtype)


def store_slots(cache: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor) -> None:
    """cache[slot // block_size, slot % block_size] = rows for cache [num_blocks, block_size, ...] of any
    strides (head-major blocks too), slots [T] int64 and rows [T, ...]; fp8 caches too (CPU torch has no
    fp8 index_put_: the bytes are stored as uint8)."""
    block_size = cache.shape[1]
    if is_fp8(cache):
        cache, rows = cache.view(torch.uint8), rows.view(torch.uint8)
    cache[slots // block_size, slots % block_size] = rows


def check_cache_scales(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k_scale: torch.Tensor | None, v_scale: torch.Tensor | None
) -> None:
    """ValueError unless fp8 caches come with their scales (fp32 [num_blocks, block_size, Hkv] on the
    caches' device, any strides but both alike: the readers take them as given) and other caches
    without."""
    if not is_fp8(k_cache) and not is_fp8(v_cache):
        if k_scale is not None or v_scale is not None:
            raise ValueError(f"scales are for float8_e4m3fn caches, got {k_cache.dtype} caches with scales")
        return
    if k_cache.dtype != v_cache.dtype:
        raise ValueError(f"k_cache and v_cache must share a dtype, got {k_cache.dtype} and {v_cache.dtype}")
    for name, scale in (("k_scale", k_scale), ("v_scale", v_scale)):
        if scale is None:
            raise ValueError(f"float8_e4m3fn caches need {name}")
        if scale.shape != k_cache.shape[:3] or scale.dtype != torch.float32 or scale.device != k_cache.device:
            raise ValueError(
                f"{name} must be a float32 {tuple(k_cache.shape[:3])} on {k_cache.device}, got "
                f"{scale.dtype} {tuple(scale.shape)} on {scale.device}"
            )
    if k_scale.stride() != v_scale.stride():
        raise ValueError(
            f"k_scale and v_scale must share strides, got {k_scale.stride()} and {v_scale.stride()}"
        )
