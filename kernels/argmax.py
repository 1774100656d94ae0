"""Row-wise argmax of the logits (Triton): the greedy token, and the winner of the sampler's exponential
race. torch's argmax on CUDA reduces a whole [B, 128256] row in one block: on an H100 27 us at 1 row and
40 us at 64 (bench_engine.py --profile, docs/benchmarks.md). Here one launch takes the maximum of
4096-column chunks, spread over the GPU, and a second folds each row's chunks: 3.4 / 9.1 us in a CUDA
graph (docs/benchmarks.md, Engine). The torch twin is
`torch.argmax(x, dim=-1)`, whose ties and NaNs this follows: the first index of the maximum, NaN
counting as larger than any number."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from leanserve.kernels.launch import use_pdl, wait_for_previous_kernel

# Larger than any column: the min() below never picks it over a real one.
_NO_INDEX = tl.constexpr(2**31 - 1)


@triton.jit
def _first_max(values, indices):
    """(max, first index of it) of a 1-D block; NaN is the maximum, as in torch."""
    values = tl.where(values != values, float("inf"), values)
    best = tl.max(values, axis=0)
    return best, tl.min(tl.where(values == best, indices, _NO_INDEX), axis=0)


@triton.jit
def _chunk_argmax_kernel(
    x_ptr, best_ptr, index_ptr, vocab, stride_x, num_chunks, CHUNK: tl.constexpr, PDL: tl.constexpr
):
    wait_for_previous_kernel(PDL)
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    offs = chunk * CHUNK + tl.arange(0, CHUNK)
    x = tl.load(x_ptr + row.to(tl.int64) * stride_x + offs, mask=offs < vocab, other=-float("inf"))
    best, index = _first_max(x.to(tl.float32), offs)
    tl.store(best_ptr + row * num_chunks + chunk, best)
    tl.store(index_ptr + row * num_chunks + chunk, index)


@triton.jit
def _fold_chunks_kernel(best_ptr, index_ptr, out_ptr, num_chunks, BLOCK: tl.constexpr, PDL: tl.constexpr):
    wait_for_previous_kernel(PDL)
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < num_chunks
    best = tl.load(best_ptr + row * num_chunks + offs, mask=mask, other=-float("inf"))
    index = tl.load(index_ptr + row * num_chunks + offs, mask=mask, other=_NO_INDEX)
    # Chunks hold disjoint, increasing columns: the smallest index among the chunks that reach the
    # maximum is the row's first maximum.
    _, first = _first_max(best, index)
    tl.store(out_ptr + row, first.to(tl.int64))


# 4096 columns a program at 8 warps (16 fp32 values a thread): 32 programs a 128k-vocabulary row.
# On an H100 (us, 1 / 8 / 64 rows, in a CUDA graph; docs/benchmarks.md, Engine): chunks of 2048 3.4 / 4.2
# / 9.6, 4096 3.7 / 4.4 / 9.1, 8192 4.1 / 4.6 / 10.0.
_CHUNK = 4096
_NUM_WARPS = 8


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """x: [B, V] fp16/bf16/fp32 with unit column stride. Returns [B] int64: each row's first maximum.
    No host synchronisation (CUDA-graph capturable)."""
    if x.dim() != 2 or x.stride(1) != 1 or not x.is_floating_point():
        raise ValueError(f"x must be a float [B, V] with unit column stride, got {x.dtype} {tuple(x.shape)}")
    rows, vocab = x.shape
    if not 0 < vocab < _NO_INDEX.value:
        raise ValueError(f"argmax needs 1 to {_NO_INDEX.value - 1} columns, got {vocab}")
    num_chunks = triton.cdiv(vocab, _CHUNK)
    best = torch.empty(rows, num_chunks, dtype=torch.float32, device=x.device)
    index = torch.empty(rows, num_chunks, dtype=torch.int32, device=x.device)
    out = torch.empty(rows, dtype=torch.int64, device=x.device)
    if rows:
        pdl = use_pdl(x.device)
        _chunk_argmax_kernel[(rows, num_chunks)](
            x, best, index, vocab, x.stride(0), num_chunks, CHUNK=_CHUNK, PDL=pdl, num_warps=_NUM_WARPS,
            launch_pdl=pdl,
        )  # fmt: skip
        _fold_chunks_kernel[(rows,)](
            best, index, out, num_chunks, BLOCK=triton.next_power_of_2(num_chunks), PDL=pdl, num_warps=1,
            launch_pdl=pdl,
        )  # fmt: skip
    return out


def reference_argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """Torch twin of `argmax_rows`."""
    return x.argmax(dim=-1)
