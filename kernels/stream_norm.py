"""The residual stream and its RMSNorm carried by skinny products' epilogues (kernels/skinny_linear.py):
a product whose output joins the stream (attention's output projection) adds it to the residual and sums
the squares of the sum's rows per block of W (`add_to_stream`); the next product (gate/up) loads those
partial sums and scales its rows by 1 / rms (`load_squares`, `scale_rows`), standing in for the norm
kernel between them (`kernels.rms_norm`) with the norm's weight folded into its W."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass(frozen=True)
class StreamNorm:
    """The RMSNorm of a product's x, where x is a residual stream that `skinny_linear_residual` wrote and
    summed the squares of (`squares`: [blocks, rows] fp32, one row of partial sums per block of that
    product's W): the product scales its fp32 rows by rsqrt(mean square + eps), which is the product of
    the normalised x. The norm's weight is not applied: fold it into W's columns (W * weight). Against
    the norm kernel (`kernels.rms_norm`) one rounding differs: it rounds the normalised x to the dtype
    before the product."""

    squares: torch.Tensor
    eps: float


@triton.jit
def load_squares(
    squares_ptr, stride_sq, num_squares, offs_m, M, SQ_BLOCK: tl.constexpr, SCALE_ROWS: tl.constexpr
):
    """With SCALE_ROWS, the partial sums of squares of x's rows as [SQ_BLOCK, BLOCK_M] (zeros past them):
    loaded at the start, summed after the K loop (`scale_rows`), so the loads' latency hides behind it."""
    squares = 0.0
    if SCALE_ROWS:
        p = tl.arange(0, SQ_BLOCK)
        mask = (p[:, None] < num_squares) & (offs_m[None, :] < M)
        squares = tl.load(squares_ptr + p[:, None] * stride_sq + offs_m[None, :], mask=mask, other=0.0)
    return squares


@triton.jit
def scale_rows(acc, squares, K, eps, SWAP: tl.constexpr, SCALE_ROWS: tl.constexpr):
    """With SCALE_ROWS, the product's rows times 1 / rms of x's rows."""
    if SCALE_ROWS:
        rstd = tl.rsqrt(tl.sum(squares, axis=0) / K + eps)
        acc = acc * rstd[None, :] if SWAP else acc * rstd[:, None]
    return acc


@triton.jit
def load_residual(res_ptr, offs_m, offs_n, M, N, stride_res, SWAP: tl.constexpr, ADD_RESIDUAL: tl.constexpr):
    """With ADD_RESIDUAL, the residual's tile in the accumulator's orientation (loaded at the start)."""
    r = 0.0
    if ADD_RESIDUAL:
        if SWAP:
            mask = (offs_n[:, None] < N) & (offs_m[None, :] < M)
            r = tl.load(res_ptr + offs_m[None, :] * stride_res + offs_n[:, None], mask=mask, other=0.0)
        else:
            mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
            r = tl.load(res_ptr + offs_m[:, None] * stride_res + offs_n[None, :], mask=mask, other=0.0)
    return r


@triton.jit
def add_to_stream(
    y_ptr, acc, r, squares_ptr, stride_sq, block, offs_m, offs_n, M, N, stride_ym, SWAP: tl.constexpr
):
    """y = residual + product, rounded as the norm kernel rounds the stream (the product to the dtype,
    then the sum), and this block's sums of squares of y's rows into row `block` of the squares."""
    dtype = y_ptr.dtype.element_ty
    h = (acc.to(dtype).to(tl.float32) + r.to(tl.float32)).to(dtype)
    hf = h.to(tl.float32)
    if SWAP:
        mask = (offs_n[:, None] < N) & (offs_m[None, :] < M)
        tl.store(y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None], h, mask=mask)
        sums = tl.sum(tl.where(mask, hf * hf, 0.0), axis=0)
    else:
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], h, mask=mask)
        sums = tl.sum(tl.where(mask, hf * hf, 0.0), axis=1)
    tl.store(squares_ptr + block * stride_sq + offs_m, sums, mask=offs_m < M)
