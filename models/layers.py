"""Building blocks shared by the Llama-family layers: RMSNorm, rotary embeddings (plain, linear and
Llama-3 scaled) and the fused gated (SwiGLU) MLP. Weights are created empty; the loader fills them."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.config import ModelConfig


def empty_param(*shape: int, dtype: torch.dtype) -> nn.Parameter:
    """An uninitialised frozen parameter on the current default device (the loader fills it)."""
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


# Weights every `linear` call of the model reads (the embedding is a lookup and stays dense).
LINEAR_WEIGHTS = ("qkv_weight", "o_weight", "gate_up_weight", "down_weight", "lm_head_weight")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T + bias. x: [..., K]; weight: [N, K], dense or packed by `prepack_linear_weights`."""
    if weight.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def prepack_linear_weights(model: nn.Module) -> None:
    """CPU only: store every linear weight in oneDNN's blocked layout, so decode's matrix-vector products
    stop re-laying out the weights at each call. Measured on the 2-core AVX-512 CPU for the matmuls of one
    SmolLM2 decode step: bf16 19.0 -> 13.3 ms, fp32 44.9 -> 27.6 ms, identical results. Packed weights
    can no longer be sliced or loaded into: call this after loading, for serving only."""
    if not torch.backends.mkldnn.is_available():
        return
    for module in model.modules():
        for name in LINEAR_WEIGHTS:
            weight = module._parameters.get(name)
            if weight is None or weight.device.type != "cpu":
                continue
            # The batch-size hint only tunes the layout; any number of rows works (prefill included).
            packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)
            delattr(module, name)  # a tied lm_head is unbound here; the embedding keeps its dense weight
            module.register_buffer(name, packed, persistent=False)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """x: [..., D]; weight: [D] or None. One fused kernel on CUDA; statistics in fp32 for every dtype."""
    return F.rms_norm(x, x.shape[-1:], weight, eps)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = empty_param(size, dtype=dtype)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


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
    """cos/sin tables for every position up to max_position_embeddings, looked up once per forward
    (an index_select: no host sync, capturable) and applied to q and k of every layer. The tables are
    stored as [cos, cos] and [-sin, sin] over the whole head dim so that rotating costs 3 kernels."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        positions = torch.arange(config.max_position_embeddings, dtype=torch.float32)
        angles = torch.outer(positions, rope_inv_freq(config).to(positions.device))
        cos, sin = angles.cos(), angles.sin()
        # Rounded to the model dtype like the reference, so bf16 runs match HF's rounding too.
        self.register_buffer("cos", torch.cat((cos, cos), dim=-1).to(dtype), persistent=False)
        self.register_buffer("sin", torch.cat((-sin, sin), dim=-1).to(dtype), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [T] int64 -> (cos, sin), each [T, 1, head_dim] (broadcast over heads)."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, H, D] (halves layout, as in HF Llama); cos, sin: [T, 1, D] from RotaryEmbedding.
    Returns x * cos + rotate_half(x) * sin as a new contiguous [T, H, D]."""
    half = x.shape[-1] // 2
    swapped = torch.cat((x[..., half:], x[..., :half]), dim=-1)
    return torch.addcmul(x * cos, swapped, sin)


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)) with gate and up fused into one [2 * I, H] matmul."""

    def __init__(self, hidden_size: int, intermediate_size: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.intermediate_size = intermediate_size
        self.gate_up_weight = empty_param(2 * intermediate_size, hidden_size, dtype=dtype)
        self.down_weight = empty_param(hidden_size, intermediate_size, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, H] -> [T, H]"""
        gate, up = linear(x, self.gate_up_weight).split(self.intermediate_size, dim=-1)
        return linear(F.silu(gate) * up, self.down_weight)
