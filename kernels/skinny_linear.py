"""Skinny matrix product for decode (Triton): y = x @ W.T (+ bias) for up to 64 rows of x.

At decode batch sizes a linear layer is a pure weight stream: each weight byte is read once and used for
a few multiply-adds. cuBLAS's choices for these shapes on an H100 leave bandwidth unused on the small
matrices (attention's output projection at 71% of the read floor) and split K with a separate reduction
kernel for others. Here each program streams BLOCK_N whole rows of W through a multi-stage pipeline and
keeps the rows of x against them in one tensor-core tile; no split K, no second kernel. Matrices of many
such blocks (gate/up) run on a persistent grid whose programs stream several blocks in one loop (which
tile for which shape: kernels/skinny_config.py). It takes part in programmatic dependent launch
(kernels.launch), which torch's products cannot. For the q/k/v projection it can also rotate q and k
and write k and v to the KV cache in its epilogue (`skinny_linear_rope`), saving the rope_and_cache
launch. Its torch twins: `torch.nn.functional.linear`, then `reference_rope_and_cache`."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.activation import silu_times
from kernels.launch import interpreted, use_pdl, wait_for_previous_kernel
from kernels.rotary import check_rope_inputs, rotate_and_store_heads
from kernels.skinny_config import SKINNY_MAX_ROWS, SkinnyConfig, skinny_config


@triton.jit
def _load_rows(ptr, rows, num_rows, stride, k, K, EVEN_K: tl.constexpr, UPCAST: tl.constexpr):
    """The [len(rows), len(k)] tile of a row-major matrix (zeros past num_rows and K)."""
    mask = rows[:, None] < num_rows
    if not EVEN_K:
        mask = mask & (k[None, :] < K)
    tile = tl.load(ptr + rows[:, None].to(tl.int64) * stride + k[None, :], mask=mask, other=0.0)
    return tile.to(tl.float32) if UPCAST else tile


@triton.jit
def _dot(x, w, acc, SWAP: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc + x @ w.T, or with SWAP its transpose: the tile is y.T's, W's rows fill the MMA's M side."""
    if SWAP:
        acc = tl.dot(w, tl.trans(x), acc, input_precision=DOT_PRECISION)
    else:
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
    return acc


@dataclass(frozen=True)
class StreamNorm:
    """The RMSNorm of a product's x, where x is a residual stream that `skinny_linear_residual` wrote and
    summed the squares of (`squares`: [blocks, rows] fp32, one row of partial sums per block of that
    product's W): the product scales its fp32 rows by rsqrt(mean square + eps), which is the product of
    the normalised x. The norm's weight is not applied: fold it into W's columns (W * weight). Against
    the norm kernel (`kernels.rms_norm`) one rounding differs: it rounds the normalised x to the dtype
    before the product."""

    squares: torch.Tensor
    eps: float


@triton.jit
def _load_squares(
    squares_ptr, stride_sq, num_squares, offs_m, M, SQ_BLOCK: tl.constexpr, SCALE_ROWS: tl.constexpr
):
    """With SCALE_ROWS, the partial sums of squares of x's rows as [SQ_BLOCK, BLOCK_M] (zeros past them):
    loaded at the start, summed after the K loop (`_scale_rows`), so the loads' latency hides behind it."""
    squares = 0.0
    if SCALE_ROWS:
        p = tl.arange(0, SQ_BLOCK)
        mask = (p[:, None] < num_squares) & (offs_m[None, :] < M)
        squares = tl.load(squares_ptr + p[:, None] * stride_sq + offs_m[None, :], mask=mask, other=0.0)
    return squares


@triton.jit
def _scale_rows(acc, squares, K, eps, SWAP: tl.constexpr, SCALE_ROWS: tl.constexpr):
    """With SCALE_ROWS, the product's rows times 1 / rms of x's rows."""
    if SCALE_ROWS:
        rstd = tl.rsqrt(tl.sum(squares, axis=0) / K + eps)
        acc = acc * rstd[None, :] if SWAP else acc * rstd[:, None]
    return acc


