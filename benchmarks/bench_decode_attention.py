"""Decode attention benchmark on a CUDA GPU: LeanAttention vs PyTorch SDPA (flash, cuDNN) on contiguous
caches and FA2 varlen, each shape as microseconds and as % of the HBM floor (K+V+Q+O bytes over the read
bandwidth measured in the same run); beside it LeanAttention on an fp8 cache (the same values quantized,
kernels/fp8.py) against its own floor (fp8 K+V, their fp32 scales, Q+O), twice: V's pages [slot, D] as K's
(K and V widened to fp16 for the products) and slot-major (models.kv_cache.FP8_V_SLOT_MAJOR: both
products on e4m3 tensor cores). Writes JSON, a plot and a
markdown table; `--tune` sweeps the launch configs instead (`--tune --fp8`: on the fp8 cache),
`--skip-peers` times LeanAttention only. The pools are stored as the engine's KVCache stores them,
head-major ([block, KV head, slot, D], the fp8 scales [block, KV head, slot]); `--layouts` times bf16 and
fp8 caches stored token-major ([block, slot, KV head, D]) against those (the fp8 scales token- or
head-major).
`--launch-for-profiler` only launches the kernels for a profiler around the process.
Usage: python benchmarks/bench_decode_attention.py [--out DIR] [--tune [--fp8 [--e4m3]] | --layouts]
[--skip-peers]"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections.abc import Callable
from dataclasses import asdict, astuple, dataclass, field, replace
from functools import partial
from itertools import product
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from leanserve.kernels.fp8 import dequantize, quantize_rows
from leanserve.kernels.lean_attention import _CONFIGS, _E4M3_CONFIGS, LeanConfig, _launch, launch_config
from leanserve.models.kv_cache import block_view, head_major, slot_major

DTYPE = torch.bfloat16
BLOCK_SIZE = 16
ROTATE_BYTES = 512 << 20  # inputs per timed graph: well past the 50 MB L2, so no call reads cached K/V
FP8_TOLERANCE = 1e-2  # relative error of the fp8 kernel vs the bf16 kernel on the dequantized values


@dataclass
class Shape:
    name: str
    lens: list[int]
    num_q_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    ragged: bool = False

    def kv_bytes(self) -> int:
        return 2 * sum(self.lens) * self.num_kv_heads * self.head_dim * DTYPE.itemsize

    def fp8_kv_bytes(self) -> int:
        """K and V in fp8: a byte an element and a 4-byte scale per cached row of each."""
        return 2 * sum(self.lens) * self.num_kv_heads * (self.head_dim + 4)

    def qo_bytes(self) -> int:
        return 2 * len(self.lens) * self.num_q_heads * self.head_dim * DTYPE.itemsize

    def floor_bytes(self) -> int:
        return self.kv_bytes() + self.qo_bytes()

    def fp8_floor_bytes(self) -> int:
        """What the fp8 kernel must read and write: the fp8 K and V with their scales, Q and O in bf16."""
        return self.fp8_kv_bytes() + self.qo_bytes()


@dataclass
class Result:
    shape: str
    batch: int
    kv_mb: float
    floor_us: float
    fp8_kv_mb: float  # fp8 K/V with their scales
    fp8_floor_us: float
    us: dict[str, float | None] = field(default_factory=dict)

    def pct_floor(self, name: str) -> float | None:
        t = self.us.get(name)
        floor = self.fp8_floor_us if name.startswith("lean_fp8") else self.floor_us
        return None if t is None else 100 * floor / t


def _lognormal_lens(count: int, median: int, seed: int) -> list[int]:
    """Ragged lengths, log-normal around `median`, plus one sequence 8x longer (the straggler)."""
    gen = torch.Generator().manual_seed(seed)
    lens = (torch.randn(count - 1, generator=gen) * 0.6 + math.log(median)).exp().round().clamp(min=1)
    return [*map(int, lens.tolist()), 8 * median]


def issue_shapes() -> list[Shape]:
    k = 1024
    shapes = [Shape(f"B=1 32/8 {n // k}k", [n]) for n in (k, 4 * k, 32 * k, 128 * k, 512 * k)]
    shapes += [Shape(f"B=1 32/32 {n // k}k", [n], num_kv_heads=32) for n in (4 * k, 128 * k)]
    shapes += [Shape(f"B={b} 32/8 4k", [4 * k] * b) for b in (8, 32)]
    shapes += [Shape("B=256 32/8 1k", [k] * 256)]
    for count, median, seed in ((8, 4 * k, 0), (32, 2 * k, 1), (64, k, 2), (16, 16 * k, 3)):
        shapes.append(
            Shape(f"ragged {count}x~{median // k}k", _lognormal_lens(count, median, seed), ragged=True)
        )
    return shapes


def read_bandwidth() -> float:
    """Bytes per second of a reduction over 4 GiB of bf16 (random data: never time on zeros)."""
    x = torch.randn(2 << 30, device="cuda", dtype=DTYPE)
    return (4 << 30) / _time_graph([lambda: x.sum()], replays=20)


def _time_graph(calls: list[Callable[[], object]], replays: int = 20) -> float:
    """Seconds per call: all `calls` captured in one CUDA graph (each on its own inputs), replayed."""
    for call in calls:  # warm-up outside capture: compilation, workspace, cuBLAS/cuDNN handles
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    times = []
    for _ in range(replays):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) / 1e3)
    return statistics.median(times) / len(calls)


@dataclass
class Inputs:
    """`copies` independent input sets of one shape: a paged pool (copy i uses its own blocks) and
    contiguous caches for the peers."""

    q: torch.Tensor  # [copies, B, Hq, D]
    k_pool: torch.Tensor  # [copies * blocks, BLOCK_SIZE, Hkv, D], head-major blocks
    v_pool: torch.Tensor
    tables: torch.Tensor  # [copies, B, max_blocks] int32
    seq_lens: torch.Tensor  # [B] int32
    copies: int
    fp8: tuple[torch.Tensor, ...] = ()  # the pools quantized: k, v fp8 and k, v scales
    fp8_v_slot_major: torch.Tensor | None = None  # the quantized V with slot-major pages

    def quantized(self, v_slot_major: bool = False) -> tuple[torch.Tensor, ...]:
        """(k, v, k_scale, v_scale) of the pools in fp8, head-major, made on first use; v_slot_major: V's
        pages slot-major (a copy of the same values, also made once)."""
        if not self.fp8:
            (k, k_scale), (v, v_scale) = quantize_rows(self.k_pool), quantize_rows(self.v_pool)
            self.fp8 = tuple(head_major(t) for t in (k, v, k_scale, v_scale))
        if not v_slot_major:
            return self.fp8
        k, v, k_scale, v_scale = self.fp8
        if self.fp8_v_slot_major is None:
            self.fp8_v_slot_major = slot_major(v)
        return k, self.fp8_v_slot_major, k_scale, v_scale


def make_inputs(shape: Shape) -> Inputs:
    copies = max(1, min(64, ROTATE_BYTES // shape.kv_bytes()))
    batch, max_len = len(shape.lens), max(shape.lens)
    blocks_per_seq = [math.ceil(n / BLOCK_SIZE) for n in shape.lens]
    max_blocks = max(blocks_per_seq)
    per_copy = sum(blocks_per_seq)
    pages_shape = (copies * per_copy, shape.num_kv_heads, BLOCK_SIZE, shape.head_dim)
    k_pool = block_view(torch.randn(pages_shape, device="cuda", dtype=DTYPE))
    v_pool = block_view(torch.randn(pages_shape, device="cuda", dtype=DTYPE))
    # Blocks of a sequence are a random permutation of the copy's blocks: a paged cache is scattered.
    tables = torch.zeros(copies, batch, max_blocks, dtype=torch.int32)
    for c in range(copies):
        perm = torch.randperm(per_copy) + c * per_copy
        offset = 0
        for b, n in enumerate(blocks_per_seq):
            tables[c, b, :n] = perm[offset : offset + n]
            offset += n
    q = torch.randn(copies, batch, shape.num_q_heads, shape.head_dim, device="cuda", dtype=DTYPE)
    seq_lens = torch.tensor(shape.lens, dtype=torch.int32, device="cuda")
    del max_len
    return Inputs(q, k_pool, v_pool, tables.cuda(), seq_lens, copies)


def lean_calls(
    inp: Inputs,
    config: LeanConfig | None,
    num_programs: int | None = None,
    fp8: bool = False,
    v_slot_major: bool = False,
) -> list[Callable]:
    """One call per input copy; `fp8` reads the quantized pools (`v_slot_major`: V's pages slot-major);
    config None: the launcher's for the cache."""
    outs = [torch.empty_like(inp.q[c]) for c in range(inp.copies)]
    k, v, k_scale, v_scale = inp.quantized(v_slot_major) if fp8 else (inp.k_pool, inp.v_pool, None, None)
    config = config or launch_config(inp.q[0], v)
    return [
        (
            lambda c=c: _launch(
                inp.q[c],
                k,
                v,
                inp.tables[c],
                inp.seq_lens,
                None,
                outs[c],
                config,
                num_programs,
                k_scale=k_scale,
                v_scale=v_scale,
            )
        )
        for c in range(inp.copies)
    ]


def contiguous_kv(inp: Inputs, shape: Shape, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Copy c's cache gathered into padded [B, L, Hkv, D] tensors (what SDPA reads)."""
    max_len = max(shape.lens)
    pages = inp.tables[c, :, : math.ceil(max_len / BLOCK_SIZE)].long()
    k = inp.k_pool[pages].flatten(1, 2)[:, :max_len]
    v = inp.v_pool[pages].flatten(1, 2)[:, :max_len]
    return k.contiguous(), v.contiguous()


def sdpa_calls(inp: Inputs, shape: Shape, backend: SDPBackend, copies: int) -> list[Callable]:
    """SDPA with one backend forced; GQA natively if the backend takes it, else K/V heads repeated (what a
    caller of that backend has to do, reading Hq/Hkv times the bytes)."""
    group = shape.num_q_heads // shape.num_kv_heads
    calls = []
    for c in range(copies):
        k, v = contiguous_kv(inp, shape, c)
        q = inp.q[c].unsqueeze(2)  # [B, Hq, 1, D]
        kt, vt = k.transpose(1, 2), v.transpose(1, 2)  # [B, Hkv, L, D] views of [B, L, Hkv, D]

        def call(q=q, kt=kt, vt=vt, gqa=True):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, kt, vt, enable_gqa=gqa)

        try:
            call()
        except RuntimeError:
            if group == 1:
                raise
            kt, vt = kt.repeat_interleave(group, dim=1), vt.repeat_interleave(group, dim=1)
            call = partial(call, kt=kt, vt=vt, gqa=False)
        calls.append(call)
    return calls


def varlen_calls(inp: Inputs, shape: Shape, copies: int) -> list[Callable]:
    """FA2 varlen: packed K/V of all sequences, one query token each."""
    batch = len(shape.lens)
    cu_q = torch.arange(batch + 1, device="cuda", dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(shape.lens).cumsum(0).tolist()], device="cuda", dtype=torch.int32)
    calls = []
    for c in range(copies):
        k, v = contiguous_kv(inp, shape, c)
        mask = torch.arange(k.shape[1], device="cuda")[None, :] < inp.seq_lens[:, None]
        k_packed, v_packed = k[mask], v[mask]  # [total, Hkv, D]
        q = inp.q[c]

        def call(q=q, k_packed=k_packed, v_packed=v_packed):
            return torch.ops.aten._flash_attention_forward(
                q, k_packed, v_packed, cu_q, cu_k, 1, max(shape.lens), 0.0, False, False
            )[0]

        calls.append(call)
    return calls


