"""Skinny matrix product for decode (Triton): y = x @ W.T (+ bias) for up to 64 rows of x.

At decode batch sizes a linear layer is a pure weight stream: each weight byte is read once and used for
a few multiply-adds. cuBLAS's choices for these shapes on an H100 leave bandwidth unused on the small
matrices (attention's output projection at 71% of the read floor; bench_skinny_linear.py,
docs/benchmarks.md) and split K with a separate reduction kernel for others. Here each program streams
BLOCK_N whole rows of W through a multi-stage pipeline and keeps the rows of x against them in one
tensor-core tile (kernels/skinny_tiles.py); no split K, no second kernel. Matrices of many such blocks
(gate/up) run on a persistent grid whose programs stream several blocks in one loop (which tile for
which shape: kernels/skinny_config.py). It takes part in programmatic dependent launch (kernels.launch),
which torch's products cannot. Its epilogue can also take the layer's next step: RoPE and the KV-cache
write, SiLU-and-multiply, or the residual add with an RMSNorm's statistics (their launchers:
kernels/skinny_fused.py; the stream's helpers: kernels/stream_norm.py). Its torch twin is
`torch.nn.functional.linear`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from leanserve.kernels.activation import silu_times
from leanserve.kernels.fp8 import FP8, FP8Rows, as_fp8_rows
from leanserve.kernels.launch import interpreted, use_pdl, wait_for_previous_kernel
from leanserve.kernels.rotary import rotate_and_store_heads
from leanserve.kernels.skinny_config import SKINNY_MAX_ROWS, SkinnyConfig, skinny_config
from leanserve.kernels.skinny_tiles import (
    dot_acc,
    load_rows,
    multiply_tile,
    scale_channels,
    scale_x_rows,
    store_block,
)
from leanserve.kernels.stream_norm import StreamNorm, add_to_stream, load_residual, load_squares, scale_rows


@triton.jit
def _skinny_linear_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    scale_ptr,  # an FP8 W's per-row scales (W_SCALED)
    x_scale_ptr,  # an e4m3 x's per-row scales (X_SCALED: W8A8)
    y_ptr,
    M,
    N,
    stride_xm,
    stride_wn,
    stride_ym,
    positions_ptr,  # from here to HEAD_DIM: the rope epilogue's (rotary.rope_and_cache's) arguments
    cos_sin_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_mapping_ptr,
    stride_pos,
    stride_sin,
    block_size,
    stride_block,
    stride_offset,
    stride_head,
    res_ptr,  # from here to eps: skinny_linear_residual's and StreamNorm's arguments
    stride_res,
    squares_ptr,
    stride_sq,
    num_squares,
    eps,
    ADD_RESIDUAL: tl.constexpr,
    SCALE_ROWS: tl.constexpr,
    SQ_BLOCK: tl.constexpr,
    ROPE: tl.constexpr,
    SILU: tl.constexpr,
    NUM_Q_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PERSISTENT: tl.constexpr,
    SWAP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    W_SCALED: tl.constexpr,
    X_SCALED: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_previous_kernel(PDL)
    K_TILES: tl.constexpr = (K + BLOCK_K - 1) // BLOCK_K
    EVEN_K: tl.constexpr = K % BLOCK_K == 0
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32) if SWAP else tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    squares = load_squares(squares_ptr, stride_sq, num_squares, offs_m, M, SQ_BLOCK, SCALE_ROWS)
    if PERSISTENT:
        _persistent_blocks(
            x_ptr, w_ptr, bias_ptr, scale_ptr, y_ptr, acc, squares, offs_m, offs_k, M, N, K, eps, stride_xm,
            stride_wn, stride_ym, K_TILES, EVEN_K, BLOCK_N, BLOCK_K, SWAP, HAS_BIAS, W_SCALED, SCALE_ROWS,
            UPCAST, DOT_PRECISION,
        )  # fmt: skip
    elif SILU:
        _silu_block(
            x_ptr, w_ptr, bias_ptr, y_ptr, offs_m, offs_k, M, N, K, stride_xm, stride_wn, stride_ym, K_TILES,
            EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K, SWAP, HAS_BIAS, UPCAST, DOT_PRECISION,
        )  # fmt: skip
    else:
        _block(
            x_ptr, w_ptr, bias_ptr, scale_ptr, x_scale_ptr, y_ptr, acc, squares, offs_m, offs_k, M, N, K, eps,
            stride_xm, stride_wn, stride_ym, positions_ptr, cos_sin_ptr, k_cache_ptr, v_cache_ptr,
            slot_mapping_ptr, stride_pos, stride_sin, block_size, stride_block, stride_offset, stride_head,
            res_ptr, stride_res, squares_ptr, stride_sq, ADD_RESIDUAL, SCALE_ROWS, ROPE, NUM_Q_HEADS,
            NUM_KV_HEADS, HEAD_DIM, K_TILES, EVEN_K, BLOCK_N, BLOCK_K, SWAP, HAS_BIAS, W_SCALED, X_SCALED,
            UPCAST, DOT_PRECISION,
        )  # fmt: skip


@triton.jit
def _persistent_blocks(
    x_ptr, w_ptr, bias_ptr, scale_ptr, y_ptr, acc, squares, offs_m, offs_k, M, N, K, eps, stride_xm,
    stride_wn, stride_ym, K_TILES: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, SWAP: tl.constexpr, HAS_BIAS: tl.constexpr, W_SCALED: tl.constexpr,
    SCALE_ROWS: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """The persistent grid: a contiguous run of blocks of W's rows in one flat loop over (block, K tile),
    so the pipeline keeps loading across block boundaries instead of filling up again for every block."""
    num_blocks = tl.cdiv(N, BLOCK_N)
    first = tl.program_id(0) * num_blocks // tl.num_programs(0)
    count = (tl.program_id(0) + 1) * num_blocks // tl.num_programs(0) - first
    for i in range(0, count * K_TILES):
        offs_n = (first + i // K_TILES) * BLOCK_N + tl.arange(0, BLOCK_N)
        k = (i % K_TILES) * BLOCK_K + offs_k
        acc = multiply_tile(x_ptr, w_ptr, acc, offs_m, offs_n, k, M, N, K, EVEN_K, stride_xm, stride_wn,
                             SWAP, UPCAST, DOT_PRECISION)  # fmt: skip
        if i % K_TILES == K_TILES - 1:
            acc = scale_channels(acc, scale_ptr, offs_n, N, SWAP, W_SCALED)
            acc = scale_rows(acc, squares, K, eps, SWAP, SCALE_ROWS)
            store_block(y_ptr, bias_ptr, acc, offs_m, offs_n, M, N, stride_ym, SWAP, HAS_BIAS)
            acc = tl.zeros_like(acc)


@triton.jit
def _silu_block(
    x_ptr, w_ptr, bias_ptr, y_ptr, offs_m, offs_k, M, N, K, stride_xm, stride_wn, stride_ym,
    K_TILES: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, SWAP: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """The SiLU epilogue's block. W is gate || up: a program multiplies BLOCK_N / 2 gate rows and the up
    rows of the same columns into two accumulators of one layout, so silu(gate) * up is elementwise in
    registers and the product itself is never stored."""
    HALF: tl.constexpr = BLOCK_N // 2
    cols = tl.program_id(0) * HALF + tl.arange(0, HALF)
    gate = tl.zeros([HALF, BLOCK_M], tl.float32) if SWAP else tl.zeros([BLOCK_M, HALF], tl.float32)
    up = tl.zeros_like(gate)
    for kt in range(0, K_TILES):
        k = kt * BLOCK_K + offs_k
        x = load_rows(x_ptr, offs_m, M, stride_xm, k, K, EVEN_K, UPCAST)
        gate = dot_acc(x, load_rows(w_ptr, cols, N, stride_wn, k, K, EVEN_K, UPCAST), gate, SWAP,
                    DOT_PRECISION)  # fmt: skip
        up = dot_acc(x, load_rows(w_ptr, cols + N // 2, N, stride_wn, k, K, EVEN_K, UPCAST), up, SWAP,
                  DOT_PRECISION)  # fmt: skip
    # Rounded as silu_and_mul reads the stored product: the two launches' bits.
    act = silu_times(gate.to(y_ptr.dtype.element_ty), up.to(y_ptr.dtype.element_ty))
    store_block(y_ptr, bias_ptr, act, offs_m, cols, M, N // 2, stride_ym, SWAP, HAS_BIAS)


@triton.jit
def _block(
    x_ptr, w_ptr, bias_ptr, scale_ptr, x_scale_ptr, y_ptr, acc, squares, offs_m, offs_k, M, N, K, eps,
    stride_xm, stride_wn, stride_ym, positions_ptr, cos_sin_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
    stride_pos, stride_sin, block_size, stride_block, stride_offset, stride_head, res_ptr, stride_res,
    squares_ptr, stride_sq, ADD_RESIDUAL: tl.constexpr, SCALE_ROWS: tl.constexpr, ROPE: tl.constexpr,
    NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, K_TILES: tl.constexpr,
    EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SWAP: tl.constexpr,
    HAS_BIAS: tl.constexpr, W_SCALED: tl.constexpr, X_SCALED: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """One program's block of W's rows, stored plainly or through the RoPE or residual epilogue."""
    if ROPE:
        # A program takes BLOCK_N / 2 rotation pairs (j, j + D/2) of one head: its first BLOCK_N / 2
        # rows of W are the pairs' first halves, the rest their second halves. Rows are still whole
        # runs of K: the K loop is unchanged.
        PAIRS: tl.constexpr = BLOCK_N // 2
        BLOCKS_PER_HEAD: tl.constexpr = HEAD_DIM // BLOCK_N
        head = tl.program_id(0) // BLOCKS_PER_HEAD
        first_pair = tl.program_id(0) % BLOCKS_PER_HEAD * PAIRS
        t = tl.arange(0, BLOCK_N)
        offs_n = head * HEAD_DIM + (t // PAIRS) * (HEAD_DIM // 2) + first_pair + t % PAIRS
    else:
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    r = load_residual(res_ptr, offs_m, offs_n, M, N, stride_res, SWAP, ADD_RESIDUAL)
    for kt in range(0, K_TILES):
        acc = multiply_tile(x_ptr, w_ptr, acc, offs_m, offs_n, kt * BLOCK_K + offs_k, M, N, K, EVEN_K,
                             stride_xm, stride_wn, SWAP, UPCAST, DOT_PRECISION)  # fmt: skip
    acc = scale_channels(acc, scale_ptr, offs_n, N, SWAP, W_SCALED)
    acc = scale_x_rows(acc, x_scale_ptr, offs_m, M, SWAP, X_SCALED)
    acc = scale_rows(acc, squares, K, eps, SWAP, SCALE_ROWS)
    if ADD_RESIDUAL:
        add_to_stream(y_ptr, acc, r, squares_ptr, stride_sq, tl.program_id(0), offs_m, offs_n, M, N,
                       stride_ym, SWAP)  # fmt: skip
    else:
        store_block(y_ptr, bias_ptr, acc, offs_m, offs_n, M, N, stride_ym, SWAP, HAS_BIAS)
    if ROPE:
        # Rotate the pairs where the product has just stored them, as rope_and_cache does (same
        # rounding), and write k and v to the caches. The barrier makes the program's stores visible
        # to all its threads; reading the tile back in a plain layout avoids reshaping the MMA's.
        tl.debug_barrier()
        rotate_and_store_heads(head, first_pair + tl.arange(0, PAIRS), offs_m, M, y_ptr, stride_ym,
                               positions_ptr, cos_sin_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
                               stride_pos, stride_sin, block_size, stride_block, stride_offset,
                               stride_head, NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM)  # fmt: skip


# The plain product passes nothing to the epilogues (ROPE=False and SILU=False compile none of them).
_NO_EPILOGUE = dict(
    positions_ptr=None, cos_sin_ptr=None, k_cache_ptr=None, v_cache_ptr=None, slot_mapping_ptr=None,
    stride_pos=0, stride_sin=0, block_size=0, stride_block=0, stride_offset=0, stride_head=0,
    NUM_Q_HEADS=0, NUM_KV_HEADS=0, HEAD_DIM=0, ROPE=False, SILU=False,
)  # fmt: skip
# Nor to the residual stream's epilogue or the norm's scaling (ADD_RESIDUAL=False, SCALE_ROWS=False).
_NO_STREAM = dict(
    res_ptr=None, stride_res=0, squares_ptr=None, stride_sq=0, num_squares=0, eps=0.0, ADD_RESIDUAL=False,
    SCALE_ROWS=False, SQ_BLOCK=1,
)  # fmt: skip


def launch_skinny(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    y: torch.Tensor,
    config: SkinnyConfig,
    epilogue: dict | None = None,
    norm: StreamNorm | None = None,
    scale: torch.Tensor | None = None,
    x_scale: torch.Tensor | None = None,
) -> None:
    """y = x @ weight.T (+ bias) for x: [rows >= 1, K] of unit column stride, y: [rows, N], its rows
    scaled by x's 1 / rms with a `norm`, its columns by an FP8 weight's `scale` [N]; then the `epilogue`
    (its arguments: skinny_linear_rope's, skinny_linear_silu's, skinny_linear_residual's)."""
    pdl = use_pdl(x.device)
    _skinny_linear_kernel[(config.programs or triton.cdiv(weight.shape[0], config.block_n),)](
        x,
        weight,
        bias,
        scale,
        x_scale,
        y,
        x.shape[0],
        weight.shape[0],
        x.stride(0),
        weight.stride(0),
        y.stride(0),
        **{**_NO_EPILOGUE, **_NO_STREAM, **(epilogue or {}), **_norm_arguments(x, norm)},
        K=weight.shape[1],
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        PERSISTENT=config.programs is not None,
        SWAP=config.swap,
        HAS_BIAS=bias is not None,
        W_SCALED=scale is not None,
        X_SCALED=x_scale is not None,
        UPCAST=interpreted(),
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        PDL=pdl,
        num_stages=config.num_stages,
        num_warps=config.num_warps,
        launch_pdl=pdl,
    )


def _norm_arguments(x: torch.Tensor, norm: StreamNorm | None) -> dict:
    """The kernel's StreamNorm arguments, checked (ValueError)."""
    if norm is None:
        return {}
    squares = norm.squares
    if squares.dim() != 2 or squares.shape[1] != x.shape[0] or squares.dtype != torch.float32:
        raise ValueError(
            f"the norm's squares must be [blocks, {x.shape[0]}] float32, got {tuple(squares.shape)}"
        )
    if squares.stride(1) != 1 or squares.device != x.device:
        raise ValueError("the norm's squares must have unit column stride and live on x's device")
    return dict(
        squares_ptr=squares, stride_sq=squares.stride(0), num_squares=squares.shape[0], eps=norm.eps,
        SCALE_ROWS=True, SQ_BLOCK=triton.next_power_of_2(squares.shape[0]),
    )  # fmt: skip


def rows_of(x: torch.Tensor) -> torch.Tensor:
    """x as a [rows, K] matrix of unit column stride (a view where it can be)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def skinny_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    norm: StreamNorm | None = None,
    scale: torch.Tensor | None = None,
    x_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """x @ weight.T + bias for x: [..., K] with at most SKINNY_MAX_ROWS rows in all (any leading shape),
    weight: [N, K] contiguous, bias: [N] or None, all one dtype (fp16, bf16 or fp32) on one device; or
    weight in FP8 (e4m3) with its per-row `scale` [N] fp32 (x @ (weight * scale[:, None]).T).
    Returns [..., N] in out_dtype (default: x's dtype), accumulated in fp32 and rounded once; with a
    `norm`, that of x's RMS-normalised rows. W8A8: x in e4m3 with its per-row `x_scale` [rows] fp32
    (kernels.fp8.quantize_rows_fused) and an FP8 weight with its `scale`; out_dtype is then required. No
    host synchronisation (CUDA-graph safe)."""
    check_product(x, weight, bias, scale, x_scale)
    if x_scale is not None and out_dtype is None:
        raise ValueError("a W8A8 product (e4m3 x) needs an out_dtype")
    x2 = rows_of(x)
    y = torch.empty(x2.shape[0], weight.shape[0], dtype=out_dtype or x.dtype, device=x.device)
    if x2.shape[0]:
        config = skinny_config(x2.shape[0], *weight.shape, x.element_size(), weight.element_size(), x.device)
        launch_skinny(x2, weight, bias, y, config, norm=norm, scale=scale, x_scale=x_scale)
    return y.view(*x.shape[:-1], weight.shape[0])


def skinny_linear_w8a8(
    x: torch.Tensor | FP8Rows,
    weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The W8A8 decode product of half-precision x [..., K] (at most SKINNY_MAX_ROWS rows) and an FP8
    weight with its `scale`: x quantized per row (kernels.fp8.quantize_activations; FP8Rows come
    quantized by their producer), then skinny_linear on e4m3 x. Returns [..., N] in out_dtype (default
    x's)."""
    rows = as_fp8_rows(x, weight.shape[1])
    y = skinny_linear(rows.values, weight, bias, out_dtype or x.dtype, scale=scale, x_scale=rows.scales)
    return y.view(*x.shape[:-1], weight.shape[0])


reference_skinny_linear = F.linear  # the torch twin: same arguments, same result up to rounding


def check_product(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    scale: torch.Tensor | None = None,
    x_scale: torch.Tensor | None = None,
) -> None:
    """ValueError unless x, weight, bias and the scales are what the skinny product takes (see
    skinny_linear)."""
    if weight.dim() != 2 or not weight.is_contiguous():
        raise ValueError(f"weight must be a contiguous [N, K] matrix, got shape {tuple(weight.shape)}")
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x must be [..., {weight.shape[1]}] to match weight, got {tuple(x.shape)}")
    if x.numel() // max(x.shape[-1], 1) > SKINNY_MAX_ROWS:
        raise ValueError(f"at most {SKINNY_MAX_ROWS} rows of x, got {x.numel() // x.shape[-1]}")
    rows = x.numel() // max(x.shape[-1], 1)
    if x_scale is not None:
        if x.dtype != FP8 or scale is None:
            raise ValueError(f"x_scale is for an e4m3 x (W8A8) with a scaled FP8 weight, got x {x.dtype}")
        if x_scale.shape != (rows,) or x_scale.dtype != torch.float32 or not x_scale.is_contiguous():
            raise ValueError(
                f"x_scale must be a contiguous float32 [{rows}], got {x_scale.dtype} {tuple(x_scale.shape)}"
            )
    elif x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"x must be fp16, bf16 or fp32 (or e4m3 with an x_scale), got {x.dtype}")
    if scale is None and weight.dtype != x.dtype:
        raise ValueError(f"x and weight must share a dtype (or weight be FP8 with a scale), got {x.dtype}, "
                         f"{weight.dtype}")  # fmt: skip
    if scale is not None and (
        weight.dtype != torch.float8_e4m3fn
        or scale.shape != (weight.shape[0],)
        or scale.dtype != torch.float32
        or not scale.is_contiguous()
        or scale.device != weight.device
    ):
        raise ValueError(
            f"a scaled weight is float8_e4m3fn with a contiguous [{weight.shape[0]}] float32 scale on its "
            f"device, got {weight.dtype} and {scale.dtype} {tuple(scale.shape)}"
        )
    bias_dtypes = (torch.float16, torch.bfloat16, torch.float32) if x_scale is not None else (x.dtype,)
    if bias is not None and (
        bias.shape != (weight.shape[0],) or bias.dtype not in bias_dtypes or not bias.is_contiguous()
    ):
        raise ValueError(f"bias must be a contiguous [{weight.shape[0]}] vector of x's dtype")
    if len({x.device, weight.device} | ({bias.device} if bias is not None else set())) != 1:
        raise ValueError("x, weight and bias must be on one device")