@triton.jit
def _load_residual(res_ptr, offs_m, offs_n, M, N, stride_res, SWAP: tl.constexpr, ADD_RESIDUAL: tl.constexpr):
    """With ADD_RESIDUAL, the residual's tile in the accumulator's orientation (loaded at the start)."""
    r = 0.0
    if ADD_RESIDUAL:
        if SWAP:
            mask = (offs_n[:, None] < N) & (offs_m[None, :] < M)
            r = tl.load(res_ptr + offs_m[None, :] * stride_res + offs_n[:, None], mask=mask, other=0.0)
        else:
            mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
            r = tl.load(res_ptr + offs_m[:, None] * stride_res + offs_n[None, :], mask=mask, other=0.0)
    return r


@triton.jit
def _add_to_stream(
    y_ptr, acc, r, squares_ptr, stride_sq, block, offs_m, offs_n, M, N, stride_ym, SWAP: tl.constexpr
):
    """y = residual + product, rounded as the norm kernel rounds the stream (the product to the dtype,
    then the sum), and this block's sums of squares of y's rows into row `block` of the squares."""
    dtype = y_ptr.dtype.element_ty
    h = (acc.to(dtype).to(tl.float32) + r.to(tl.float32)).to(dtype)
    hf = h.to(tl.float32)
    if SWAP:
        mask = (offs_n[:, None] < N) & (offs_m[None, :] < M)
        tl.store(y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None], h, mask=mask)
        sums = tl.sum(tl.where(mask, hf * hf, 0.0), axis=0)
    else:
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], h, mask=mask)
        sums = tl.sum(tl.where(mask, hf * hf, 0.0), axis=1)
    tl.store(squares_ptr + block * stride_sq + offs_m, sums, mask=offs_m < M)


