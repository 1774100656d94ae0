"""The skinny decode product with work of the layer taken into its epilogue (one launch instead of two):
the q/k/v projection with RoPE and the KV-cache write (`skinny_linear_rope`), the gate/up projection with
SiLU-and-multiply (`skinny_linear_silu`), and a projection whose output joins the residual stream with
the add and the next RMSNorm's statistics (`skinny_linear_residual`, read back through `StreamNorm`).
Each says where it applies (`fuses_*`); the kernel itself is kernels/skinny_linear.py's."""

from __future__ import annotations

import torch
import triton

from leanserve.kernels.fp8 import FP8, FP8Rows, as_fp8_rows
from leanserve.kernels.kv_quant import is_fp8
from leanserve.kernels.rotary import check_rope_inputs, slot_strides
from leanserve.kernels.skinny_config import SKINNY_MAX_ROWS, SkinnyConfig, skinny_config
from leanserve.kernels.skinny_linear import check_product, launch_skinny, rows_of


def fuses_rope(x: torch.Tensor | FP8Rows, weight: torch.Tensor, head_dim: int) -> bool:
    """Whether skinny_linear_rope takes the product of x [..., K] and weight [N, K] with heads of head_dim:
    at most SKINNY_MAX_ROWS rows, whole heads, and a tile (one program per block, `persistent=False`) of
    whole rotation pairs of one head: BLOCK_N / 2 divides D / 2, i.e. D a multiple of 32 up to 16 rows
    (tiles of 32 rows of W), of 64 or of 128 past that (64 or 128 rows of W, by skinny_config); an FP8
    weight (W8A8: 64 rows of W) needs D a multiple of 64."""
    return _rope_config(x, weight, head_dim) is not None


def _rope_config(x: torch.Tensor | FP8Rows, weight: torch.Tensor, head_dim: int) -> SkinnyConfig | None:
    """The tile skinny_linear_rope runs, or None where it cannot (see fuses_rope)."""
    n, k = weight.shape
    rows = x.numel() // max(k, 1)
    if rows > SKINNY_MAX_ROWS or head_dim <= 0 or head_dim % 2 or n % head_dim:
        return None
    # An FP8 weight's product runs W8A8: on x quantized to e4m3, one byte an element.
    x_itemsize = 1 if weight.dtype == FP8 else x.element_size()
    config = skinny_config(rows, n, k, x_itemsize, weight.element_size(), x.device, persistent=False)
    return config if head_dim % config.block_n == 0 else None


