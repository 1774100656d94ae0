"""Which tile of the skinny decode product (kernels/skinny_linear.py) runs which shape, and where the
product beats cuBLASLt at all: rules tuned on an H100 for Llama-3-8B's projections and LM head, with the
measurements that chose them."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton

from leanserve.kernels.launch import max_shared_memory, sm_count

# Rows of x the kernel takes: decode batches up to this size (where it pays: skinny_beats_cublas).
SKINNY_MAX_ROWS = 64


@dataclass(frozen=True)
class SkinnyConfig:
    """Rows of x per tile (a tl.dot tile has at least 16), rows of W per program, K per pipeline stage,
    stages in flight, warps, and whether W's rows are the tensor-core tile's M side (`swap`: W x x.T, so
    64 or 128 weight rows fill the 64-row MMA instead of a handful of x rows)."""

    block_m: int
    block_n: int
    block_k: int
    num_stages: int
    num_warps: int
    swap: bool
    programs: int | None = None  # None: one program per block of W's rows


def skinny_config(
    rows: int, n: int, k: int, x_itemsize: int, w_itemsize: int, device: torch.device, persistent: bool = True
) -> SkinnyConfig:
    """Tuned on an H100 (bf16, Llama-3-8B's projections and LM head): per-call times from
    bench_skinny_linear.py, us a step from a Llama-3-8B layer chain in one CUDA graph (both in
    docs/benchmarks.md). Up to 16 rows: 32 rows of W x 256 columns per stage, 4 stages (geometric mean
    88.0% of the read floor at 1 row, cuBLAS 84.3%), 5 where W's rows are longer than W is tall (the down
    projection; layer chain at 1 / 8 / 16 rows, us a step against 4 stages: 5 stages -20 / -40 / -54, 6
    stages +9 / -44 / -11, 3 stages +139 / +135 / +160). A matrix of 2-16 such blocks per SM (gate/up) is
    streamed by a persistent grid instead, one program of 512-column stages per SM, the SMs rounded down
    to a multiple of 8 (gate/up at 1 / 8 / 16 rows 83.2 / 85.0 / 84.7 us, one program per block 86.6 /
    88.8 / 87.2; 2 programs per SM 83.2-83.5 at 1 row, 132 programs of 256-column stages 86.0; the LM
    head and the smaller matrices gain nothing). 17-64 rows: W's rows on the MMA's M side, 128 of them
    per program where that still gives every SM a program (gate/up, LM head; 8 warps), else 64; 128
    columns per stage, 3 / 5 stages. Sweep at 64 rows (tiles of W 32-256 x K 64-256, 2-8 stages, 4/8
    warps), this choice vs cuBLASLt (us): q/k/v 20.7 vs 21.2, o 14.5 vs 14.7, gate/up 85.4 vs 89.0, LM
    head 360.5 vs 391.5 (the best o: 14.0); persistent grids are slower there (gate/up 86.4 us at best).
    `persistent=False` (the fused epilogues) never takes the persistent grid (the rope epilogue needs one
    program per block), nor W8A8's 32-row tiles.
    fp32 stages are twice the size: stages are dropped until they fit."""
    if x_itemsize == 1:
        # W8A8 (e4m3 x): W's rows on the M side, so that sm_90 multiplies e4m3 directly (wgmma m64nNk32).
        # bench_fp8_linear.py --tune (H100; W tiles of 64/128 rows x K 128-512, 3-5 stages, 4/8 warps) at
        # 1 / 16 / 64 rows: 64 x 256 in 5 stages is within 3% of the best tile everywhere (at 1 row q/k/v,
        # o, gate/up, down 10.5 / 8.2 / 42.1 / 22.4 us, 4 stages 10.7 / 8.7 / 41.6 / 24.0) except gate/up
        # past 16 rows, where 128-column stages stream its 28672 rows faster (64 rows: 44.7 against 48.4),
        # and o and down, whose 64 tiles of 64 rows leave half the SMs idle: x's rows on the M side and 32
        # rows of W a program (64 rows, 3085 GB/s: o 8.9 against 9.6 us, down 23.7 against 25.3). Plain
        # products only: the fused epilogues keep the tiles they are tested with.
        block_m = max(16, triton.next_power_of_2(rows))
        if rows > 16 and persistent and 2 * triton.cdiv(n, 64) <= sm_count(device):
            return (
                SkinnyConfig(block_m, 32, 512, 4, 4, swap=False)
                if k > n
                else SkinnyConfig(block_m, 32, 256, 5, 4, swap=False)
            )
        block_k = 128 if rows > 16 and n >= 4 * k else 256
        return SkinnyConfig(block_m, 64, block_k, 5, 4, swap=True)
    if rows <= 16:
        programs = max(1, sm_count(device) // 8 * 8)
        grid = SkinnyConfig(16, 32, 1024 // x_itemsize, 4, 4, swap=False, programs=programs)
        if (
            persistent
            and 2 * programs <= triton.cdiv(n, 32) <= 16 * programs
            and _fits(grid, x_itemsize, w_itemsize, device)
        ):
            return grid
        stages = 5 if k > n else 4
        config = SkinnyConfig(block_m=16, block_n=32, block_k=256, num_stages=stages, num_warps=4, swap=False)
    elif triton.cdiv(n, 128) >= sm_count(device):
        config = SkinnyConfig(triton.next_power_of_2(rows), 128, 128, num_stages=3, num_warps=8, swap=True)
    else:
        config = SkinnyConfig(triton.next_power_of_2(rows), 64, 128, num_stages=5, num_warps=4, swap=True)
    while config.num_stages > 2 and not _fits(config, x_itemsize, w_itemsize, device):
        config = replace(config, num_stages=config.num_stages - 1)
    return config


def _fits(config: SkinnyConfig, x_itemsize: int, w_itemsize: int, device: torch.device) -> bool:
    """The config's pipeline stages (block_m rows of x and block_n rows of W, block_k columns each) fit
    the device's shared memory."""
    stage = config.block_k * (config.block_m * x_itemsize + config.block_n * w_itemsize)
    return config.num_stages * stage <= max_shared_memory(device)


def skinny_beats_cublas(rows: int, n: int, k: int) -> bool:
    """Where the kernel is faster than cuBLASLt on an H100 (bf16; bench_skinny_linear.py and a Llama-3-8B
    layer chain, docs/benchmarks.md): up to 16 rows always; 17-64 rows unless K > N (the down projection:
    a program streams few, long rows of W there and cuBLASLt splits K: at 64 rows 48.2 us with
    skinny_config's choice, 44.6 at the sweep's best, 44.2 on cuBLASLt; a 32-row layer chain takes 8776
    us with it in the kernel against 8419 us on cuBLASLt); never past 64 rows (cuBLASLt faster on every
    projection at 128)."""
    return rows <= 16 or (rows <= SKINNY_MAX_ROWS and k <= n)
