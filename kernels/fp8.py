"""FP8 (float8 e4m3) with one fp32 scale per row: row-wise quantization and its inverse (for weights,
activations and the KV cache, kernels/kv_quant.py), and the FP8-weight many-row product (prefill, large
batches). Decode-sized products read the FP8 weight in the skinny Triton kernel (kernels/skinny_linear.py,
`scale`); this module's `fp8_linear` is the rest: on CUDA W8A8 through `torch._scaled_mm` (x quantized per
row on the fly by one Triton kernel, `quantize_rows_fused`), elsewhere the weight dequantized to x's dtype
and multiplied (the reference and the CPU path). Activations that come from an RMSNorm or from
SiLU-and-multiply arrive quantized already (`FP8Rows`, written by those kernels: kernels/rms_norm.py,
kernels/activation.py), which saves the product the quantizer's launch.

W8A8 is what runs on CUDA: FP8 tensor cores take the products without widening W, and W reaches them
once at 1 byte, where dequantizing first writes and reads a bf16 copy besides. Decode products of up to
64 rows take the skinny kernel with e4m3 x (models.layers.linear; q/k/v with RoPE + the cache write in
its epilogue, kernels/skinny_fused.py); benchmarks/bench_fp8_linear.py times W8A8 in the skinny kernel
and in torch._scaled_mm, the skinny kernel weight-only (bf16 x) and bf16, per projection."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from leanserve.kernels.launch import use_pdl, wait_for_previous_kernel

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
# A row of zeros keeps a tiny positive scale, so dividing by it stays finite (and quantizes to zeros).
_MIN_SCALE = 1e-12


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w: [..., K] float -> (fp8 [..., K], scale [...] fp32) with w ~ fp8 * scale[..., None]: each row's
    largest magnitude maps to FP8_MAX (the scale computed in fp32)."""
    w32 = w.float()
    scale = (w32.abs().amax(dim=-1) / FP8_MAX).clamp(min=_MIN_SCALE)
    return quantize_with(w32, scale), scale


@triton.jit
def fp8_scale(amax):
    """The scale of rows whose largest |value| (fp32) is `amax`, as `quantize_rows` computes it: stored
    values are x / scale, converted with `.to(tl.float8e4nv)`."""
    return tl.maximum(amax / 448.0, 1e-12)


@triton.jit
def quantize_row(x):
    """A whole row in registers, fp32 (lanes past its end 0) -> (its e4m3 values, its scale), as
    `quantize_rows` computes them."""
    scale = fp8_scale(tl.max(tl.abs(x), axis=0))
    return tl.clamp(x / scale, -448.0, 448.0).to(tl.float8e4nv), scale


