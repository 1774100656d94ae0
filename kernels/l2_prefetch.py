"""Stream the start of a tensor into the GPU's L2 cache (Triton, Hopper's `cp.async.bulk.prefetch.L2`),
so that a later kernel reads it from L2 instead of DRAM.

Why: at decode batch 1 with a short context, LeanAttention is latency-bound (a Llama-3-8B layer's 4 MB
of KV in ~9 us against 1.4 us of DRAM time; bench_engine.py --profile, docs/benchmarks.md) and DRAM idles
meanwhile. Prefetching the first 16 MB of the next product's weights (the attention output projection)
on a side stream while attention runs takes a batch-1 Llama-3-8B layer chain on an H100 to 5722 us a
step against 5810 without; past a few thousand KV tokens in the step the prefetch competes with
attention's own reads and loses (docs/benchmarks.md, Engine), so the model runner only uses it for
small steps. A prefetch is a hint: it changes no value, only timing."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from leanserve.kernels.launch import interpreted

# One bulk prefetch per 16 KB piece; each program issues PIECES_PER_STEP of them per loop step.
_PIECE = 16384
_PIECES_PER_STEP = 128
_PROGRAMS = 16


@triton.jit
def _prefetch_l2_kernel(ptr, num_pieces, PIECE: tl.constexpr, PIECES_PER_STEP: tl.constexpr):
    for first in range(tl.program_id(0) * PIECES_PER_STEP, num_pieces, tl.num_programs(0) * PIECES_PER_STEP):
        piece = first + tl.arange(0, PIECES_PER_STEP)
        valid = piece < num_pieces
        size = tl.where(valid, PIECE, 0).to(tl.int32)
        address = ptr + tl.where(valid, piece.to(tl.int64) * PIECE, 0)
        # The instruction has no result; the asm returns a dummy register so Triton keeps it.
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.s32 p, $2, 0; "
            "@p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
            "=r,l,r",
            [address, size],
            dtype=tl.int32,
            is_pure=False,
            pack=1,
        )


@functools.cache
def supports_l2_prefetch(device: torch.device) -> bool:
    """A compiled CUDA device of compute capability 9.0 or later (the bulk prefetch is Hopper's); the
    interpreter cannot run inline PTX."""
    return device.type == "cuda" and not interpreted() and torch.cuda.get_device_capability(device)[0] >= 9


def prefetch_l2(t: torch.Tensor, nbytes: int) -> None:
    """Queue an L2 prefetch of the first `nbytes` of the contiguous tensor `t` (whole 16 KB pieces, at
    most the tensor) on the current stream. No host synchronisation (CUDA-graph capturable)."""
    if not supports_l2_prefetch(t.device) or not t.is_contiguous():
        raise ValueError(f"prefetch_l2 needs a contiguous tensor on a Hopper GPU, got {t.device}")
    num_pieces = min(nbytes, t.numel() * t.element_size()) // _PIECE
    if num_pieces:
        _prefetch_l2_kernel[(_PROGRAMS,)](
            t.view(torch.uint8), num_pieces, PIECE=_PIECE, PIECES_PER_STEP=_PIECES_PER_STEP, num_warps=4
        )
