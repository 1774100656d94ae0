"""Building blocks shared by the Llama-family layers: the linear product (bf16 / fp16 / fp32 weights, or
FP8 weights with per-row scales), RMSNorm (fused with the residual add), rotary embeddings (plain, linear
and Llama-3 scaled) applied together with the KV-cache write, and the fused gated (SwiGLU) MLP. Each runs
its Triton kernel on CUDA tensors and the kernel's torch twin elsewhere. Weights are created empty; the
loader fills them."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from leanserve.kernels import ops
from leanserve.kernels.fp8 import FP8, FP8Rows, dequantize, fp8_linear, scaled_mm_fits
from leanserve.kernels.skinny_config import SKINNY_MAX_ROWS, skinny_beats_cublas
from leanserve.kernels.skinny_fused import fuses_rope, fuses_silu, skinny_linear_rope, skinny_linear_silu
from leanserve.kernels.skinny_linear import skinny_linear, skinny_linear_w8a8
from leanserve.kernels.stream_norm import StreamNorm
from leanserve.models.config import ModelConfig


def empty_param(*shape: int, dtype: torch.dtype) -> nn.Parameter:
    """An uninitialised frozen parameter on the current default device (the loader fills it)."""
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


def linear_weight(module: nn.Module, name: str, rows: int, cols: int, dtype: torch.dtype, fp8: bool) -> None:
    """Give `module` an empty [rows, cols] weight `name`: in dtype, or with `fp8` in float8 e4m3 with its
    per-row fp32 scales `{name}_scale` [rows] beside it (None without fp8), for `linear(..., scale=)`."""
    setattr(module, name, empty_param(rows, cols, dtype=FP8 if fp8 else dtype))
    setattr(module, f"{name}_scale", empty_param(rows, dtype=torch.float32) if fp8 else None)


# Weights every `linear` call of the model reads (the embedding is a lookup and stays dense).
LINEAR_WEIGHTS = ("qkv_weight", "o_weight", "gate_up_weight", "down_weight", "lm_head_weight")
# Those `--quantization fp8` stores in FP8: the LM head stays in the model dtype (as in the published
# FP8 checkpoints, which list it as ignored).
FP8_WEIGHTS = LINEAR_WEIGHTS[:4]


def linear(
    x: torch.Tensor | FP8Rows,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """x @ weight.T + bias in out_dtype (default x's). x: [..., K], or FP8Rows for an FP8 weight (where
    `reads_fp8_rows`); weight: [N, K], dense or packed by `prepack_linear_weights`, or FP8 with its
    per-row `scale` [N] fp32 (x @ (weight * scale).T).
    Decode-sized batches on CUDA take the skinny Triton kernel, everything else cuBLAS / oneDNN (FP8:
    kernels.fp8.fp8_linear). FP8 products on CUDA are W8A8 (x quantized per row): up to SKINNY_MAX_ROWS
    rows in the skinny kernel, which multiplies e4m3 x and W natively; on an H100 (bench_fp8_linear.py,
    docs/benchmarks.md) at 1 row it takes 12.4 / 10.0 / 44.6 / 25.8 us for q/k/v, o, gate/up, down, where
    the weight-only product takes 15.8 / 11.6 / 69.1 / 34.0 and cuBLASLt W8A8 20.6 / 17.7 / 54.8 / 52.2,
    and it is the fastest of the three up to 64 rows. On CUDA a wider out_dtype comes straight from the
    fp32 accumulator: the LM head's fp32 logits without a cast kernel (on an H100 a [64, 128256] bf16 ->
    fp32 cast takes 24 us; the product with cuBLASLt writing fp32 itself takes 412 / 471 us at 128 / 256
    rows against 450 / 534 with the cast; bench_engine.py --profile, docs/benchmarks.md)."""
    if scale is not None:
        if use_w8a8_skinny(x, weight):
            return skinny_linear_w8a8(x, weight, scale, bias, out_dtype)
        return fp8_linear(x, weight, scale, bias, out_dtype)
    if weight.is_mkldnn:
        y = torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    elif use_skinny_linear(x, weight):
        return skinny_linear(x, weight, bias, out_dtype)
    elif x.is_cuda and out_dtype not in (None, x.dtype) and bias is None:
        y = torch.mm(x.reshape(-1, x.shape[-1]), weight.t(), out_dtype=out_dtype)
        return y.view(*x.shape[:-1], weight.shape[0])
    else:
        y = F.linear(x, weight, bias)
    return y if out_dtype is None else y.to(out_dtype)


def stream_norm_fuses(attn: torch.Tensor, o_weight: torch.Tensor, gate_up_weight: torch.Tensor) -> bool:
    """Whether a layer's post-attention norm lives in its products' epilogues (the norm's weight folded
    into gate/up: DecoderLayer.fold_post_attention_norm): the o product adds its output to the residual
    stream and sums the squares of the sum's rows (`skinny_linear_residual`), the gate/up product scales
    its rows by 1 / rms (`StreamNorm`). Decode steps of up to 16 sequences on the skinny kernel: in a
    Llama-3-8B layer chain on an H100 (us a step; docs/benchmarks.md, Engine) 5598 against 5663 with the
    norm kernel at 1 x 1k, 6686 against 6744 at 16 x 1k, but +171 at 64 x 1.5k (the o product leaves
    cuBLASLt there); the input norm in the down product's epilogue as well costs time at 1 x 1k (+10
    against o alone) and 64 x 1.5k (+745)."""
    return (
        attn.shape[0] <= 16 and use_skinny_linear(attn, o_weight) and use_skinny_linear(attn, gate_up_weight)
    )


def use_skinny_linear(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """A dense weight's product of half-precision CUDA x where the kernel was tuned and beats cuBLASLt
    (`skinny_beats_cublas`: decode-sized batches); fp32 keeps torch's products, so the fp32 checks
    against Hugging Face compare like with like. FP8 weights: `use_w8a8_skinny`."""
    if not x.is_cuda or x.dtype == torch.float32 or weight.dtype == FP8:
        return False
    n, k = weight.shape
    return skinny_beats_cublas(x.numel() // k, n, k)


def use_w8a8_skinny(x: torch.Tensor | FP8Rows, weight: torch.Tensor) -> bool:
    """An FP8 weight's product of half-precision CUDA x with at most SKINNY_MAX_ROWS rows: W8A8 in the
    skinny kernel (see `linear`), q/k/v with RoPE and the cache write in its epilogue."""
    return _w8a8_skinny_takes(x, weight, x.numel() // weight.shape[1])


def reads_fp8_rows(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `linear` multiplies the rows of x [T, ...] (T rows of weight's K) with weight W8A8: an FP8
    weight and half-precision CUDA x, in the skinny kernel or torch._scaled_mm. The kernel producing
    those rows then writes them quantized (FP8Rows: RMSNorm, SiLU-and-multiply), which saves the product
    its quantizer launch."""
    rows = x.shape[0]
    scaled_mm = weight.dtype == FP8 and rows > 0 and scaled_mm_fits(x, weight)
    return _w8a8_skinny_takes(x, weight, rows) or scaled_mm


