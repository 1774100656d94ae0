"""The one place that chooses, per call, between a Triton kernel (CUDA tensors) and its plain-torch twin
(any other device: the CPU path and the tests' oracle). The model and the sampler call these ops; each has
its kernel's signature."""

from __future__ import annotations

import torch

from leanserve.kernels import activation, argmax, lean_attention, rotary
from leanserve.kernels import prefill_attention as paged_prefill
from leanserve.kernels import rms_norm as norms
from leanserve.kernels.activation import reference_silu_and_mul, reference_silu_and_mul_fp8
from leanserve.kernels.argmax import reference_argmax_rows
from leanserve.kernels.fp8 import FP8Rows
from leanserve.kernels.reference import reference_decode_attention, reference_prefill_attention
from leanserve.kernels.rms_norm import (
    reference_fused_add_rms_norm,
    reference_fused_add_rms_norm_fp8,
    reference_rms_norm,
    reference_rms_norm_fp8,
)
from leanserve.kernels.rotary import reference_rope_and_cache

__all__ = [
    "argmax_rows",
    "decode_attention",
    "fused_add_rms_norm",
    "fused_add_rms_norm_fp8",
    "prefill_attention",
    "rms_norm",
    "rms_norm_fp8",
    "rope_and_cache",
    "silu_and_mul",
    "silu_and_mul_fp8",
]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return (norms.rms_norm if x.is_cuda else reference_rms_norm)(x, weight, eps)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return (norms.fused_add_rms_norm if x.is_cuda else reference_fused_add_rms_norm)(x, residual, weight, eps)


def rms_norm_fp8(x: torch.Tensor, weight: torch.Tensor, eps: float) -> FP8Rows:
    return (norms.rms_norm_fp8 if x.is_cuda else reference_rms_norm_fp8)(x, weight, eps)


def fused_add_rms_norm_fp8(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[FP8Rows, torch.Tensor]:
    apply = norms.fused_add_rms_norm_fp8 if x.is_cuda else reference_fused_add_rms_norm_fp8
    return apply(x, residual, weight, eps)


def rope_and_cache(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    cos_sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    apply = rotary.rope_and_cache if qkv.is_cuda else reference_rope_and_cache
    return apply(qkv, positions, cos_sin, k_cache, v_cache, slot_mapping, k_scale, v_scale)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    return (activation.silu_and_mul if gate_up.is_cuda else reference_silu_and_mul)(gate_up)


def silu_and_mul_fp8(gate_up: torch.Tensor) -> FP8Rows:
    return (activation.silu_and_mul_fp8 if gate_up.is_cuda else reference_silu_and_mul_fp8)(gate_up)


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    return (argmax.argmax_rows if x.is_cuda else reference_argmax_rows)(x)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    sm_scale: float | None = None,
    out: torch.Tensor | None = None,
    timestamps: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """LeanAttention on CUDA; elsewhere its twin, which records no kernel timestamps (the CPU's attention
    timer measures host time instead)."""
    if q.is_cuda:
        return lean_attention.lean_attention_decode(
            q, k_cache, v_cache, block_tables, seq_lens, sm_scale, out, timestamps, k_scale, v_scale
        )
    return reference_decode_attention(
        q, k_cache, v_cache, block_tables, seq_lens, sm_scale, out, k_scale, v_scale
    )


def prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    block_tables: torch.Tensor,
    sm_scale: float | None = None,
    out: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """All prefill chunks of a step against the paged cache: the Triton kernel on CUDA, one launch;
    elsewhere its twin (one fp32 SDPA per chunk)."""
    apply = paged_prefill.prefill_attention if q.is_cuda else reference_prefill_attention
    return apply(
        q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, sm_scale, out, k_scale, v_scale
    )
