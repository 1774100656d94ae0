"""LeanAttention decode kernel against the torch reference (interpreted on CPU, compiled on GPU), the
reference against a naive per-sequence softmax, the launcher's validation, and on GPU: races under
many programs and repeated launches, and CUDA graph replay with new lengths and block tables."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
import triton
from guard_page import against_guard_page

from leanserve.kernels.lean_attention import _CONFIGS, LeanConfig, _launch, lean_attention_decode
from leanserve.kernels.lean_merge import red_chunk, workspace
from leanserve.kernels.reference import reference_decode_attention
from leanserve.models.kv_cache import head_major

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")

# Per output dtype: the kernel rounds the probabilities to the cache dtype for the P @ V product.
TOLERANCES = {
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
    torch.float16: {"atol": 2e-3, "rtol": 2e-3},
    torch.bfloat16: {"atol": 1.5e-2, "rtol": 1.5e-2},
}


@dataclass
class Case:
    batch: int
    heads: tuple[int, int]  # (Hq, Hkv)
    head_dim: int
    block_size: int
    lens: str  # edges | split | straggler
    dtype: torch.dtype


def _lens(kind: str, batch: int, block_size: int, tile: int, gen: torch.Generator) -> list[int]:
    """Lengths for one case, in units of the block size and the lean tile."""
    if kind == "edges":  # 1, block-1, block, block+1 and both sides of a tile boundary
        edges = [1, max(block_size - 1, 2), block_size, block_size + 1, tile - 1, tile + 1, 2 * tile]
        return [edges[i % len(edges)] for i in range(batch)]
    if kind == "split":  # long enough that a forced small grid splits each output over 3+ programs
        return [4 * tile + 5 + 3 * i for i in range(batch)]
    short = torch.randint(1, 2 * tile, (batch,), generator=gen).tolist()  # ragged plus one straggler
    short[batch // 2] = 10 * tile + 3
    return short


def _program_ranges(units_per_seq: list[int], num_programs: int) -> list[tuple[int, int]]:
    """Host mirror of the kernel's partition: active program p owns units [p*N//A, (p+1)*N//A)."""
    total = sum(units_per_seq)
    return [(p * total // num_programs, (p + 1) * total // num_programs) for p in range(num_programs)]


def _active_programs(lens: list[int], num_kv_heads: int, config: LeanConfig, num_programs: int) -> int:
    """Host mirror of the kernel's grid choice: whole outputs per program for one tile count, where
    that leaves at most 1/16 of the programs idle; else an even split, >= min_tiles a program."""
    tiles = [math.ceil(n / config.tile) for n in lens]
    outputs = len(lens) * num_kv_heads
    per_program = -(-outputs // num_programs)
    whole = outputs // per_program
    if (
        min(tiles) > 0
        and len(set(tiles)) == 1
        and outputs % per_program == 0
        and 16 * whole >= 15 * num_programs
        and per_program * tiles[0] >= config.min_tiles
    ):
        return whole
    return max(min(sum(tiles) * num_kv_heads // config.min_tiles, num_programs), 1)


def _max_contributors(lens: list[int], num_kv_heads: int, config: LeanConfig, num_programs: int) -> int:
    tiles = [math.ceil(n / config.tile) for n in lens for _ in range(num_kv_heads)]
    ranges = _program_ranges(tiles, _active_programs(lens, num_kv_heads, config, num_programs))
    most, begin = 0, 0
    for n in tiles:
        most = max(most, sum(1 for lo, hi in ranges if lo < begin + n and hi > begin))
        begin += n
    return most


def _make_inputs(batch, num_q_heads, num_kv_heads, head_dim, block_size, lens, dtype, device, seed=0):
    """Random paged cache with shuffled block ids (and spare blocks) so page order is exercised."""
    gen = torch.Generator().manual_seed(seed)
    max_blocks = max(math.ceil(max(lens, default=1) / block_size), 1)
    num_blocks = batch * max_blocks + 3
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    block_tables = torch.randperm(num_blocks, generator=gen)[: batch * max_blocks].view(batch, max_blocks)
    q = torch.randn(batch, num_q_heads, head_dim, generator=gen).to(dtype)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    return [t.to(device) for t in (q, k_cache, v_cache, block_tables.to(torch.int32), seq_lens)]


# Every batch, head layout, head dim, block size, length kind and dtype appears, with the pairs that
# matter (non-power-of-two groups with every block size, splits with every head dim) covered.
CPU_CASES = [
    Case(1, (4, 4), 64, 16, "split", torch.float16),
    Case(1, (32, 8), 128, 16, "split", torch.float16),
    Case(1, (9, 3), 64, 1, "split", torch.float32),
    Case(1, (8, 2), 128, 32, "edges", torch.float16),
    Case(1, (9, 3), 128, 32, "split", torch.bfloat16),
    Case(3, (9, 3), 64, 16, "edges", torch.float16),
    Case(3, (8, 2), 128, 1, "edges", torch.float16),
    Case(3, (4, 4), 128, 32, "split", torch.float32),
    Case(3, (32, 8), 64, 32, "edges", torch.bfloat16),
    Case(7, (9, 3), 64, 32, "edges", torch.float16),
    Case(7, (32, 8), 64, 16, "straggler", torch.float16),
    Case(7, (8, 2), 128, 16, "straggler", torch.bfloat16),
    Case(7, (4, 4), 64, 1, "straggler", torch.float32),
    Case(7, (9, 3), 128, 16, "split", torch.float16),
    Case(3, (16, 1), 64, 16, "straggler", torch.float16),  # MQA, largest group
    Case(1, (8, 2), 96, 16, "split", torch.float16),
    Case(3, (4, 2), 256, 16, "edges", torch.float16),
]


def _case_id(case: Case) -> str:
    hq, hkv = case.heads
    dtype = str(case.dtype).removeprefix("torch.")
    return f"b{case.batch}-h{hq}x{hkv}-d{case.head_dim}-bs{case.block_size}-{case.lens}-{dtype}"


def _check_case(case: Case, num_programs: int | None, device: str, seed: int = 0) -> None:
    """A forced grid also takes single tiles per program, so outputs split as finely as possible."""
    hq, hkv = case.heads
    config = _CONFIGS[case.head_dim]
    if num_programs is not None:
        config = replace(config, min_tiles=1)
    lens = _lens(case.lens, case.batch, case.block_size, config.tile, torch.Generator().manual_seed(seed))
    q, k, v, bt, sl = _make_inputs(
        case.batch, hq, hkv, case.head_dim, case.block_size, lens, case.dtype, device
    )
    out = _launch(q, k, v, bt, sl, None, None, config, num_programs=num_programs)
    expected = reference_decode_attention(q, k, v, bt, sl)
    torch.testing.assert_close(out, expected, **TOLERANCES[case.dtype])


def _split_programs(case: Case) -> int:
    """A grid small enough to stay cheap interpreted, with 3+ programs per output for "split" lengths."""
    return 3 * case.batch * case.heads[1] + 1 if case.lens == "split" else 5


@pytest.mark.parametrize("case", CPU_CASES, ids=_case_id)
def test_matches_reference(case):
    num_programs = _split_programs(case)
    if case.lens == "split":
        lens = _lens("split", case.batch, case.block_size, _CONFIGS[case.head_dim].tile, torch.Generator())
        config = replace(_CONFIGS[case.head_dim], min_tiles=1)
        assert _max_contributors(lens, case.heads[1], config, num_programs) >= 3
    _check_case(case, num_programs, DEVICE)


@pytest.mark.parametrize(("group", "head_dim"), [(3, 64), (16, 128)])
def test_output_merged_from_many_programs(group, head_dim):
    """One long output spread over more programs than a reducer merges per round: several full rounds
    and a partly masked last one (GQA 3 pads the rows to 4; GQA 16 at D=128 merges 4 per round)."""
    config = replace(_CONFIGS[head_dim], min_tiles=1)
    chunk = red_chunk(group, head_dim)
    lens = [(2 * chunk + 8) * config.tile + 7, 5]
    num_programs = 2 * chunk + 5
    assert _max_contributors(lens, 1, config, num_programs) > 2 * chunk
    q, k, v, bt, sl = _make_inputs(2, group, 1, head_dim, 16, lens, torch.float16, DEVICE)
    out = _launch(q, k, v, bt, sl, None, None, config, num_programs=num_programs)
    torch.testing.assert_close(out, reference_decode_attention(q, k, v, bt, sl), atol=2e-3, rtol=2e-3)


_CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


@pytest.mark.skipif(not _CUOBJDUMP.exists(), reason="this Triton has no NVIDIA backend tools")
def test_compile_sm90_reports_the_kernel_without_a_gpu():
    """benchmarks/compile_sm90.py compiles the decode kernel for sm_90 on any machine (not interpreted):
    a row per cache with the registers a thread holds, the programs an SM takes and the main loop's size;
    the e4m3 products (fp8, slot-major V) take under 3/4 of the widening form's loop instructions a token."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run(
        [sys.executable, "benchmarks/compile_sm90.py"], cwd=root, env=env, capture_output=True, text=True,
        timeout=600, check=True,
    )  # fmt: skip
    rows = [
        line.strip("| ").split(" | ")
        for line in run.stdout.splitlines()
        if line.startswith(("| bf16", "| fp8"))
    ]
    assert [row[0] for row in rows] == ["bf16", "fp8", "fp8 slot-major V"], run.stdout
    per_token = {}
    for cache, _, tile, registers, spills, _, per_sm, loop, *_ in rows:
        assert 0 < int(registers) <= 255 and int(spills) == 0 and int(per_sm) >= 1, (cache, registers)
        assert int(loop) > 100, (cache, loop)
        per_token[cache] = int(loop) / int(tile)
    assert per_token["fp8 slot-major V"] < 0.75 * per_token["fp8"], run.stdout


@pytest.mark.parametrize(
    ("lens", "split"),
    [([129, 192], False), ([65, 100, 128, 70], False), ([65, 129], True), ([64, 65, 1, 1], True)],
)
def test_one_tile_count_gives_whole_outputs(lens, split):
    """Sequences of one tile count on a grid where whole outputs per program leave 1 of 17 programs idle:
    no output is split, so no partial is written (the workspace keeps its NaNs); different tile counts
    split as before. The outputs match the reference either way."""
    config, num_programs = _CONFIGS[64], 17
    heads = (16, 8)
    assert _active_programs(lens, heads[1], config, num_programs) == (num_programs if split else 16)
    assert (_max_contributors(lens, heads[1], config, num_programs) > 1) is split
    q, k, v, bt, sl = _make_inputs(len(lens), *heads, 64, 16, lens, torch.float16, DEVICE)
    scratch = workspace(q.device, num_programs, 16, 64)
    scratch.part_acc.fill_(float("nan"))
    out = _launch(q, k, v, bt, sl, None, None, config, num_programs=num_programs)
    torch.testing.assert_close(out, reference_decode_attention(q, k, v, bt, sl), atol=2e-3, rtol=2e-3)
    assert bool(scratch.part_acc.isnan().all()) is not split


def test_default_launch_and_out_buffer():
    q, k, v, bt, sl = _make_inputs(3, 9, 3, 64, 16, [200, 1, 77], torch.float16, DEVICE)
    out = torch.full_like(q, float("nan"))
    result = lean_attention_decode(q, k, v, bt, sl, sm_scale=0.3, out=out)
    assert result.data_ptr() == out.data_ptr()
    torch.testing.assert_close(
        out, reference_decode_attention(q, k, v, bt, sl, sm_scale=0.3), atol=2e-3, rtol=2e-3
    )


@pytest.mark.skipif(HAS_CUDA, reason="guard pages catch reads of the interpreted kernel on CPU")
def test_idle_programs_read_nothing_past_the_inputs():
    """More programs than tiles: the idle ones locate one past the batch and must not touch q, the block
    tables or the lengths there (an unmasked q load did, and crashed CUDA-graph decode on a GPU)."""
    q, k, v, bt, sl = _make_inputs(1, 8, 2, 64, 16, [100], torch.float16, "cpu")
    q, bt, sl = (against_guard_page(t) for t in (q, bt, sl))
    out = _launch(q, k, v, bt, sl, None, None, _CONFIGS[64], num_programs=9)
    torch.testing.assert_close(out, reference_decode_attention(q, k, v, bt, sl), atol=2e-3, rtol=2e-3)


def test_empty_sequences_give_zeros():
    q, k, v, bt, sl = _make_inputs(4, 8, 2, 64, 16, [0, 150, 0, 3], torch.float16, DEVICE)
    out = _launch(q, k, v, bt, sl, None, torch.full_like(q, float("nan")), _CONFIGS[64], num_programs=3)
    assert torch.isfinite(out).all()
    assert (out[0] == 0).all() and (out[2] == 0).all()
    torch.testing.assert_close(out, reference_decode_attention(q, k, v, bt, sl), atol=2e-3, rtol=2e-3)


def test_strided_query_and_repeated_launches_reset_counters():
    """q as a view with a head stride wider than D; the second launch (new lengths) reuses the same
    workspace, so it is only right if the reducers of the first reset every counter."""
    from leanserve.kernels.lean_merge import _WORKSPACES

    config = _CONFIGS[64]
    for lens in ([300, 129, 64], [65, 400, 1]):
        q_wide, k, v, bt, sl = _make_inputs(3, 8, 2, 128, 16, lens, torch.float16, DEVICE)
        q = q_wide[..., :64]
        k, v = k[..., :64].contiguous(), v[..., :64].contiguous()
        out = _launch(q, k, v, bt, sl, None, None, config, num_programs=7)
        torch.testing.assert_close(out, reference_decode_attention(q, k, v, bt, sl), atol=2e-3, rtol=2e-3)
    counters = [ws.counters for key, ws in _WORKSPACES.items() if key[1] == 7]
    assert counters and all(int(c.abs().sum()) == 0 for c in counters)


def test_head_major_cache_blocks():
    """Caches stored head-major ([block, KV head, slot, D], the engine's KVCache) and passed as [block,
    slot, KV head, D] views: the kernel reads K and V through their strides, so it gives the token-major
    cache's output (`bench_decode_attention.py --layouts` times the two)."""
    q, k, v, bt, sl = _make_inputs(3, 8, 2, 64, 16, [300, 17, 64], torch.float16, DEVICE)
    k_heads, v_heads = head_major(k), head_major(v)
    assert k_heads.stride(2) == 16 * 64 and not k_heads.is_contiguous()
    config = _CONFIGS[64]
    want = _launch(q, k, v, bt, sl, None, None, config, num_programs=5)
    torch.testing.assert_close(_launch(q, k_heads, v_heads, bt, sl, None, None, config, num_programs=5), want)


def _naive_attention(q, k_cache, v_cache, block_tables, seq_lens, sm_scale):
    """One (sequence, query head) at a time, tokens gathered one by one."""
    batch, num_q_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    out = torch.zeros(batch, num_q_heads, head_dim, dtype=torch.float64)
    for b in range(batch):
        n = int(seq_lens[b])
        if n == 0:
            continue
        slots = [(int(block_tables[b, t // block_size]), t % block_size) for t in range(n)]
        for hq in range(num_q_heads):
            hkv = hq // (num_q_heads // num_kv_heads)
            keys = torch.stack([k_cache[p, o, hkv] for p, o in slots]).double()
            values = torch.stack([v_cache[p, o, hkv] for p, o in slots]).double()
            weights = torch.softmax(keys @ q[b, hq].double() * sm_scale, dim=0)
            out[b, hq] = weights @ values
    return out


@pytest.mark.parametrize(
    ("heads", "block_size", "lens"),
    [((4, 4), 1, [5, 1, 0]), ((9, 3), 16, [33, 16, 15]), ((8, 1), 32, [1, 70, 32])],
)
def test_reference_matches_naive_softmax(heads, block_size, lens):
    q, k, v, bt, sl = _make_inputs(len(lens), *heads, 64, block_size, lens, torch.float32, "cpu")
    expected = _naive_attention(q, k, v, bt, sl, 0.125)
    # fp32 reference vs fp64 naive: fp32 rounding only.
    torch.testing.assert_close(
        reference_decode_attention(q, k, v, bt, sl).double(), expected, atol=1e-5, rtol=1e-5
    )


def _valid_inputs():
    return _make_inputs(2, 8, 2, 64, 16, [20, 5], torch.float16, DEVICE)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda a: a.update(q=a["q"][0]), "q must be"),
        (lambda a: a.update(k_cache=a["k_cache"][0]), "k_cache and v_cache must"),
        (lambda a: a.update(q=a["q"].to(torch.int8)), "float16, bfloat16 or float32"),
        (lambda a: a.update(v_cache=a["v_cache"].float()), "share a dtype"),
        (lambda a: a.update(q=a["q"].repeat(1, 1, 2)), "head_dim of q"),
        (lambda a: a.update(q=a["q"][:, :7]), "multiple of num_kv_heads"),
        (lambda a: a.update(q=a["q"].transpose(1, 2).contiguous().transpose(1, 2)), "contiguous in head_dim"),
        (lambda a: a.update(block_tables=a["block_tables"].long()), "block_tables must be int32"),
        (lambda a: a.update(seq_lens=a["seq_lens"][:1]), "seq_lens must be"),
        (lambda a: a.update(out=torch.empty(2, 8, 64, dtype=torch.float32, device=DEVICE)), "out must be"),
        # (on CPU any timestamps are refused: the interpreter has no GPU timer)
        (lambda a: a.update(timestamps=torch.zeros(2, dtype=torch.int32, device=DEVICE)), "timestamps"),
    ],
    ids=[
        "q-rank",
        "cache-rank",
        "dtype",
        "mixed-dtype",
        "head-dim",
        "gqa",
        "stride",
        "table",
        "lens",
        "out",
        "timestamps",
    ],
)
def test_validation_errors(mutate, message):
    q, k, v, bt, sl = _valid_inputs()
    args = {"q": q, "k_cache": k, "v_cache": v, "block_tables": bt, "seq_lens": sl, "out": None}
    mutate(args)
    with pytest.raises(ValueError, match=message):
        lean_attention_decode(**args)


def test_unsupported_head_dim_rejected():
    q, k, v, bt, sl = _make_inputs(1, 4, 4, 48, 16, [10], torch.float16, DEVICE)
    with pytest.raises(ValueError, match="head_dim 48 is not supported"):
        lean_attention_decode(q, k, v, bt, sl)


# GPU: the same grid at larger shapes in bf16, with the tuned grid and with forced small grids.
GPU_CASES = [Case(c.batch, c.heads, c.head_dim, c.block_size, c.lens, torch.bfloat16) for c in CPU_CASES]


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=_case_id)
@pytest.mark.parametrize("num_programs", [None, 3, 37])
def test_gpu_matches_reference(case, num_programs):
    _check_case(case, num_programs, "cuda")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize(("batch", "heads", "long_len"), [(1, (32, 8), 200_000), (16, (9, 3), 30_000)])
def test_gpu_long_ragged_many_launches(batch, heads, long_len):
    """Many programs, outputs split over dozens of them, 50 launches: a missing ordering would show
    as an output that differs from the reference in some launch."""
    gen = torch.Generator().manual_seed(1)
    lens = torch.randint(1, 4000, (batch,), generator=gen).tolist()
    lens[-1] = long_len
    q, k, v, bt, sl = _make_inputs(batch, *heads, 128, 16, lens, torch.bfloat16, "cuda")
    expected = reference_decode_attention(q, k, v, bt, sl)
    for _ in range(50):
        torch.testing.assert_close(lean_attention_decode(q, k, v, bt, sl), expected, atol=1e-2, rtol=1e-2)


@gpu
@pytest.mark.gpu
def test_gpu_cuda_graph_replay_with_new_lengths_and_tables():
    batch, (hq, hkv), dim, block_size = 5, (32, 8), 128, 16
    max_len = 9000
    q, k, v, bt, sl = _make_inputs(batch, hq, hkv, dim, block_size, [max_len] * batch, torch.bfloat16, "cuda")
    out = torch.empty_like(q)
    lean_attention_decode(q, k, v, bt, sl, out=out)  # warm-up: compiles, allocates the workspace
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        lean_attention_decode(q, k, v, bt, sl, out=out)
    gen = torch.Generator().manual_seed(2)
    for step in range(5):
        lens = torch.randint(0 if step == 4 else 1, max_len, (batch,), generator=gen).to(torch.int32)
        sl.copy_(lens)
        bt.copy_(bt[torch.randperm(batch, generator=gen).cuda()])
        q.copy_(torch.randn(q.shape, generator=gen).to(q.dtype))
        graph.replay()
        torch.testing.assert_close(out, reference_decode_attention(q, k, v, bt, sl), atol=1e-2, rtol=1e-2)


@gpu
@pytest.mark.gpu
def test_gpu_timestamps_give_the_kernel_span_inside_a_graph():
    """The kernel folds its first start and last end into `timestamps`; replayed in a CUDA graph with a
    reset copy before it, each replay's span is positive, within the events around the replay, and grows
    with the context."""
    q, k, v, bt, sl = _make_inputs(4, 32, 8, 128, 16, [32768] * 4, torch.bfloat16, "cuda")
    blank = torch.tensor([torch.iinfo(torch.int64).max, 0], device="cuda")
    stamps = torch.empty_like(blank)
    out = torch.empty_like(q)
    lean_attention_decode(q, k, v, bt, sl, out=out, timestamps=stamps.copy_(blank))
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        stamps.copy_(blank)
        lean_attention_decode(q, k, v, bt, sl, out=out, timestamps=stamps)
    spans = []
    for length in (32768, 1024):
        sl.fill_(length)
        events = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        events[0].record()
        graph.replay()
        events[1].record()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, reference_decode_attention(q, k, v, bt, sl), atol=1e-2, rtol=1e-2)
        start, end = stamps.tolist()
        spans.append(end - start)
        assert 0 < spans[-1] <= events[0].elapsed_time(events[1]) * 1e6, length
    assert spans[0] > 4 * spans[1]