def _w8a8_skinny_takes(x: torch.Tensor | FP8Rows, weight: torch.Tensor, rows: int) -> bool:
    return x.is_cuda and x.dtype != torch.float32 and weight.dtype == FP8 and 0 < rows <= SKINNY_MAX_ROWS


def cpu_has_native_bf16() -> bool:
    """oneDNN computes bf16 natively (AVX-512 BF16, AVX-NE-CONVERT or AMX): only then is bf16 the faster
    CPU dtype, and only then can bf16 weights take its blocked layout (`prepack_linear_weights`)."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def prepack_linear_weights(model: nn.Module) -> None:
    """CPU only: store every linear weight in oneDNN's blocked layout, so decode's matrix-vector products
    stop re-laying out the weights at each call. On the 2-core AVX-512 CPU the matmuls of one SmolLM2
    decode step take 13.3 ms packed against 19.0 dense in bf16, 27.6 against 44.9 in fp32, with identical
    results (bench_engine.py --device cpu, docs/benchmarks.md, docs/cpu_dtype.md). Packed weights
    can no longer be sliced or loaded into: call this after loading, for serving only. bf16 weights stay
    dense on a CPU without native bf16, where oneDNN has no bf16 layout. FP8 weights are dequantized to
    the model dtype here, once (the values the reference path computes with at every call, where the
    CPU's FP8 -> float conversion makes a SmolLM2 decode step seconds long): oneDNN has no FP8 product."""
    if not torch.backends.mkldnn.is_available():
        return
    for module in model.modules():
        for name in LINEAR_WEIGHTS:
            weight = module._parameters.get(name)
            if weight is None or weight.device.type != "cpu":
                continue
            packable = weight.dtype != torch.bfloat16 or cpu_has_native_bf16()
            if weight.dtype == FP8:
                weight = dequantize(weight, getattr(module, f"{name}_scale"), model.dtype)
                setattr(module, f"{name}_scale", None)
                packable = weight.dtype != torch.bfloat16 or cpu_has_native_bf16()
            elif not packable:
                continue  # stays the dense parameter it is
            if packable:
                # The batch-size hint only tunes the layout; any number of rows works (prefill included).
                weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)
            delattr(module, name)  # a tied lm_head is unbound here; the embedding keeps its dense weight
            module.register_buffer(name, weight, persistent=False)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = empty_param(size, dtype=dtype)
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None, fp8: bool = False
    ) -> tuple[torch.Tensor | FP8Rows, torch.Tensor]:
        """x, residual: [T, H]. Returns (normed, residual stream): without `residual`, (rms_norm(x), x);
        with it, residual += x first and x is overwritten with the norm of the sum (both in place).
        `fp8`: the normed rows come quantized for a W8A8 product (FP8Rows), x is then left as it is."""
        if residual is None:
            return (ops.rms_norm_fp8 if fp8 else ops.rms_norm)(x, self.weight, self.eps), x
        add_and_norm = ops.fused_add_rms_norm_fp8 if fp8 else ops.fused_add_rms_norm
        return add_and_norm(x, residual, self.weight, self.eps)


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """[head_dim // 2] fp32 inverse frequencies, with the config's scaling applied."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = config.rope_scaling or {}
    rope_type = scaling.get("rope_type", "default")
    if rope_type == "linear":
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":
        return _llama3_scale(inv_freq, scaling)
    return inv_freq


def _llama3_scale(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    """Llama 3.1 scaling: wavelengths longer than original_len / low_freq_factor are stretched by
    `factor`, those shorter than original_len / high_freq_factor are kept, and the band between is
    interpolated linearly in original_len / wavelength."""
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    original_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    stretched = torch.where(wavelen > original_len / low, inv_freq / factor, inv_freq)
    smooth = (original_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * stretched / factor + smooth * stretched
    in_band = (wavelen >= original_len / high) & (wavelen <= original_len / low)
    return torch.where(in_band, blended, stretched)


class RotaryEmbedding(nn.Module):
    """The cos/sin table of every position up to max_position_embeddings, one for the whole model (every
    layer's attention holds the same instance), applied to q and k together with the KV-cache write.

    The table `cos_sin` is [max_pos, 2, D] in the model dtype: [cos, cos] and [-sin, sin] over the whole
    head dim, so the torch twin rotates q and k with 3 ops; the kernel reads one half of each row."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        positions = torch.arange(config.max_position_embeddings, dtype=torch.float32)
        angles = torch.outer(positions, rope_inv_freq(config).to(positions.device))
        cos, sin = angles.cos(), angles.sin()
        table = torch.stack((torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)), dim=1)
        # Rounded to the model dtype like the reference, so bf16 runs match HF's rounding too.
        self.register_buffer("cos_sin", table.to(dtype), persistent=False)

    def fuses_with(self, x: torch.Tensor, qkv_weight: torch.Tensor) -> bool:
        """The q/k/v product of x takes the rotation and cache write into its epilogue (`project`): where
        the skinny kernel runs the product (W8A8 for an FP8 weight) and a program's rows of W are whole
        rotation pairs."""
        skinny = use_skinny_linear(x, qkv_weight) or use_w8a8_skinny(x, qkv_weight)
        return skinny and fuses_rope(x, qkv_weight, self.cos_sin.shape[-1])

    def project(
        self,
        x: torch.Tensor,
        qkv_weight: torch.Tensor,
        qkv_bias: torch.Tensor | None,
        positions: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
        qkv_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`forward` applied to linear(x, qkv_weight, qkv_bias, scale=qkv_scale), in one kernel (where
        `fuses_with`).
        Returns qkv [T, (Hq + 2 Hkv) * D], q and k rotated; k and v written to the caches. On an H100 a
        Llama-3-8B layer chain without its 32 rope_and_cache launches takes 5739 us a step at batch 1
        against 5810, 10499 at batch 64 against 10570 (docs/benchmarks.md, Engine)."""
        return skinny_linear_rope(
            x, qkv_weight, qkv_bias, positions, self.cos_sin, k_cache, v_cache, slot_mapping, scale=qkv_scale
        )

    def forward(
        self,
        qkv: torch.Tensor,
        positions: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
        k_scale: torch.Tensor | None = None,
        v_scale: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotate the q and k heads of qkv [T, (Hq + 2 Hkv) * D] in place at positions [T] int64 and write
        k and v to the caches [num_blocks, block_size, Hkv, D] at slot_mapping [T] int64 (fp8 caches:
        quantized, their scales to k_scale, v_scale [num_blocks, block_size, Hkv]). Returns views of
        qkv: q [T, Hq, D], k and v [T, Hkv, D]."""
        caches = (k_cache, v_cache, slot_mapping, k_scale, v_scale)
        return ops.rope_and_cache(qkv, positions, self.cos_sin, *caches)


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)) with gate and up fused into one [2 * I, H] matmul; with `fp8`, both
    weights in FP8 with per-row scales."""

    def __init__(
        self, hidden_size: int, intermediate_size: int, dtype: torch.dtype, fp8: bool = False
    ) -> None:
        super().__init__()
        self.intermediate_size = intermediate_size
        linear_weight(self, "gate_up_weight", 2 * intermediate_size, hidden_size, dtype, fp8)
        linear_weight(self, "down_weight", hidden_size, intermediate_size, dtype, fp8)

    def forward(self, x: torch.Tensor | FP8Rows, norm: StreamNorm | None = None) -> torch.Tensor:
        """x: [T, H] (or FP8Rows) -> [T, H]; with a `norm`, of x's RMS-normalised rows (the skinny kernel
        only, the norm's weight folded into gate/up). Decode batches of 17-64 rows on CUDA take SiLU into
        the gate/up product's epilogue (`fuses_silu`): on an H100 a Llama-3-8B layer chain at 24 / 40 / 64
        rows takes 22 / 43 / 51 us less a step than with the separate SiLU launch (docs/benchmarks.md,
        Engine). A W8A8 down projection gets its input quantized by SiLU-and-multiply."""
        gate_up_weight, gate_up_scale = self.gate_up_weight, self.gate_up_weight_scale
        if use_skinny_linear(x, gate_up_weight) and fuses_silu(x, gate_up_weight):
            act = skinny_linear_silu(x, gate_up_weight)
        elif norm is not None:
            act = ops.silu_and_mul(skinny_linear(x, gate_up_weight, norm=norm, scale=gate_up_scale))
        else:
            gate_up = linear(x, gate_up_weight, scale=gate_up_scale)
            fp8 = reads_fp8_rows(gate_up, self.down_weight)
            act = (ops.silu_and_mul_fp8 if fp8 else ops.silu_and_mul)(gate_up)
        return linear(act, self.down_weight, scale=self.down_weight_scale)