def skinny_linear_rope(
    x: torch.Tensor | FP8Rows,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    positions: torch.Tensor,
    cos_sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """The q/k/v projection of a decode step with `rope_and_cache` in its epilogue, in one launch: the
    effects of rope_and_cache(skinny_linear(x, weight, bias), positions, cos_sin, k_cache,
    v_cache, slot_mapping), where fuses_rope(x, weight, D) (ValueError elsewhere).

    x: [T, K]; weight: [(Hq + 2 Hkv) * D, K] contiguous; bias: [N] or None; the rest as rope_and_cache
    takes them (caches [num_blocks, block_size, Hkv, D]), all one dtype. Returns qkv [T, N] in that dtype,
    q and k rotated, in the projection's column layout; k and v are written to the caches at slot_mapping.
    Each program rotates what it has just stored, as rope_and_cache reads it: the same bits as the two
    launches where skinny_linear runs the same grid. An FP8 weight comes with its per-row `scale` [N]
    fp32 and runs W8A8, as models.layers.linear runs FP8 decode products: x is quantized per row
    (kernels.fp8.quantize_activations, or comes as FP8Rows from its producer) and the kernel multiplies
    e4m3 x and W; qkv keeps x's dtype. No host synchronisation."""
    x_rows = x.values if isinstance(x, FP8Rows) else x
    check_product(x_rows, weight, bias, scale, x.scales if isinstance(x, FP8Rows) else None)
    if x_rows.dim() != 2:
        raise ValueError(f"x must be [T, K], got {tuple(x.shape)}")
    if is_fp8(k_cache):
        # An fp8 row's scale is the amax of the whole head; a program holds BLOCK_N / 2 of its pairs.
        raise ValueError("the fused epilogue writes unquantized caches only; fp8 caches take rope_and_cache")
    n = weight.shape[0]
    qkv = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    check_rope_inputs(qkv, positions, cos_sin, k_cache, v_cache, slot_mapping)
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    config = _rope_config(x, weight, head_dim)
    if config is None:
        raise ValueError(
            f"no fused rope for {x.shape[0]} rows, N={n}, D={head_dim}: a program's rows of W must be whole "
            "rotation pairs of one head (see fuses_rope)"
        )
    if x.shape[0]:
        rope = {
            "positions_ptr": positions,
            "cos_sin_ptr": cos_sin,
            "k_cache_ptr": k_cache,
            "v_cache_ptr": v_cache,
            "slot_mapping_ptr": slot_mapping,
            "stride_pos": cos_sin.stride(0),
            "stride_sin": cos_sin.stride(1),
            "block_size": k_cache.shape[1],
            **slot_strides(k_cache),
            "NUM_Q_HEADS": n // head_dim - 2 * num_kv_heads,
            "NUM_KV_HEADS": num_kv_heads,
            "HEAD_DIM": head_dim,
            "ROPE": True,
        }
        if scale is None:
            launch_skinny(rows_of(x), weight, bias, qkv, config, rope)
        else:
            rows = as_fp8_rows(x, weight.shape[1])
            launch_skinny(rows.values, weight, bias, qkv, config, rope, scale=scale, x_scale=rows.scales)
    return qkv


def fuses_silu(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether skinny_linear_silu takes the gate/up product of x [..., K] and weight [2I, K]: 17 to
    SKINNY_MAX_ROWS rows (up to 16 the persistent grid streams gate/up faster, and the fused SiLU is
    slower at 1 and 8 rows in a Llama-3-8B layer chain: docs/benchmarks.md, Engine) and a tile of
    BLOCK_N / 2 columns that divides I."""
    return _silu_config(x, weight) is not None


def _silu_config(x: torch.Tensor, weight: torch.Tensor) -> SkinnyConfig | None:
    """The tile skinny_linear_silu runs, or None where it cannot (see fuses_silu)."""
    n, k = weight.shape
    rows = x.numel() // max(k, 1)
    if not 16 < rows <= SKINNY_MAX_ROWS or n % 2:
        return None
    config = skinny_config(rows, n, k, x.element_size(), weight.element_size(), x.device, persistent=False)
    return config if (n // 2) % (config.block_n // 2) == 0 else None


def skinny_linear_silu(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The gate/up product of a gated MLP with SiLU-and-multiply in its epilogue, in one launch:
    silu_and_mul(skinny_linear(x, weight)) with the same bits, where fuses_silu(x, weight)
    (ValueError elsewhere). x: [T, K]; weight: [2I, K] contiguous in x's dtype, gate rows first.
    Returns [T, I]; the [T, 2I] product itself never reaches memory. No host synchronisation."""
    check_product(x, weight, None)
    config = _silu_config(x, weight)
    if x.dim() != 2 or config is None:
        raise ValueError(
            f"no fused SiLU for x {tuple(x.shape)} and W {tuple(weight.shape)}: 17-{SKINNY_MAX_ROWS} rows "
            "of [T, K] and a tile that divides I (see fuses_silu)"
        )
    act = torch.empty(x.shape[0], weight.shape[0] // 2, dtype=x.dtype, device=x.device)
    launch_skinny(rows_of(x), weight, None, act, config, {"SILU": True})
    return act


def skinny_linear_residual(
    x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor, scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A product whose output joins the residual stream (the model uses it for attention's output
    projection), with the stream's addition and the next norm's statistics in its epilogue: returns
    (stream, squares), stream = residual + x @ weight.T rounded as `fused_add_rms_norm` rounds the
    stream, and squares the partial sums of its rows' squares, for the next product's StreamNorm (which
    then stands for that norm kernel). x: [T, K] with at most SKINNY_MAX_ROWS rows; weight: [N, K]
    contiguous (or FP8 with its `scale` [N]); residual: [T, N] of unit column stride in x's dtype. No
    host synchronisation."""
    check_product(x, weight, None, scale)
    if x.dim() != 2 or residual.shape != (x.shape[0], weight.shape[0]) or residual.stride(1) != 1:
        raise ValueError(f"x must be [T, K] and residual [T, {weight.shape[0]}], got {tuple(x.shape)}, "
                         f"{tuple(residual.shape)}")  # fmt: skip
    if residual.dtype != x.dtype or residual.device != x.device:
        raise ValueError("residual must share x's dtype and device")
    config = skinny_config(
        x.shape[0], *weight.shape, x.element_size(), weight.element_size(), x.device, persistent=False
    )
    stream = torch.empty_like(residual, memory_format=torch.contiguous_format)
    squares = torch.empty(triton.cdiv(weight.shape[0], config.block_n), x.shape[0], dtype=torch.float32,
                          device=x.device)  # fmt: skip
    if x.shape[0]:
        epilogue = {"res_ptr": residual, "stride_res": residual.stride(0), "squares_ptr": squares,
                    "stride_sq": squares.stride(0), "ADD_RESIDUAL": True}  # fmt: skip
        launch_skinny(rows_of(x), weight, None, stream, config, epilogue, scale=scale)
    return stream, squares