def peer_copies(inp: Inputs, shape: Shape) -> int:
    """Contiguous copies double the memory: fewer of them for huge shapes (they exceed L2 anyway)."""
    return inp.copies if shape.kv_bytes() * inp.copies <= (8 << 30) else 1


def bench_shape(shape: Shape, bandwidth: float, skip_peers: bool = False) -> Result:
    inp = make_inputs(shape)
    result = Result(
        shape.name,
        len(shape.lens),
        shape.kv_bytes() / 1e6,
        1e6 * shape.floor_bytes() / bandwidth,
        shape.fp8_kv_bytes() / 1e6,
        1e6 * shape.fp8_floor_bytes() / bandwidth,
    )
    config = _CONFIGS[shape.head_dim]
    result.us["lean"] = 1e6 * _time_graph(lean_calls(inp, config))
    result.us["lean_fp8"] = 1e6 * _time_graph(lean_calls(inp, config, fp8=True))
    reference = fp8_reference(inp, config)
    check_fp8(inp, shape, config, reference, v_slot_major=False)
    # The e4m3 form is new to the GPU: where it fails (compiling or its check), its column says n/a and the
    # error is printed, and the run goes on with the other kernels' numbers.
    try:
        result.us["lean_fp8_e4m3"] = 1e6 * _time_graph(lean_calls(inp, None, fp8=True, v_slot_major=True))
        check_fp8(inp, shape, config, reference, v_slot_major=True)
    except Exception as exc:
        print(f"  {shape.name}: lean_fp8_e4m3 FAILED: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
        result.us["lean_fp8_e4m3"] = None
    copies = peer_copies(inp, shape)
    peers = {} if skip_peers else {"varlen_fa2": lambda: varlen_calls(inp, shape, copies)}
    if not shape.ragged and not skip_peers:
        peers["sdpa_flash"] = lambda: sdpa_calls(inp, shape, SDPBackend.FLASH_ATTENTION, copies)
        peers["sdpa_cudnn"] = lambda: sdpa_calls(inp, shape, SDPBackend.CUDNN_ATTENTION, copies)
    for name, make in peers.items():
        try:
            result.us[name] = 1e6 * _time_graph(make())
        except (RuntimeError, torch.OutOfMemoryError) as exc:  # a backend that refuses the shape
            print(f"  {shape.name}: {name} unavailable ({str(exc).splitlines()[0][:100]})", flush=True)
            result.us[name] = None
        torch.cuda.empty_cache()
    # Correctness of what we timed: ours against FA2 varlen on copy 0.
    ours = lean_calls(inp, config)[0]()
    theirs = varlen_calls(inp, shape, 1)[0]()
    err = relative_error(ours, theirs)
    assert err < 1e-2, f"{shape.name}: lean vs FA2 relative error {err:.2e}"
    return result


def fp8_reference(inp: Inputs, config: LeanConfig) -> torch.Tensor:
    """The bf16 kernel on copy 0 of the dequantized pools: the values the fp8 kernel reads, so only its
    fp8 handling can set the two apart."""
    k, v, k_scale, v_scale = inp.quantized()
    dequantized = replace(
        inp,
        k_pool=dequantize(k, k_scale, DTYPE),
        v_pool=dequantize(v, v_scale, DTYPE),
        fp8=(),
        fp8_v_slot_major=None,
    )
    out = lean_calls(dequantized, config)[0]()
    del dequantized
    torch.cuda.empty_cache()
    return out


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """||ours - theirs|| / ||theirs||, in fp32."""
    return ((ours.float() - theirs.float()).norm() / theirs.float().norm()).item()


def check_fp8(
    inp: Inputs, shape: Shape, config: LeanConfig, reference: torch.Tensor, v_slot_major: bool
) -> None:
    """The fp8 kernel on copy 0 (V's pages slot-major or not) against `reference`, the bf16 kernel on the
    dequantized pools (the same values: fp8_reference)."""
    out = lean_calls(inp, None if v_slot_major else config, fp8=True, v_slot_major=v_slot_major)[0]()
    err = relative_error(out, reference)
    assert err < FP8_TOLERANCE, (
        f"{shape.name}: fp8 lean (V slot-major: {v_slot_major}) vs lean on the dequantized cache "
        f"relative error {err:.2e}"
    )


def tune_shapes() -> dict[int, list[Shape]]:
    """Representative shapes of each head dim the launch configs are tuned on."""
    k = 1024
    return {
        128: [
            Shape("B=1 32/8 1k", [k]),
            Shape("B=1 32/8 4k", [4 * k]),
            Shape("B=1 32/8 128k", [128 * k]),
            Shape("B=32 32/8 4k", [4 * k] * 32),
            Shape("B=256 32/8 1k", [k] * 256),
            Shape("ragged 32x~2k", _lognormal_lens(32, 2 * k, 1), ragged=True),
        ],
        64: [Shape("B=1 9/3 4k", [4 * k], 9, 3, 64), Shape("B=64 9/3 2k", [2 * k] * 64, 9, 3, 64)],
    }


def tune(bandwidth: float) -> list[dict]:
    """Sweep tile, warps, stages, programs per SM and min tiles per program on representative shapes of
    each head dim (see docs/kernel_notes.md)."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for dim, dim_shapes in tune_shapes().items():
        for shape in dim_shapes:
            inp = make_inputs(shape)
            floor_us = 1e6 * shape.floor_bytes() / bandwidth
            for tile, warps, stages, per_sm, min_tiles in product(
                (64, 128), (4, 8), (2, 3, 4), (1, 2, 3), (1, 2, 4)
            ):
                config = LeanConfig(tile, warps, stages, per_sm, min_tiles)
                try:
                    us = 1e6 * _time_graph(lean_calls(inp, config, sms * per_sm), replays=10)
                except Exception as exc:  # out of shared memory/registers for this combination
                    print(f"  {shape.name} {config}: {type(exc).__name__}", flush=True)
                    continue
                rows.append({"dim": dim, "shape": shape.name, **asdict(config), "us": us})
                rows[-1]["pct_floor"] = 100 * floor_us / us
                print(json.dumps(rows[-1]), flush=True)
            best = max((r for r in rows if r["shape"] == shape.name), key=lambda r: r["pct_floor"])
            print(f"best {shape.name}: {best}", flush=True)
            del inp
            torch.cuda.empty_cache()
        _print_best_overall(rows, dim, len(dim_shapes))
    return rows


def _print_best_overall(rows: list[dict], dim: int, num_shapes: int) -> None:
    """The configs of one head dim with the best geometric mean of % floor over all its shapes."""
    by_config: dict[tuple, list[float]] = {}
    for r in rows:
        if r["dim"] == dim:
            key = (r["tile"], r["num_warps"], r["num_stages"], r["programs_per_sm"], r["min_tiles"])
            by_config.setdefault(key, []).append(r["pct_floor"])
    means = {
        k: math.exp(statistics.fmean(map(math.log, v))) for k, v in by_config.items() if len(v) == num_shapes
    }
    for key, mean in sorted(means.items(), key=lambda kv: -kv[1])[:8]:
        print(f"D={dim} geomean {mean:.1f}% (tile, warps, stages, per_sm, min_tiles) = {key}", flush=True)


# A subset of tune_shapes (short, long, ragged at D=128; the default model's batch at D=64): with 36
# candidates each, 144 configurations to check and time and 3 x 18 fp8 kernel variants to compile (the B=1
# shapes share theirs), so that one 10-minute device call runs them all.
FP8_TUNE_SHAPES = ("B=1 32/8 4k", "B=1 32/8 128k", "ragged 32x~2k", "B=64 9/3 2k")


def fp8_candidates(default: LeanConfig) -> list[LeanConfig]:
    """The default first, then tiles of 64-256 tokens x 4/8 warps x 2-4 stages x 1-2 programs per SM at
    the default's min_tiles: an fp8 tile moves half the bytes of a bf16 one of the same token count for
    the same work per iteration, so it may want longer tiles or more of them in flight."""
    grid = (
        LeanConfig(tile, warps, stages, per_sm, default.min_tiles)
        for tile, warps, stages, per_sm in product((64, 128, 256), (4, 8), (2, 3, 4), (1, 2))
    )
    return list(dict.fromkeys([default, *grid]))


def tune_fp8(bandwidth: float, env: dict, path: Path, v_slot_major: bool = False) -> None:
    """Sweep launch configs on the fp8 cache (fp8_candidates on FP8_TUNE_SHAPES; `v_slot_major`: V's pages
    slot-major, the e4m3 products, around their default config). Each candidate's output
    is checked before it is timed; per shape it prints the default and the best candidate against the fp8
    floor (and the bf16 default's us, what fp8 has to beat) and rewrites the JSON at `path`, so a run cut
    off by its time limit keeps the shapes it finished."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows: list[dict] = []
    summaries: list[dict] = []
    for dim, all_shapes in tune_shapes().items():
        dim_shapes = [s for s in all_shapes if s.name in FP8_TUNE_SHAPES]
        default = _CONFIGS[dim]
        fp8_default = (_E4M3_CONFIGS if v_slot_major else _CONFIGS)[dim]
        candidates = fp8_candidates(fp8_default)
        print(f"fp8 D={dim}: {len(dim_shapes)} shapes x {len(candidates)} candidates", flush=True)
        for shape in dim_shapes:
            inp = make_inputs(shape)
            floor_us = 1e6 * shape.fp8_floor_bytes() / bandwidth
            reference = fp8_reference(inp, default)
            bf16_us = 1e6 * _time_graph(lean_calls(inp, default), replays=10)
            timed: dict[LeanConfig, dict] = {}
            for config in candidates:
                calls = lean_calls(inp, config, sms * config.programs_per_sm, True, v_slot_major)
                try:
                    err = relative_error(calls[0](), reference)
                except Exception as exc:  # out of shared memory/registers for this combination
                    print(f"  {shape.name} {config}: {type(exc).__name__}", flush=True)
                    continue
                if err >= FP8_TOLERANCE:
                    print(f"  {shape.name} {config}: WRONG fp8 output, relative error {err:.2e}", flush=True)
                    continue
                us = 1e6 * _time_graph(calls, replays=10)
                row = {"dim": dim, "shape": shape.name, **asdict(config), "us": us}
                row |= {"pct_floor": 100 * floor_us / us, "err": err}
                timed[config] = row
                rows.append(row)
                print(json.dumps(row), flush=True)
            summaries.append(_fp8_summary(shape, floor_us, bf16_us, fp8_default, timed))
            path.write_text(json.dumps({"env": env, "shapes": summaries, "rows": rows}, indent=1))
            del inp, reference
            torch.cuda.empty_cache()
        _print_best_overall(rows, dim, len(dim_shapes))


def _fp8_summary(
    shape: Shape, floor_us: float, bf16_us: float, default: LeanConfig, timed: dict[LeanConfig, dict]
) -> dict:
    """One shape's default and best fp8 candidate, printed (flushed) as soon as the shape is done."""
    best = max(timed, key=lambda c: timed[c]["pct_floor"], default=None)

    def describe(config: LeanConfig | None) -> str:
        row = timed.get(config)
        return "n/a" if row is None else f"{astuple(config)} {row['us']:.1f} us {row['pct_floor']:.1f}%"

    print(
        f"fp8 {shape.name}: floor {floor_us:.1f} us; default {describe(default)}; best {describe(best)}; "
        f"bf16 default {bf16_us:.1f} us [(tile, warps, stages, per_sm, min_tiles)]",
        flush=True,
    )
    return {
        "shape": shape.name,
        "floor_us": floor_us,
        "bf16_default_us": bf16_us,
        "default": timed.get(default),
        "best": timed.get(best),
    }


def _fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def markdown(results: list[Result], env: dict) -> str:
    peers = ("sdpa_flash", "sdpa_cudnn", "varlen_fa2")
    lines = [
        f"GPU: {env['gpu']}; torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}; "
        f"read bandwidth (x.sum over 4 GiB bf16) {env['bandwidth_gbs']:.0f} GB/s. bf16, head dim 128, "
        f"block size {BLOCK_SIZE}; every call timed in a CUDA graph over rotated inputs (> L2).",
        "",
        "| shape | KV MB | floor us | lean us | lean % floor | SDPA flash us | SDPA cuDNN us | FA2 varlen us "
        "| best peer % floor | best peer us / lean us |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        peer_times = [r.us[p] for p in peers if r.us.get(p) is not None]
        best = min(peer_times) if peer_times else None
        speedup = None if best is None else best / r.us["lean"]
        lines.append(
            f"| {r.shape} | {r.kv_mb:.0f} | {r.floor_us:.1f} | {r.us['lean']:.1f} "
            f"| {_fmt(r.pct_floor('lean'))} | "
            + " | ".join(_fmt(r.us.get(p)) for p in peers)
            + f" | {_fmt(None if best is None else 100 * r.floor_us / best)} | {_fmt(speedup, 2)}x |"
        )
    lines += [
        "",
        "FP8 cache (e4m3, an fp32 scale per cached row; its floor: fp8 K+V, scales, bf16 Q+O); widened: V's "
        "pages [slot, D], K and V widened to fp16; e4m3: V's pages slot-major, e4m3 tensor-core products:",
        "",
        "| shape | fp8 KV MB | fp8 floor us | widened us | % own floor | e4m3 us | % own floor "
        "| lean bf16 us | bf16 / widened | bf16 / e4m3 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        widened, e4m3 = r.us["lean_fp8"], r.us["lean_fp8_e4m3"]
        e4m3_speedup = "n/a" if e4m3 is None else f"{r.us['lean'] / e4m3:.2f}x"
        lines.append(
            f"| {r.shape} | {r.fp8_kv_mb:.0f} | {r.fp8_floor_us:.1f} | {widened:.1f} "
            f"| {_fmt(r.pct_floor('lean_fp8'))} | {_fmt(e4m3)} | {_fmt(r.pct_floor('lean_fp8_e4m3'))} "
            f"| {r.us['lean']:.1f} | {r.us['lean'] / widened:.2f}x "
            f"| {e4m3_speedup} |"
        )
    return "\n".join(lines) + "\n"


def plot(results: list[Result], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ("lean", "lean_fp8", "lean_fp8_e4m3", "sdpa_flash", "sdpa_cudnn", "varlen_fa2")
    fig, ax = plt.subplots(figsize=(12, 5))
    width = 0.14
    for i, name in enumerate(names):
        values = [r.pct_floor(name) or 0 for r in results]
        ax.bar([x + i * width for x in range(len(results))], values, width, label=name)
    ax.axhline(90, color="k", linestyle="--", linewidth=0.8, label="90% target")
    ax.set_xticks(
        [x + 2 * width for x in range(len(results))], [r.shape for r in results], rotation=45, ha="right"
    )
    ax.set_ylabel("% of HBM floor (higher is better)")
    ax.set_title("Decode attention, bf16 (lean_fp8*: fp8 cache, % of its own floor), D=128")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def gpu_env(bandwidth: float) -> dict:
    """The GPU, the versions and the read bandwidth a result was measured with."""
    return {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "bandwidth_gbs": bandwidth / 1e9,
    }


# Shapes for --layouts: long and batched, with 8 and 32 KV heads (a head's rows lie Hkv x D elements
# apart in a token-major block).
LAYOUT_SHAPES = ("B=1 32/8 32k", "B=1 32/8 128k", "B=1 32/32 128k", "B=32 32/8 4k", "ragged 32x~2k")


def bench_layouts(bandwidth: float) -> list[dict]:
    """us of the kernels on each LAYOUT_SHAPES shape: bf16 token-major and head-major; fp8 token-major,
    head-major K/V with token-major scales, and head-major K/V and scales. Each variant's output is
    checked against its token-major one."""
    rows = []
    for shape in (s for s in issue_shapes() if s.name in LAYOUT_SHAPES):
        inp = make_inputs(shape)
        config = _CONFIGS[shape.head_dim]
        row = {"shape": shape.name, "floor_us": 1e6 * shape.floor_bytes() / bandwidth,
               "fp8_floor_us": 1e6 * shape.fp8_floor_bytes() / bandwidth}  # fmt: skip
        k, v, k_scale, v_scale = inp.quantized()
        tokens = [t.contiguous() for t in (inp.k_pool, inp.v_pool, k, v, k_scale, v_scale)]
        token_major_inputs = replace(inp, k_pool=tokens[0], v_pool=tokens[1], fp8=tuple(tokens[2:]))
        variants = {
            "bf16 token-major": (token_major_inputs, False),
            "bf16 head-major": (inp, False),
            "fp8 token-major": (token_major_inputs, True),
            "fp8 head-major K/V": (replace(inp, fp8=(k, v, tokens[4], tokens[5])), True),
            "fp8 head-major K/V + scales": (inp, True),
        }
        want = {fp8: lean_calls(token_major_inputs, config, fp8=fp8)[0]() for fp8 in (False, True)}
        for name, (variant, fp8) in variants.items():
            calls = lean_calls(variant, config, fp8=fp8)
            row[name] = 1e6 * _time_graph(calls)
            err = relative_error(calls[0](), want[fp8])
            assert err < 1e-3, f"{shape.name} {name}: relative error {err:.2e} against token-major"
        del variants, calls, tokens, token_major_inputs, want
        torch.cuda.empty_cache()
        print(json.dumps(row), flush=True)
        rows.append(row)
        del inp
        torch.cuda.empty_cache()
    names = [n for n in rows[0] if n not in ("shape", "floor_us", "fp8_floor_us")] if rows else []
    print("| shape | " + " | ".join(f"{n} us" for n in names) + " | best fp8 % own floor |")
    print("|---|" + "---:|" * (len(names) + 1))
    for r in rows:
        best_fp8 = min(r[n] for n in names if n.startswith("fp8"))
        cells = " | ".join(f"{r[n]:.1f}" for n in names)
        print(f"| {r['shape']} | {cells} | {100 * r['fp8_floor_us'] / best_fp8:.1f} |")
    return rows


PROFILE_SHAPE = "B=1 32/8 128k"  # 277 MB of fp8 K/V: long enough for the loop to dominate


def launch_for_profiler() -> None:
    """One launch each of the decode kernel on PROFILE_SHAPE for a profiler run around this process
    (gpu_suite.sh run kv-stalls: Nsight Compute's warp states and per-instruction stall samples): bf16, fp8
    widened, fp8 with slot-major V (e4m3 products), each after a launch that compiles it, at the launcher's
    config. The NVTX range names which is which."""
    shape = next(s for s in issue_shapes() if s.name == PROFILE_SHAPE)
    inp = make_inputs(shape)
    for name, fp8, v_slot_major in (("bf16", False, False), ("fp8", True, False), ("fp8_e4m3", True, True)):
        call = lean_calls(inp, None, fp8=fp8, v_slot_major=v_slot_major)[0]
        call()
        torch.cuda.synchronize()
        with torch.cuda.nvtx.range(name):
            call()
        torch.cuda.synchronize()
        print(f"profiled: {name}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("bench_out"))
    parser.add_argument("--tune", action="store_true", help="sweep launch configs instead of the benchmark")
    parser.add_argument("--skip-peers", action="store_true", help="time LeanAttention (bf16 and fp8) only")
    parser.add_argument("--fp8", action="store_true", help="with --tune: sweep the fp8 cache's configs")
    parser.add_argument(
        "--e4m3", action="store_true", help="with --tune --fp8: V's pages slot-major (the e4m3 products)"
    )
    parser.add_argument("--layouts", action="store_true", help="token-major vs head-major cache blocks")
    parser.add_argument(
        "--launch-for-profiler", action="store_true", help=f"launch the kernels once each on {PROFILE_SHAPE}"
    )
    args = parser.parse_args()
    if args.fp8 and not args.tune:
        parser.error("--fp8 goes with --tune (the benchmark times the fp8 cache already)")
    if args.e4m3 and not args.fp8:
        parser.error("--e4m3 goes with --tune --fp8")
    if args.launch_for_profiler:
        launch_for_profiler()
        return
    args.out.mkdir(parents=True, exist_ok=True)
    bandwidth = read_bandwidth()
    torch.cuda.empty_cache()
    env = gpu_env(bandwidth)
    print(env, flush=True)
    if args.layouts:
        rows = bench_layouts(bandwidth)
        (args.out / "layouts.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))
        return
    if args.tune and args.fp8:
        name = "tune_fp8_e4m3.json" if args.e4m3 else "tune_fp8.json"
        tune_fp8(bandwidth, env, args.out / name, args.e4m3)
        return
    if args.tune:
        rows = tune(bandwidth)
        (args.out / "tune.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))
        return
    results = []
    for shape in issue_shapes():
        results.append(bench_shape(shape, bandwidth, args.skip_peers))
        torch.cuda.empty_cache()
        print(json.dumps(asdict(results[-1])), flush=True)
    (args.out / "decode_attention.json").write_text(
        json.dumps({"env": env, "results": [asdict(r) for r in results]}, indent=1)
    )
    plot(results, args.out / "decode_attention.png")
    table = markdown(results, env)
    (args.out / "decode_attention.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