@triton.jit
def _multiply_tile(
    x_ptr, w_ptr, acc, offs_m, offs_n, k, M, N, K, EVEN_K: tl.constexpr, stride_xm, stride_wn,
    SWAP: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """acc + the product of x's rows and W's rows offs_n over the columns k (one K tile)."""
    x = _load_rows(x_ptr, offs_m, M, stride_xm, k, K, EVEN_K, UPCAST)
    w = _load_rows(w_ptr, offs_n, N, stride_wn, k, K, EVEN_K, UPCAST)
    return _dot(x, w, acc, SWAP, DOT_PRECISION)


@triton.jit
def _store_block(
    y_ptr, bias_ptr, acc, offs_m, offs_n, M, N, stride_ym, SWAP: tl.constexpr, HAS_BIAS: tl.constexpr
):
    """y[offs_m, offs_n] = acc (+ bias), in y's dtype."""
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
    if SWAP:
        if HAS_BIAS:
            acc += bias[:, None]
        y_ptrs = y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(offs_m[None, :] < M) & (offs_n[:, None] < N))
    else:
        if HAS_BIAS:
            acc += bias[None, :]
        y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def _skinny_linear_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
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
    stride_slot,
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
    squares = _load_squares(squares_ptr, stride_sq, num_squares, offs_m, M, SQ_BLOCK, SCALE_ROWS)
    if PERSISTENT:
        # A contiguous run of blocks of W's rows in one flat loop over (block, K tile): the pipeline keeps
        # loading across block boundaries instead of filling up again for every block.
        num_blocks = tl.cdiv(N, BLOCK_N)
        first = tl.program_id(0) * num_blocks // tl.num_programs(0)
        count = (tl.program_id(0) + 1) * num_blocks // tl.num_programs(0) - first
        for i in range(0, count * K_TILES):
            offs_n = (first + i // K_TILES) * BLOCK_N + tl.arange(0, BLOCK_N)
            k = (i % K_TILES) * BLOCK_K + offs_k
            acc = _multiply_tile(x_ptr, w_ptr, acc, offs_m, offs_n, k, M, N, K, EVEN_K, stride_xm, stride_wn,
                                 SWAP, UPCAST, DOT_PRECISION)  # fmt: skip
            if i % K_TILES == K_TILES - 1:
                acc = _scale_rows(acc, squares, K, eps, SWAP, SCALE_ROWS)
                _store_block(y_ptr, bias_ptr, acc, offs_m, offs_n, M, N, stride_ym, SWAP, HAS_BIAS)
                acc = tl.zeros_like(acc)
    elif SILU:
        # W is gate || up: a program multiplies BLOCK_N / 2 gate rows and the up rows of the same
        # columns into two accumulators of one layout, so silu(gate) * up is elementwise in registers
        # and the product itself is never stored.
        HALF: tl.constexpr = BLOCK_N // 2
        cols = tl.program_id(0) * HALF + tl.arange(0, HALF)
        gate = tl.zeros([HALF, BLOCK_M], tl.float32) if SWAP else tl.zeros([BLOCK_M, HALF], tl.float32)
        up = tl.zeros_like(gate)
        for kt in range(0, K_TILES):
            k = kt * BLOCK_K + offs_k
            x = _load_rows(x_ptr, offs_m, M, stride_xm, k, K, EVEN_K, UPCAST)
            gate = _dot(x, _load_rows(w_ptr, cols, N, stride_wn, k, K, EVEN_K, UPCAST), gate, SWAP,
                        DOT_PRECISION)  # fmt: skip
            up = _dot(x, _load_rows(w_ptr, cols + N // 2, N, stride_wn, k, K, EVEN_K, UPCAST), up, SWAP,
                      DOT_PRECISION)  # fmt: skip
        gate = _scale_rows(gate, squares, K, eps, SWAP, SCALE_ROWS)
        up = _scale_rows(up, squares, K, eps, SWAP, SCALE_ROWS)
        # Rounded as silu_and_mul reads the stored product: the two launches' bits.
        act = silu_times(gate.to(y_ptr.dtype.element_ty), up.to(y_ptr.dtype.element_ty))
        _store_block(y_ptr, bias_ptr, act, offs_m, cols, M, N // 2, stride_ym, SWAP, HAS_BIAS)
    else:
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
        r = _load_residual(res_ptr, offs_m, offs_n, M, N, stride_res, SWAP, ADD_RESIDUAL)
        for kt in range(0, K_TILES):
            acc = _multiply_tile(x_ptr, w_ptr, acc, offs_m, offs_n, kt * BLOCK_K + offs_k, M, N, K, EVEN_K,
                                 stride_xm, stride_wn, SWAP, UPCAST, DOT_PRECISION)  # fmt: skip
        acc = _scale_rows(acc, squares, K, eps, SWAP, SCALE_ROWS)
        if ADD_RESIDUAL:
            _add_to_stream(y_ptr, acc, r, squares_ptr, stride_sq, tl.program_id(0), offs_m, offs_n, M, N,
                           stride_ym, SWAP)  # fmt: skip
        else:
            _store_block(y_ptr, bias_ptr, acc, offs_m, offs_n, M, N, stride_ym, SWAP, HAS_BIAS)
        if ROPE:
            # Rotate the pairs where the product has just stored them, as rope_and_cache does (same
            # rounding), and write k and v to the caches. The barrier makes the program's stores visible
            # to all its threads; reading the tile back in a plain layout avoids reshaping the MMA's.
            tl.debug_barrier()
            rotate_and_store_heads(head, first_pair + tl.arange(0, PAIRS), offs_m, M, y_ptr, stride_ym,
                                   positions_ptr, cos_sin_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
                                   stride_pos, stride_sin, stride_slot, stride_head, NUM_Q_HEADS,
                                   NUM_KV_HEADS, HEAD_DIM)  # fmt: skip


# The plain product passes nothing to the epilogues (ROPE=False and SILU=False compile none of them).
_NO_EPILOGUE = dict(
    positions_ptr=None, cos_sin_ptr=None, k_cache_ptr=None, v_cache_ptr=None, slot_mapping_ptr=None,
    stride_pos=0, stride_sin=0, stride_slot=0, stride_head=0, NUM_Q_HEADS=0, NUM_KV_HEADS=0, HEAD_DIM=0,
    ROPE=False, SILU=False,
)  # fmt: skip
# Nor to the residual stream's epilogue or the norm's scaling (ADD_RESIDUAL=False, SCALE_ROWS=False).
_NO_STREAM = dict(
    res_ptr=None, stride_res=0, squares_ptr=None, stride_sq=0, num_squares=0, eps=0.0, ADD_RESIDUAL=False,
    SCALE_ROWS=False, SQ_BLOCK=1,
)  # fmt: skip


def _launch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    y: torch.Tensor,
    config: SkinnyConfig,
    epilogue: dict | None = None,
    norm: StreamNorm | None = None,
) -> None:
    """y = x @ weight.T (+ bias) for x: [rows >= 1, K] of unit column stride, y: [rows, N], its rows
    scaled by x's 1 / rms with a `norm`; then the `epilogue` (its arguments: skinny_linear_rope's,
    skinny_linear_silu's, skinny_linear_residual's)."""
    pdl = use_pdl(x.device)
    _skinny_linear_kernel[(config.programs or triton.cdiv(weight.shape[0], config.block_n),)](
        x,
        weight,
        bias,
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


def _rows_of(x: torch.Tensor) -> torch.Tensor:
    """x as a [rows, K] matrix of unit column stride (a view where it can be)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def skinny_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    norm: StreamNorm | None = None,
) -> torch.Tensor:
    """x @ weight.T + bias for x: [..., K] with at most SKINNY_MAX_ROWS rows in all (any leading shape),
    weight: [N, K] contiguous, bias: [N] or None, all one dtype (fp16, bf16 or fp32) on one device.
    Returns [..., N] in out_dtype (default: that dtype), accumulated in fp32 and rounded once; with a
    `norm`, that of x's RMS-normalised rows. No host synchronisation (CUDA-graph safe)."""
    _validate(x, weight, bias)
    x2 = _rows_of(x)
    y = torch.empty(x2.shape[0], weight.shape[0], dtype=out_dtype or x.dtype, device=x.device)
    if x2.shape[0]:
        config = skinny_config(x2.shape[0], *weight.shape, x.element_size(), x.device)
        _launch(x2, weight, bias, y, config, norm=norm)
    return y.view(*x.shape[:-1], weight.shape[0])


def fuses_rope(x: torch.Tensor, weight: torch.Tensor, head_dim: int) -> bool:
    """Whether skinny_linear_rope takes the product of x [..., K] and weight [N, K] with heads of head_dim:
    at most SKINNY_MAX_ROWS rows, whole heads, and a tile (one program per block, `persistent=False`) of
    whole rotation pairs of one head: BLOCK_N / 2 divides D / 2, i.e. D a multiple of 32 up to 16 rows
    (tiles of 32 rows of W), of 64 or of 128 past that (64 or 128 rows of W, by skinny_config)."""
    return _rope_config(x, weight, head_dim) is not None


def _rope_config(x: torch.Tensor, weight: torch.Tensor, head_dim: int) -> SkinnyConfig | None:
    """The tile skinny_linear_rope runs, or None where it cannot (see fuses_rope)."""
    n, k = weight.shape
    rows = x.numel() // max(k, 1)
    if rows > SKINNY_MAX_ROWS or head_dim <= 0 or head_dim % 2 or n % head_dim:
        return None
    config = skinny_config(rows, n, k, x.element_size(), x.device, persistent=False)
    return config if head_dim % config.block_n == 0 else None


def skinny_linear_rope(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    positions: torch.Tensor,
    cos_sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    norm: StreamNorm | None = None,
) -> torch.Tensor:
    """The q/k/v projection of a decode step with `rope_and_cache` in its epilogue, in one launch: the
    effects of rope_and_cache(skinny_linear(x, weight, bias, norm=norm), positions, cos_sin, k_cache,
    v_cache, slot_mapping), where fuses_rope(x, weight, D) (ValueError elsewhere).

    x: [T, K]; weight: [(Hq + 2 Hkv) * D, K] contiguous; bias: [N] or None; the rest as rope_and_cache
    takes them (caches [num_blocks, block_size, Hkv, D]), all one dtype. Returns qkv [T, N] in that dtype,
    q and k rotated, in the projection's column layout; k and v are written to the caches at slot_mapping.
    Each program rotates what it has just stored, as rope_and_cache reads it: the same bits as the two
    launches where skinny_linear runs the same grid. No host synchronisation."""
    _validate(x, weight, bias)
    if x.dim() != 2:
        raise ValueError(f"x must be [T, K], got {tuple(x.shape)}")
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
            "stride_slot": k_cache.stride(1),  # the caches as [num_blocks * block_size, Hkv, D]
            "stride_head": k_cache.stride(2),
            "NUM_Q_HEADS": n // head_dim - 2 * num_kv_heads,
            "NUM_KV_HEADS": num_kv_heads,
            "HEAD_DIM": head_dim,
            "ROPE": True,
        }
        _launch(_rows_of(x), weight, bias, qkv, config, rope, norm)
    return qkv


def fuses_silu(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether skinny_linear_silu takes the gate/up product of x [..., K] and weight [2I, K]: 17 to
    SKINNY_MAX_ROWS rows (up to 16 the persistent grid streams gate/up faster, and dropping the SiLU
    launch altogether cost time at 1 and 8 rows: docs/benchmarks.md, session 12) and a tile of
    BLOCK_N / 2 columns that divides I."""
    return _silu_config(x, weight) is not None


def _silu_config(x: torch.Tensor, weight: torch.Tensor) -> SkinnyConfig | None:
    """The tile skinny_linear_silu runs, or None where it cannot (see fuses_silu)."""
    n, k = weight.shape
    rows = x.numel() // max(k, 1)
    if not 16 < rows <= SKINNY_MAX_ROWS or n % 2:
        return None
    config = skinny_config(rows, n, k, x.element_size(), x.device, persistent=False)
    return config if (n // 2) % (config.block_n // 2) == 0 else None


def skinny_linear_silu(x: torch.Tensor, weight: torch.Tensor, norm: StreamNorm | None = None) -> torch.Tensor:
    """The gate/up product of a gated MLP with SiLU-and-multiply in its epilogue, in one launch:
    silu_and_mul(skinny_linear(x, weight, norm=norm)) with the same bits, where fuses_silu(x, weight)
    (ValueError elsewhere). x: [T, K]; weight: [2I, K] contiguous, gate rows first. Returns [T, I]; the
    [T, 2I] product itself never reaches memory. No host synchronisation."""
    _validate(x, weight, None)
    config = _silu_config(x, weight)
    if x.dim() != 2 or config is None:
        raise ValueError(
            f"no fused SiLU for x {tuple(x.shape)} and W {tuple(weight.shape)}: 17-{SKINNY_MAX_ROWS} rows "
            "of [T, K] and a tile that divides I (see fuses_silu)"
        )
    act = torch.empty(x.shape[0], weight.shape[0] // 2, dtype=x.dtype, device=x.device)
    _launch(_rows_of(x), weight, None, act, config, {"SILU": True}, norm)
    return act


def skinny_linear_residual(
    x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """A product whose output joins the residual stream (attention's output projection, the MLP's down
    projection), with the stream's addition and the next norm's statistics in its epilogue: returns
    (stream, squares), stream = residual + x @ weight.T rounded as `fused_add_rms_norm` rounds the
    stream, and squares the partial sums of its rows' squares, for the next product's StreamNorm (which
    then stands for that norm kernel). x: [T, K] with at most SKINNY_MAX_ROWS rows; weight: [N, K]
    contiguous; residual: [T, N] of unit column stride; one dtype. No host synchronisation."""
    _validate(x, weight, None)
    if x.dim() != 2 or residual.shape != (x.shape[0], weight.shape[0]) or residual.stride(1) != 1:
        raise ValueError(f"x must be [T, K] and residual [T, {weight.shape[0]}], got {tuple(x.shape)}, "
                         f"{tuple(residual.shape)}")  # fmt: skip
    if residual.dtype != x.dtype or residual.device != x.device:
        raise ValueError("residual must share x's dtype and device")
    config = skinny_config(x.shape[0], *weight.shape, x.element_size(), x.device, persistent=False)
    stream = torch.empty_like(residual, memory_format=torch.contiguous_format)
    squares = torch.empty(triton.cdiv(weight.shape[0], config.block_n), x.shape[0], dtype=torch.float32,
                          device=x.device)  # fmt: skip
    if x.shape[0]:
        epilogue = {"res_ptr": residual, "stride_res": residual.stride(0), "squares_ptr": squares,
                    "stride_sq": squares.stride(0), "ADD_RESIDUAL": True}  # fmt: skip
        _launch(_rows_of(x), weight, None, stream, config, epilogue)
    return stream, squares


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
