"""LeanAttention decode attention: the launch parameters per head dim, input checks and the launcher of
the Triton kernel (kernels/lean_decode.py). One persistent launch splits all lean tiles (sequence x KV
head x context tile) of a paged KV cache evenly over the programs, stream-K style
(kernels/lean_partition.py); outputs split between programs are merged in the same launch by the last
contributor to arrive (kernels/lean_merge.py). Algorithm and fix-up protocol: docs/kernel_notes.md."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton

from leanserve.kernels.kv_quant import is_slot_major
from leanserve.kernels.launch import interpreted, sm_count, use_pdl
from leanserve.kernels.lean_decode import _lean_decode_kernel
from leanserve.kernels.lean_merge import red_chunk, workspace
from leanserve.kernels.paged_checks import check_query_and_caches

_LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class LeanConfig:
    """Launch parameters of one head dim: tokens per lean tile, warps, pipeline stages, programs per SM,
    and the fewest tiles an active program takes (short batches run on fewer programs)."""

    tile: int
    num_warps: int
    num_stages: int
    programs_per_sm: int
    min_tiles: int = 2


# Tuned on an H100 (`bench_decode_attention.py --tune`, docs/kernel_notes.md: tile 64/128 x warps 4/8 x
# stages 2-4 x programs per SM 1-3 x min_tiles 1/2/4; best geometric mean of % floor over B=1 1k/4k/128k,
# B=32 4k, B=256 1k and a ragged batch, within 1% of the runner-up). The page ids are prefetched a tile
# ahead, so num_stages - 1 K/V tiles are in flight per program: D=128 64-token tiles (32 KB of K+V) x 2 in
# flight x 2 programs per SM (what the kernel's registers allow). 8 warps are slower on every shape.
# min_tiles 2 puts short batches on fewer programs, so fewer partials per output are merged. D=64 shares
# the D=128 choice (best on the batched default-model shape); D=96 pads to 128; D=256 is checked for
# correctness only (not tuned).
_CONFIGS: dict[int, LeanConfig] = {
    64: LeanConfig(tile=64, num_warps=4, num_stages=3, programs_per_sm=2),
    96: LeanConfig(tile=64, num_warps=4, num_stages=3, programs_per_sm=2),
    128: LeanConfig(tile=64, num_warps=4, num_stages=3, programs_per_sm=2),
    256: LeanConfig(tile=64, num_warps=8, num_stages=2, programs_per_sm=1),
}
# An fp8 cache with slot-major V pages runs both products on e4m3 tensor cores (lean_decode.py,
# _attend_tile_e4m3). Compiled for sm_90 (benchmarks/compile_sm90.py, triton 3.6), its loop takes ~1330
# instructions a warp for a 128-token tile against ~1060 for a 64-token one, so 128-token tiles cut the
# instructions a token by 37%; D=256 keeps its config. Not yet timed on a GPU.
_E4M3_CONFIGS: dict[int, LeanConfig] = {
    64: LeanConfig(tile=128, num_warps=4, num_stages=3, programs_per_sm=2),
    96: LeanConfig(tile=128, num_warps=4, num_stages=3, programs_per_sm=2),
    128: LeanConfig(tile=128, num_warps=4, num_stages=3, programs_per_sm=2),
    256: _CONFIGS[256],
}
_MAX_GROUP = 64  # query heads per KV head accepted: the [GROUP_PAD, D] fp32 accumulator grows with it
_INTERPRETER_PROGRAMS = 4  # programs when run under TRITON_INTERPRET (no SMs to fill; programs run serially)


def uses_e4m3_products(q: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """Whether the kernel multiplies in e4m3: an fp8 cache with slot-major V pages, a half-precision q."""
    return is_slot_major(v_cache) and q.dtype != torch.float32


def launch_config(q: torch.Tensor, v_cache: torch.Tensor) -> LeanConfig | None:
    """The launch parameters for q's head dim and the kernel's form (None: unsupported head dim)."""
    configs = _E4M3_CONFIGS if uses_e4m3_products(q, v_cache) else _CONFIGS
    return configs.get(q.shape[-1]) if q.dim() == 3 else None


def _default_programs(device: torch.device, config: LeanConfig) -> int:
    if device.type != "cuda":
        return _INTERPRETER_PROGRAMS
    return sm_count(device) * config.programs_per_sm


def _validate(q, k_cache, v_cache, block_tables, seq_lens, out, k_scale=None, v_scale=None) -> None:
    if q.dim() != 3:
        raise ValueError(f"q must be [batch, num_q_heads, head_dim], got shape {tuple(q.shape)}")
    check_query_and_caches(q, k_cache, v_cache, k_scale, v_scale)
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    if head_dim not in _CONFIGS:
        raise ValueError(f"head_dim {head_dim} is not supported (supported: {sorted(_CONFIGS)})")
    if num_q_heads // num_kv_heads > _MAX_GROUP:
        raise ValueError(f"at most {_MAX_GROUP} query heads per KV head, got {num_q_heads // num_kv_heads}")
    if block_tables.dtype != torch.int32 or block_tables.dim() != 2 or block_tables.shape[0] != batch:
        raise ValueError(
            f"block_tables must be int32 [batch={batch}, max_blocks], got {block_tables.dtype} "
            f"{tuple(block_tables.shape)}"
        )
    if block_tables.stride(-1) != 1:
        raise ValueError("block_tables must be contiguous in its last dim")
    if seq_lens.dtype != torch.int32 or tuple(seq_lens.shape) != (batch,) or not seq_lens.is_contiguous():
        raise ValueError(
            f"seq_lens must be a contiguous int32 [batch={batch}], "
            f"got {seq_lens.dtype} {tuple(seq_lens.shape)}"
        )
    devices = {t.device for t in (q, k_cache, v_cache, block_tables, seq_lens)}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype or out.device != q.device):
        raise ValueError(
            f"out must be {tuple(q.shape)} {q.dtype} on {q.device}, "
            f"got {tuple(out.shape)} {out.dtype} on {out.device}"
        )
    if out is not None and out.stride(-1) != 1:
        raise ValueError("out must be contiguous in head_dim")


def _validate_timestamps(timestamps: torch.Tensor | None, device: torch.device) -> None:
    if timestamps is None:
        return
    if interpreted() or device.type != "cuda":
        raise ValueError(
            "timestamps read the GPU's global timer: they need a CUDA device (not the interpreter)"
        )
    if timestamps.dtype != torch.int64 or tuple(timestamps.shape) != (2,) or not timestamps.is_contiguous():
        raise ValueError(
            f"timestamps must be a contiguous int64 [2], got {timestamps.dtype} {tuple(timestamps.shape)}"
        )
    if timestamps.device != device:
        raise ValueError(f"timestamps must be on {device}, got {timestamps.device}")


def _launch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    sm_scale: float | None,
    out: torch.Tensor | None,
    config: LeanConfig,
    num_programs: int | None = None,
    timestamps: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """The launcher behind `lean_attention_decode` with explicit launch parameters; `num_programs`
    overrides the grid (tests force a few programs so outputs split across 3+ of them; tuning sweeps)."""
    _validate(q, k_cache, v_cache, block_tables, seq_lens, out, k_scale, v_scale)
    _validate_timestamps(timestamps, q.device)
    batch, num_q_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    group_pad = max(16, triton.next_power_of_2(group))  # tl.dot needs >= 16 rows
    block_d = triton.next_power_of_2(head_dim)
    if out is None:
        out = torch.empty_like(q)
    if batch == 0:
        return out
    programs = num_programs or _default_programs(q.device, config)
    ws = workspace(q.device, programs, group_pad, block_d)
    scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else sm_scale
    pdl = use_pdl(q.device)
    _lean_decode_kernel[(programs,)](
        q,
        k_cache,
        v_cache,
        k_scale,
        v_scale,
        block_tables,
        seq_lens,
        out,
        ws.part_acc,
        ws.part_ml,
        ws.counters,
        timestamps,
        batch,
        config.min_tiles,
        scale * _LOG2E,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        v_cache.stride(3),
        block_tables.stride(0),
        *(k_scale.stride() if k_scale is not None else (0, 0, 0)),
        out.stride(0),
        out.stride(1),
        NUM_KV_HEADS=num_kv_heads,
        GROUP=group,
        GROUP_PAD=group_pad,
        GROUP_RED=triton.next_power_of_2(group),
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        PAGE_SIZE=block_size,
        TILE=config.tile,
        BLOCK_B=max(2, triton.next_power_of_2(batch)),
        # The interpreter computes bf16 tl.dot wrongly (triton issue 11584): upcast its operands there.
        UPCAST=interpreted(),
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        RED_CHUNK=red_chunk(group, head_dim),
        TIMED=timestamps is not None,
        FP8=k_scale is not None,
        HALF_Q=q.dtype != torch.float32,
        E4M3=uses_e4m3_products(q, v_cache),
        PDL=pdl,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        launch_pdl=pdl,
    )
    return out


def lean_attention_decode(
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
    """Decode attention of one new token per sequence against its paged cache, in one persistent launch.

    q: [B, Hq, D] fp16/bf16/fp32; k_cache, v_cache: [num_blocks, block_size, Hkv, D] in q's dtype, or
    float8_e4m3fn with k_scale, v_scale: [num_blocks, block_size, Hkv] fp32 (kernels.kv_quant);
    block_tables: [B, max_blocks] int32; seq_lens: [B] int32 (0 gives a zero output); sm_scale defaults
    to 1/sqrt(D); out: optional [B, Hq, D] buffer. Returns [B, Hq, D] in q's dtype. No host
    synchronisation: after one warm-up call (which allocates the workspace) it can be captured in a
    CUDA graph and replayed with new seq_lens and block tables.

    On Hopper it is launched with programmatic dependent launch: it reads seq_lens and block_tables
    (and partitions the work) while the kernel before it may still run, and waits for that kernel only
    before reading q and K/V and writing anything. So the kernel launched right before it must not be
    one of ours (kernels.launch) that writes seq_lens or block_tables; torch's kernels never let it in early.

    timestamps (CUDA only): an int64 [2] tensor the launch folds its GPU-side span into, in ns of the
    global timer: [0] = min(itself, first program start), [1] = max(itself, last program end). Fill it
    with (int64 max, 0) before the launch; end - start is then the kernel's own duration, measured
    without timing events (64 event nodes in a 32-layer decode graph add ~230 us of device time a step:
    a microbenchmark at batch 8, docs/benchmarks.md).
    """
    config = launch_config(q, v_cache)
    if config is None:
        _validate(q, k_cache, v_cache, block_tables, seq_lens, out, k_scale, v_scale)  # the precise error
    return _launch(
        q, k_cache, v_cache, block_tables, seq_lens, sm_scale, out, config, None, timestamps, k_scale, v_scale
    )
