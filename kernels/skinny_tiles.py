"""The tiles the skinny decode product (kernels/skinny_linear.py) is built of: a block of rows of x or W
over one K tile, their tensor-core product (optionally with W's rows on the MMA's M side), an FP8 W's
per-row scales and the stored block of y."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def load_rows(ptr, rows, num_rows, stride, k, K, EVEN_K: tl.constexpr, UPCAST: tl.constexpr):
    """The [len(rows), len(k)] tile of a row-major matrix (zeros past num_rows and K)."""
    mask = rows[:, None] < num_rows
    if not EVEN_K:
        mask = mask & (k[None, :] < K)
    tile = tl.load(ptr + rows[:, None].to(tl.int64) * stride + k[None, :], mask=mask, other=0.0)
    return tile.to(tl.float32) if UPCAST else tile


@triton.jit
def dot_acc(x, w, acc, SWAP: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc + x @ w.T, or with SWAP its transpose: the tile is y.T's, W's rows fill the MMA's M side. An
    FP8 w is widened to x's dtype in registers (exact: every e4m3 value is a bf16 / fp16 value); its scale
    waits for the epilogue (`scale_channels`)."""
    w = w.to(x.dtype)
    if SWAP:
        acc = tl.dot(w, tl.trans(x), acc, input_precision=DOT_PRECISION)
    else:
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def multiply_tile(
    x_ptr, w_ptr, acc, offs_m, offs_n, k, M, N, K, EVEN_K: tl.constexpr, stride_xm, stride_wn,
    SWAP: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """acc + the product of x's rows and W's rows offs_n over the columns k (one K tile)."""
    x = load_rows(x_ptr, offs_m, M, stride_xm, k, K, EVEN_K, UPCAST)
    w = load_rows(w_ptr, offs_n, N, stride_wn, k, K, EVEN_K, UPCAST)
    return dot_acc(x, w, acc, SWAP, DOT_PRECISION)


@triton.jit
def scale_channels(acc, scale_ptr, offs_n, N, SWAP: tl.constexpr, W_SCALED: tl.constexpr):
    """With W_SCALED (an FP8 W), the product's columns offs_n times W's per-row scales."""
    if W_SCALED:
        scale = tl.load(scale_ptr + offs_n, mask=offs_n < N, other=0.0)
        acc = acc * scale[:, None] if SWAP else acc * scale[None, :]
    return acc


@triton.jit
def scale_x_rows(acc, x_scale_ptr, offs_m, M, SWAP: tl.constexpr, X_SCALED: tl.constexpr):
    """With X_SCALED (an e4m3 x, W8A8), the product's rows offs_m times x's per-row scales."""
    if X_SCALED:
        scale = tl.load(x_scale_ptr + offs_m, mask=offs_m < M, other=0.0)
        acc = acc * scale[None, :] if SWAP else acc * scale[:, None]
    return acc


@triton.jit
def store_block(
    y_ptr, bias_ptr, acc, offs_m, offs_n, M, N, stride_ym, SWAP: tl.constexpr, HAS_BIAS: tl.constexpr
):
    """y[offs_m, offs_n] = acc (+ bias), in y's dtype."""
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
    if SWAP:
        if HAS_BIAS:
            acc += bias[:, None]
        y_ptrs = y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(offs_m[None, :] < M) & (offs_n[:, None] < N))
    else:
        if HAS_BIAS:
            acc += bias[None, :]
        y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))
