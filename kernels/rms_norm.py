"""RMSNorm (Triton), optionally fused with the residual add before it, and its torch twins. One program
normalises one row; statistics in fp32, the output rounded once like `F.rms_norm` (x * rstd * weight
in fp32, then to the input dtype). The fused form replaces a decoder layer's residual add + norm pair.
The `_fp8` forms write the normalised rows quantized for a W8A8 product (kernels.fp8.FP8Rows), the same
values as the norm followed by the row quantizer, without the quantizer's launch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from leanserve.kernels.fp8 import FP8Rows, quantize_row, quantize_rows
from leanserve.kernels.launch import use_pdl, wait_for_previous_kernel


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    residual_ptr,
    out_ptr,
    out_scale_ptr,
    weight_ptr,
    stride_x,
    stride_r,
    stride_o,
    hidden,
    eps,
    BLOCK: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    QUANTIZE: tl.constexpr,
    PDL: tl.constexpr,
):
    """QUANTIZE: out_ptr takes the row's e4m3 values and out_scale_ptr [T] its scale (kernels.fp8), of
    the output rounded to x's dtype first, as the norm and the quantizer in two launches compute it."""
    wait_for_previous_kernel(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < hidden
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        # Rounded to the stream's dtype before the norm reads it, as `residual + x` in torch.
        r = tl.load(residual_ptr + row * stride_r + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(residual_ptr.dtype.element_ty)
        tl.store(residual_ptr + row * stride_r + offs, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / hidden + eps)
    w = tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = (xf * rstd * w).to(x.dtype)
    if QUANTIZE:
        y, scale = quantize_row(y.to(tl.float32))
        tl.store(out_scale_ptr + row, scale)
    tl.store(out_ptr + row * stride_o + offs, y, mask=mask)


# A whole row lives in registers as fp32: 64 KB at most (Llama-3-405B's hidden size).
_MAX_HIDDEN = 16384


def _num_warps(block: int) -> int:
    """block / 256 warps, 1 to 8 (the Triton layer-norm tutorial's rule): hidden 4096 gets 8 warps,
    16 elements (two 16-byte bf16 loads) per thread."""
    return min(max(block // 256, 1), 8)


def _check(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None) -> None:
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"x must be [T, H] with unit column stride, got {tuple(x.shape)} {x.stride()}")
    hidden = x.shape[1]
    if weight.shape != (hidden,) or weight.dtype != x.dtype or not weight.is_contiguous():
        raise ValueError(
            f"weight must be a contiguous [{hidden}] {x.dtype}, got {tuple(weight.shape)} {weight.dtype}"
        )
    if residual is not None and (
        residual.shape != x.shape or residual.dtype != x.dtype or residual.stride(1) != 1
    ):
        raise ValueError(
            f"residual must be {tuple(x.shape)} {x.dtype} with unit column stride, "
            f"got {tuple(residual.shape)} {residual.dtype} {residual.stride()}"
        )
    if hidden > _MAX_HIDDEN:
        raise ValueError(f"hidden size {hidden} exceeds {_MAX_HIDDEN} (one row per program)")
    devices = {t.device for t in (x, weight, residual) if t is not None}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")


def _launch(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    out: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    out_scale: torch.Tensor | None = None,
) -> None:
    """out: [T, H] in x's dtype, or e4m3 with out_scale [T] fp32 (the quantized forms)."""
    block = triton.next_power_of_2(x.shape[1])
    pdl = use_pdl(x.device)
    _rms_norm_kernel[(x.shape[0],)](
        x,
        x if residual is None else residual,  # unused without a residual
        out,
        out_scale,
        weight,
        x.stride(0),
        0 if residual is None else residual.stride(0),
        out.stride(0),
        x.shape[1],
        eps,
        BLOCK=block,
        HAS_RESIDUAL=residual is not None,
        QUANTIZE=out_scale is not None,
        PDL=pdl,
        num_warps=_num_warps(block),
        launch_pdl=pdl,
    )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [T, H] fp16/bf16/fp32 (any row stride); weight: [H], x's dtype. Returns a new [T, H]."""
    _check(x, weight, None)
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if x.shape[0]:
        _launch(x, None, out, weight, eps)
    return out


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """In place: residual += x, then x = rms_norm(residual) * weight. x, residual: [T, H] of one dtype
    (any row strides); weight: [H]. Returns (x, residual), the updated inputs."""
    _check(x, weight, residual)
    if x.shape[0]:
        _launch(x, residual, x, weight, eps)
    return x, residual


def rms_norm_fp8(x: torch.Tensor, weight: torch.Tensor, eps: float) -> FP8Rows:
    """rms_norm(x, weight, eps), its rows quantized for a W8A8 product (as kernels.fp8.quantize_rows
    quantizes the rounded output), in one launch."""
    _check(x, weight, None)
    rows = FP8Rows.empty(*x.shape, x.dtype, x.device)
    if x.shape[0]:
        _launch(x, None, rows.values, weight, eps, rows.scales)
    return rows


def fused_add_rms_norm_fp8(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[FP8Rows, torch.Tensor]:
    """residual += x in place, then the rows of rms_norm(residual) * weight quantized for a W8A8 product,
    in one launch; x is left as it is. Returns (the quantized rows, residual)."""
    _check(x, weight, residual)
    rows = FP8Rows.empty(*x.shape, x.dtype, x.device)
    if x.shape[0]:
        _launch(x, residual, rows.values, weight, eps, rows.scales)
    return rows, residual


def reference_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Torch twin of `rms_norm`."""
    return F.rms_norm(x, x.shape[-1:], weight, eps)


def reference_fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch twin of `fused_add_rms_norm`, in place as well."""
    residual.add_(x)
    x.copy_(F.rms_norm(residual, residual.shape[-1:], weight, eps))
    return x, residual


def reference_rms_norm_fp8(x: torch.Tensor, weight: torch.Tensor, eps: float) -> FP8Rows:
    """Torch twin of `rms_norm_fp8`."""
    return FP8Rows(*quantize_rows(reference_rms_norm(x, weight, eps)), x.dtype)


def reference_fused_add_rms_norm_fp8(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[FP8Rows, torch.Tensor]:
    """Torch twin of `fused_add_rms_norm_fp8`, residual updated in place as well."""
    residual.add_(x)
    return reference_rms_norm_fp8(residual, weight, eps), residual
