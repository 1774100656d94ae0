"""Skinny matrix product for decode (Triton): y = x @ W.T (+ bias) for a handful of rows of x.

At decode batch sizes a linear layer is a pure weight stream: each weight byte is read once and used for
a few multiply-adds. cuBLAS's choices for these shapes on an H100 leave bandwidth unused on the small
matrices (attention's output projection at 71% of the read floor) and split K with a separate reduction
kernel for others. Here each program streams BLOCK_N whole rows of W through a 4-stage pipeline and
keeps the (at most 16) rows of x against them in one tensor-core tile; no split K, no second kernel.
Its torch twin is `torch.nn.functional.linear`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.launch import interpreted, use_pdl, wait_for_previous_kernel

# Rows of x the kernel takes (tl.dot tiles have at least 16 rows): decode batches up to this size.
SKINNY_MAX_ROWS = 16
# Tuned on an H100 (bf16, Llama-3-8B's projections and LM head at 1 row; docs/kernel_notes.md): 32 rows of
# W x 256 columns per stage (16 KB), 4 stages in flight. Geometric mean 88.0% of the read floor against
# cuBLAS's 84.3%; at 32 and 64 rows no single choice beat cuBLAS, so larger batches keep it.
_BLOCK_N, _BLOCK_K, _STAGES, _WARPS = 32, 256, 4, 4


@triton.jit
def _skinny_linear_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    y_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_ym,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_previous_kernel(PDL)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m[:, None] < M
    n_mask = offs_n[:, None] < N
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k in range(0, K, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs, mask=m_mask, other=0.0)
            w = tl.load(w_ptrs, mask=n_mask, other=0.0)
        else:
            k_mask = (k + offs_k)[None, :] < K
            x = tl.load(x_ptrs, mask=m_mask & k_mask, other=0.0)
            w = tl.load(w_ptrs, mask=n_mask & k_mask, other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask & (offs_n[None, :] < N))


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T + bias for x: [..., K] with at most SKINNY_MAX_ROWS rows in all (any leading shape),
    weight: [N, K] contiguous, bias: [N] or None, all one dtype (fp16, bf16 or fp32) on one device.
    Returns [..., N] in that dtype, accumulated in fp32. No host synchronisation (CUDA-graph safe)."""
    _validate(x, weight, bias)
    n, k = weight.shape
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    pdl = use_pdl(x.device)
    y = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    if rows:
        _skinny_linear_kernel[(triton.cdiv(n, _BLOCK_N),)](
            x2,
            weight,
            bias,
            y,
            rows,
            n,
            k,
            x2.stride(0),
            weight.stride(0),
            y.stride(0),
            BLOCK_M=SKINNY_MAX_ROWS,
            BLOCK_N=_BLOCK_N,
            BLOCK_K=_BLOCK_K,
            EVEN_K=k % _BLOCK_K == 0,
            HAS_BIAS=bias is not None,
            UPCAST=interpreted(),
            DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
            PDL=pdl,
            num_stages=_STAGES,
            num_warps=_WARPS,
            launch_pdl=pdl,
        )
    return y.view(*x.shape[:-1], n)


reference_skinny_linear = F.linear  # the torch twin: same arguments, same result up to rounding


def _validate(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if weight.dim() != 2 or not weight.is_contiguous():
        raise ValueError(f"weight must be a contiguous [N, K] matrix, got shape {tuple(weight.shape)}")
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x must be [..., {weight.shape[1]}] to match weight, got {tuple(x.shape)}")
    if x.numel() // max(x.shape[-1], 1) > SKINNY_MAX_ROWS:
        raise ValueError(f"at most {SKINNY_MAX_ROWS} rows of x, got {x.numel() // x.shape[-1]}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32) or weight.dtype != x.dtype:
        raise ValueError(
            f"x and weight must share a float dtype (fp16, bf16, fp32), got {x.dtype}, {weight.dtype}"
        )
    if bias is not None and (
        bias.shape != (weight.shape[0],) or bias.dtype != x.dtype or not bias.is_contiguous()
    ):
        raise ValueError(f"bias must be a contiguous [{weight.shape[0]}] {x.dtype} vector")
    if len({x.device, weight.device} | ({bias.device} if bias is not None else set())) != 1:
        raise ValueError("x, weight and bias must be on one device")