@dataclass(frozen=True)
class FP8Rows:
    """Activations quantized per row (`quantize_rows`) for a W8A8 product, written so by the kernel that
    produces them (RMSNorm, SiLU-and-multiply) rather than by a quantizer launch in front of the product.
    values: e4m3 [T, K]; scales: fp32 [T]; dtype: the rows' own dtype, which the product returns. shape,
    device and is_cuda are the values' (what the products' routing reads of an x)."""

    values: torch.Tensor
    scales: torch.Tensor
    dtype: torch.dtype

    @property
    def shape(self) -> torch.Size:
        return self.values.shape

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def is_cuda(self) -> bool:
        return self.values.is_cuda

    def numel(self) -> int:
        return self.values.numel()

    @classmethod
    def empty(cls, rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> FP8Rows:
        """Uninitialised rows for a kernel to write: [rows, cols] e4m3 and [rows] fp32 scales."""
        return cls(
            torch.empty(rows, cols, dtype=FP8, device=device),
            torch.empty(rows, dtype=torch.float32, device=device),
            dtype,
        )


@triton.jit
def _quantize_rows_kernel(
    x_ptr, q_ptr, scale_ptr, K, stride_x, stride_q, BLOCK_K: tl.constexpr, PDL: tl.constexpr
):
    """One row of x per program, whole in registers: its amax, its scale, its e4m3 values. It takes part
    in the decode chain's PDL protocol (kernels.launch), so the W8A8 product after it is scheduled while it
    runs rather than after it drains."""
    wait_for_previous_kernel(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_K)
    mask = offs < K
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    q, scale = quantize_row(x)
    tl.store(q_ptr + row * stride_q + offs, q, mask=mask)
    tl.store(scale_ptr + row, scale)


# Longest row the fused quantizer holds in registers (16 warps, 64 values a thread).
MAX_FUSED_K = 32768


def row_quantizer_warps(block: int) -> int:
    """Warps of a program that holds a row of `block` (a power of two) values and quantizes it: 4 to 16,
    2048 values a warp."""
    return min(16, max(4, block // 2048))


def quantize_rows_fused(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_rows in one launch, for x: [M, K] fp16/bf16/fp32 of unit column stride with K <= 32768:
    x is read once and the fp8 values and scales written once, where the torch ops pass over x about eight
    times (the W8A8 product's activations at prefill: bench_fp8_linear.py)."""
    m, k = x.shape
    if x.stride(1) != 1 or k > MAX_FUSED_K:
        raise ValueError(f"x must be [M, K <= {MAX_FUSED_K}] of unit column stride, got {tuple(x.shape)}")
    q = torch.empty(m, k, dtype=FP8, device=x.device)
    scale = torch.empty(m, dtype=torch.float32, device=x.device)
    if m:
        block_k = triton.next_power_of_2(k)
        pdl = use_pdl(x.device)
        _quantize_rows_kernel[(m,)](
            x,
            q,
            scale,
            k,
            x.stride(0),
            q.stride(0),
            BLOCK_K=block_k,
            PDL=pdl,
            num_warps=row_quantizer_warps(block_k),
            launch_pdl=pdl,
        )
    return q, scale


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_rows of x: [M, K] for the W8A8 product: one fused pass where its rows fit the kernel
    (`quantize_rows_fused`), the torch ops for longer rows (an MLP wider than 32768)."""
    if x.stride(1) == 1 and x.shape[1] <= MAX_FUSED_K:
        return quantize_rows_fused(x)
    return quantize_rows(x)


def as_fp8_rows(x: torch.Tensor | FP8Rows, k: int) -> FP8Rows:
    """The rows of x [..., K] quantized for a W8A8 product: FP8Rows as they come (quantized by their
    producer), a tensor through `quantize_activations`."""
    return x if isinstance(x, FP8Rows) else FP8Rows(*quantize_activations(x.reshape(-1, k)), x.dtype)


def quantize_with(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """w: [..., K] float, scale: [...] fp32 -> fp8 [..., K]: w / scale rounded to nearest, saturated."""
    return (w.float() / scale.float()[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def dequantize(w: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp8 [..., K] and scale [...] -> [..., K] in dtype (the product computed in fp32, rounded once)."""
    return (w.float() * scale.float()[..., None]).to(dtype)


def reference_fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """x @ dequantize(weight, scale).T + bias: x [..., K] (fp32, bf16 or fp16), weight fp8 [N, K], scale
    [N] fp32; [..., N] in out_dtype (default x's). The torch twin of every FP8 product."""
    y = F.linear(x, dequantize(weight, scale, x.dtype), bias)
    return y if out_dtype is None else y.to(out_dtype)


def scaled_mm_fits(x: torch.Tensor | FP8Rows, weight: torch.Tensor) -> bool:
    """Whether torch._scaled_mm takes the product of x [..., K] and an FP8 weight [N, K]: half-precision
    x on CUDA, K and N multiples of 16."""
    n, k = weight.shape
    return x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and n % 16 == 0 and k % 16 == 0


def fp8_linear(
    x: torch.Tensor | FP8Rows,
    weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """reference_fp8_linear's result for any number of rows. Where `scaled_mm_fits`, the activations are
    quantized per row (unless x comes as FP8Rows, quantized by its producer) and the product runs on FP8
    tensor cores with row-wise scales (`torch._scaled_mm`): the weight is read once at 1 byte an element,
    where dequantizing first would write and read it again at 2. Elsewhere the reference (x a tensor)."""
    n, k = weight.shape
    if not isinstance(x, FP8Rows) and not scaled_mm_fits(x, weight):
        return reference_fp8_linear(x, weight, scale, bias, out_dtype)
    rows = as_fp8_rows(x, k)
    # Row-wise scaling takes bf16 output only; column-major B is weight.T of the row-major weight.
    scales = {"scale_a": rows.scales[:, None], "scale_b": scale[None, :]}
    y = torch._scaled_mm(rows.values, weight.t(), **scales, out_dtype=torch.bfloat16)
    if bias is not None:
        y = y + bias
    return y.to(out_dtype or x.dtype).view(*x.shape[:-1], n)
