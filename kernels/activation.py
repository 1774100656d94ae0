"""SiLU-and-multiply of a gated MLP (Triton) and its torch twin: [T, 2I] gate || up -> silu(gate) * up,
one read of the fused gate/up product instead of the two kernels and the temporary of the torch form.
`silu_and_mul_fp8` writes the rows quantized for a W8A8 down projection (kernels.fp8.FP8Rows)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from leanserve.kernels.fp8 import (
    MAX_FUSED_K,
    FP8Rows,
    quantize_activations,
    quantize_row,
    quantize_rows,
    row_quantizer_warps,
)
from leanserve.kernels.launch import use_pdl, wait_for_previous_kernel


@triton.jit
def _silu_and_mul_kernel(
    gate_up_ptr,
    out_ptr,
    stride_in,
    stride_out,
    inter,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_previous_kernel(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < inter
    gate = tl.load(gate_up_ptr + row * stride_in + offs, mask=mask, other=0.0)
    up = tl.load(gate_up_ptr + row * stride_in + inter + offs, mask=mask, other=0.0)
    tl.store(out_ptr + row * stride_out + offs, silu_times(gate, up), mask=mask)


@triton.jit
def _silu_and_mul_fp8_kernel(
    gate_up_ptr,
    q_ptr,
    scale_ptr,
    stride_in,
    stride_q,
    inter,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    """One whole row per program (its scale needs the row's amax): silu(gate) * up rounded to the input's
    dtype, then its e4m3 values and scale (kernels.fp8.quantize_row)."""
    wait_for_previous_kernel(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < inter
    gate = tl.load(gate_up_ptr + row * stride_in + offs, mask=mask, other=0.0)
    up = tl.load(gate_up_ptr + row * stride_in + inter + offs, mask=mask, other=0.0)
    q, scale = quantize_row(silu_times(gate, up).to(tl.float32))
    tl.store(q_ptr + row * stride_q + offs, q, mask=mask)
    tl.store(scale_ptr + row, scale)


@triton.jit
def silu_times(gate, up):
    """silu(gate) * up in their dtype, rounded as F.silu(gate) * up rounds: silu to the dtype, then the
    product (also the skinny product's SiLU epilogue, kernels/skinny_linear.py)."""
    gate = gate.to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(up.dtype)
    return (act.to(tl.float32) * up.to(tl.float32)).to(up.dtype)


# 1024 columns per program at 4 warps: 8 elements per thread, one 16-byte bf16 load each of gate and
# up; Llama-3-8B's I = 14336 then spreads a single decode row over 14 programs.
_BLOCK = 1024
_NUM_WARPS = 4


# Widest row the fp8 kernel holds: gate and up together take the row quantizer's register budget.
_MAX_FP8_INTER = MAX_FUSED_K // 2


def _check(gate_up: torch.Tensor) -> None:
    if gate_up.dim() != 2 or gate_up.shape[1] % 2 or gate_up.stride(1) != 1:
        raise ValueError(
            f"gate_up must be [T, 2I] with unit column stride, got {tuple(gate_up.shape)} {gate_up.stride()}"
        )


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up: [T, 2I] fp16/bf16/fp32, gate columns first (any row stride). Returns a new [T, I]."""
    _check(gate_up)
    tokens, inter = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(tokens, inter, dtype=gate_up.dtype, device=gate_up.device)
    if tokens:
        pdl = use_pdl(gate_up.device)
        _silu_and_mul_kernel[(tokens, triton.cdiv(inter, _BLOCK))](
            gate_up,
            out,
            gate_up.stride(0),
            out.stride(0),
            inter,
            BLOCK=_BLOCK,
            PDL=pdl,
            num_warps=_NUM_WARPS,
            launch_pdl=pdl,
        )
    return out


def silu_and_mul_fp8(gate_up: torch.Tensor) -> FP8Rows:
    """silu_and_mul(gate_up), its rows quantized for a W8A8 product as kernels.fp8.quantize_rows quantizes
    them: one launch up to I = 16384 (Llama-3-8B's 14336: one program a row, where silu_and_mul spreads a
    row over 14 and the quantizer takes another launch), the two launches past it."""
    _check(gate_up)
    tokens, inter = gate_up.shape[0], gate_up.shape[1] // 2
    if inter > _MAX_FP8_INTER:
        return FP8Rows(*quantize_activations(silu_and_mul(gate_up)), gate_up.dtype)
    rows = FP8Rows.empty(tokens, inter, gate_up.dtype, gate_up.device)
    if tokens:
        block = triton.next_power_of_2(inter)
        pdl = use_pdl(gate_up.device)
        _silu_and_mul_fp8_kernel[(tokens,)](
            gate_up,
            rows.values,
            rows.scales,
            gate_up.stride(0),
            rows.values.stride(0),
            inter,
            BLOCK=block,
            PDL=pdl,
            num_warps=row_quantizer_warps(2 * block),
            launch_pdl=pdl,
        )
    return rows


def reference_silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """Torch twin of `silu_and_mul`. gate_up: [..., 2I] -> [..., I]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def reference_silu_and_mul_fp8(gate_up: torch.Tensor) -> FP8Rows:
    """Torch twin of `silu_and_mul_fp8`."""
    return FP8Rows(*quantize_rows(reference_silu_and_mul(gate_up)), gate_up.dtype)
