"""FP8 (e4m3) KV-cache quantization: every cached (token, KV head) row of D values is stored as
float8_e4m3fn with one fp32 scale, amax / 448 of that row, computed when the row is written. The torch
functions are the CPU path and the twins of the kernels: the cache writer (RoPE + cache write) computes
the scale with `fp8_scale`, and the readers (decode and prefill attention) apply the scales to their
scores and probabilities. Why per-row dynamic scales: docs/kernel_notes.md, FP8 KV cache."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

FP8_DTYPE = getattr(torch, "float8_e4m3fn", None)  # None on a torch without float8
FP8_MAX = 448.0  # the largest finite e4m3fn value
# The smallest scale: an all-zero row stores zeros (0 / MIN_SCALE) instead of 0 / 0.
MIN_SCALE = 1e-12


def is_fp8(cache: torch.Tensor) -> bool:
    return FP8_DTYPE is not None and cache.dtype == FP8_DTYPE


def quantize_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [..., D] (any float dtype) -> (values [..., D] float8_e4m3fn, scales [...] fp32), with
    x ~= values * scales[..., None]; the scale is amax(|x|) / 448 of each row, computed in fp32."""
    x32 = x.float()
    scale = (x32.abs().amax(dim=-1) / FP8_MAX).clamp(min=MIN_SCALE)
    return (x32 / scale[..., None]).to(FP8_DTYPE), scale


def select_blocks(cache: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """cache.index_select(0, index), for fp8 caches too (CPU torch has no fp8 index kernels: the bytes
    are selected as uint8)."""
    if not is_fp8(cache):
        return cache.index_select(0, index)
    return cache.view(torch.uint8).index_select(0, index).view(cache.dtype)


def dequantize_kv(values: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """values: [..., D] float8_e4m3fn, scales: [...] fp32 -> [..., D] in `dtype`, computed in fp32."""
    return (values.float() * scales[..., None]).to(dtype)


def check_cache_scales(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k_scale: torch.Tensor | None, v_scale: torch.Tensor | None
) -> None:
    """ValueError unless fp8 caches come with their scales (contiguous fp32 [num_blocks, block_size, Hkv]
    on the caches' device) and other caches without."""
    if not is_fp8(k_cache) and not is_fp8(v_cache):
        if k_scale is not None or v_scale is not None:
            raise ValueError(f"scales are for float8_e4m3fn caches, got {k_cache.dtype} caches with scales")
        return
    if k_cache.dtype != v_cache.dtype:
        raise ValueError(f"k_cache and v_cache must share a dtype, got {k_cache.dtype} and {v_cache.dtype}")
    for name, scale in (("k_scale", k_scale), ("v_scale", v_scale)):
        if scale is None:
            raise ValueError(f"float8_e4m3fn caches need {name}")
        if (
            scale.shape != k_cache.shape[:3]
            or scale.dtype != torch.float32
            or not scale.is_contiguous()
            or scale.device != k_cache.device
        ):
            raise ValueError(
                f"{name} must be a contiguous float32 {tuple(k_cache.shape[:3])} on {k_cache.device}, got "
                f"{scale.dtype} {tuple(scale.shape)} on {scale.device}"
            )


@triton.jit
def fp8_scale(amax):
    """The scale of rows whose largest |value| (fp32) is `amax`, as `quantize_kv` computes it: stored
    values are x / scale, converted with `.to(tl.float8e4nv)`."""
    return tl.maximum(amax / 448.0, 1e-12)
