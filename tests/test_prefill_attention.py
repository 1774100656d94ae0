"""Paged prefill attention kernel against its torch reference (interpreted on CPU at small tiles, compiled on
GPU at the tuned ones), the reference against a naive per-token softmax, and the launcher's validation."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from leanserve.kernels import prefill_attention as launcher
from leanserve.kernels.prefill_attention import _CONFIGS, PrefillConfig, _fitted, _launch, prefill_attention
from leanserve.kernels.reference import reference_prefill_attention

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")

# Per dtype: the kernel rounds the probabilities to the cache dtype for the P @ V product.
TOLERANCES = {
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
    torch.float16: {"atol": 2e-3, "rtol": 2e-3},
    torch.bfloat16: {"atol": 1.5e-2, "rtol": 1.5e-2},
}
# Small tiles keep the interpreter fast and still give chunks of several query and key tiles.
SMALL = PrefillConfig(block_m=32, block_n=16, num_warps=4, num_stages=1)


def _naive_attention(q, k_cache, v_cache, cu, context_lens, block_tables, sm_scale):
    """One (query token, head) at a time in fp64, keys gathered slot by slot."""
    num_q_heads = q.shape[1]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    out = torch.zeros(q.shape, dtype=torch.float64)
    for i, context_len in enumerate(context_lens.tolist()):
        start, end = int(cu[i]), int(cu[i + 1])
        slots = [(int(block_tables[i, t // block_size]), t % block_size) for t in range(context_len)]
        for j in range(end - start):
            visible = context_len - (end - start) + j + 1
            for hq in range(num_q_heads):
                hkv = hq // (num_q_heads // num_kv_heads)
                keys = torch.stack([k_cache[p, o, hkv] for p, o in slots[:visible]]).double()
                values = torch.stack([v_cache[p, o, hkv] for p, o in slots[:visible]]).double()
                weights = torch.softmax(keys @ q[start + j, hq].double() * sm_scale, dim=0)
                out[start + j, hq] = weights @ values
    return out


def _make_inputs(chunks, num_q_heads, num_kv_heads, head_dim, block_size, dtype, device, seed=0):
    """chunks: (prefix, query_len) per sequence. A random paged cache with shuffled block ids and spare
    blocks (table entries past a sequence's pages point anywhere), q as a view into a wider qkv row (the
    model's layout: a token stride wider than the heads). Returns q, k_cache, v_cache, cu, context_lens,
    block_tables."""
    gen = torch.Generator().manual_seed(seed)
    lens = [prefix + query for prefix, query in chunks]
    max_blocks = max(math.ceil(max(lens) / block_size), 1)
    num_blocks = len(chunks) * max_blocks + 3
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    tables = torch.randperm(num_blocks, generator=gen)[: len(chunks) * max_blocks].view(len(chunks), -1)
    num_tokens = sum(query for _, query in chunks)
    qkv = torch.randn(num_tokens, num_q_heads + 2 * num_kv_heads, head_dim, generator=gen).to(dtype)
    cu = torch.tensor([0, *torch.tensor([q for _, q in chunks]).cumsum(0).tolist()], dtype=torch.int32)
    context_lens = torch.tensor(lens, dtype=torch.int32)
    tensors = (qkv, k_cache, v_cache, cu, context_lens, tables.to(torch.int32))
    qkv, *rest = (t.to(device) for t in tensors)
    return qkv[:, :num_q_heads], *rest


@dataclass
class Case:
    chunks: list[tuple[int, int]]  # (prefix, query_len) per sequence
    heads: tuple[int, int]  # (Hq, Hkv)
    head_dim: int
    block_size: int
    dtype: torch.dtype


# Prefixes 0, 1 and non-multiples of the tiles and pages; query lengths 1, tile +- 1, several tiles;
# GQA 1/3/4/8; head dims 64/80/96/128/256; pages of 1 to 64 tokens (smaller and larger than a key tile).
CHUNK_SETS = {
    "one-token": [(0, 1)],
    "whole": [(0, 37)],
    "prefix1": [(1, 9)],
    "decode-like": [(40, 1), (17, 1)],
    "mixed": [(0, 19), (23, 1), (1, 33), (50, 8)],
    "long-prefix": [(77, 13), (0, 5)],
}
CPU_CASES = [
    Case(CHUNK_SETS[name], heads, dim, block_size, dtype)
    for name, heads, dim, block_size, dtype in [
        ("one-token", (4, 1), 64, 16, torch.float16),
        ("whole", (8, 2), 64, 16, torch.float16),
        ("whole", (2, 2), 128, 1, torch.float32),
        ("prefix1", (8, 1), 64, 32, torch.float16),
        ("decode-like", (4, 4), 64, 8, torch.float32),
        ("mixed", (8, 2), 64, 16, torch.float16),
        ("mixed", (9, 3), 64, 32, torch.float32),
        ("mixed", (8, 1), 128, 64, torch.float16),
        ("mixed", (2, 2), 64, 1, torch.float16),
        ("long-prefix", (8, 2), 128, 16, torch.float16),
        ("long-prefix", (4, 1), 64, 8, torch.float32),
        ("mixed", (4, 2), 80, 16, torch.float16),
        ("long-prefix", (4, 2), 96, 32, torch.float16),
        ("prefix1", (2, 1), 256, 16, torch.float16),
    ]
]


def _case_id(case: Case) -> str:
    name = next(key for key, chunks in CHUNK_SETS.items() if chunks == case.chunks)
    hq, hkv = case.heads
    dtype = str(case.dtype).removeprefix("torch.")
    return f"{name}-h{hq}x{hkv}-d{case.head_dim}-bs{case.block_size}-{dtype}"


@pytest.mark.parametrize("case", CPU_CASES, ids=_case_id)
def test_matches_reference(case):
    q, k, v, cu, ctx, bt = _make_inputs(
        case.chunks, *case.heads, case.head_dim, case.block_size, case.dtype, DEVICE
    )
    assert q.stride(0) > q.shape[1] * q.shape[2]  # a view into wider rows
    out = _launch(q, k, v, cu, ctx, bt, None, None, SMALL)
    expected = reference_prefill_attention(q, k, v, cu, ctx, bt)
    torch.testing.assert_close(out, expected, **TOLERANCES[case.dtype])


@pytest.mark.parametrize(("group", "head_dim"), [(1, 64), (4, 64), (8, 64), (4, 128)])
def test_default_tiles_and_out_buffer(group, head_dim):
    """The shipped tile sizes with an output buffer and a scale: at D=64 one query tile holds the whole
    chunk; at D=128 (128-key tiles) the first sequence's 200 + 70 keys end inside a third key tile."""
    chunks = [(30, 70), (0, 3)] if head_dim == 64 else [(200, 70), (0, 3)]
    q, k, v, cu, ctx, bt = _make_inputs(chunks, 2 * group, 2, head_dim, 16, torch.float16, DEVICE)
    out = torch.full(q.shape, float("nan"), dtype=q.dtype, device=q.device)
    result = prefill_attention(q, k, v, cu, ctx, bt, sm_scale=0.3, out=out)
    assert result.data_ptr() == out.data_ptr()
    expected = reference_prefill_attention(q, k, v, cu, ctx, bt, sm_scale=0.3)
    torch.testing.assert_close(out, expected, **TOLERANCES[torch.float16])


def test_programs_past_a_chunk_write_nothing():
    """A grid sized from the token count gives spare programs past each chunk's last tile: rows of q
    outside the chunks (here the buffer's tail, not passed in) are never written."""
    q, k, v, cu, ctx, bt = _make_inputs([(5, 17), (0, 15), (3, 2)], 8, 2, 64, 16, torch.float16, DEVICE)
    buffer = torch.full((q.shape[0] + 4, *q.shape[1:]), 7.0, dtype=q.dtype, device=q.device)
    _launch(q, k, v, cu, ctx, bt, None, buffer[: q.shape[0]], SMALL)
    assert (buffer[q.shape[0] :] == 7.0).all()
    torch.testing.assert_close(
        buffer[: q.shape[0]], reference_prefill_attention(q, k, v, cu, ctx, bt), **TOLERANCES[torch.float16]
    )


@pytest.mark.parametrize(
    ("chunks", "heads", "block_size"),
    [([(0, 3)], (2, 2), 1), ([(4, 3), (0, 1)], (4, 2), 4), ([(9, 2), (2, 5)], (3, 1), 8)],
)
def test_reference_matches_naive_softmax(chunks, heads, block_size):
    q, k, v, cu, ctx, bt = _make_inputs(chunks, *heads, 64, block_size, torch.float32, "cpu")
    expected = _naive_attention(q, k, v, cu, ctx, bt, 0.125)
    # fp32 reference vs fp64 naive: fp32 rounding only.
    result = reference_prefill_attention(q, k, v, cu, ctx, bt, sm_scale=0.125)
    torch.testing.assert_close(result.double(), expected, atol=1e-5, rtol=1e-5)


def _valid_inputs():
    return _make_inputs([(3, 5), (0, 2)], 8, 2, 64, 16, torch.float16, DEVICE)


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
        (lambda a: a.update(context_lens=a["context_lens"].long()), "context_lens must be"),
        (lambda a: a.update(cu_seqlens_q=a["cu_seqlens_q"][:2]), "cu_seqlens_q must be"),
        (lambda a: a.update(block_tables=a["block_tables"].long()), "block_tables must be int32"),
        (lambda a: a.update(out=torch.empty(6, 8, 64, dtype=torch.float16, device=DEVICE)), "out must be"),
    ],
    ids=[
        "q-rank",
        "cache-rank",
        "dtype",
        "mixed-dtype",
        "head-dim",
        "gqa",
        "stride",
        "lens",
        "cu",
        "table",
        "out",
    ],
)
def test_validation_errors(mutate, message):
    q, k, v, cu, ctx, bt = _valid_inputs()
    args = {"q": q, "k_cache": k, "v_cache": v, "cu_seqlens_q": cu, "context_lens": ctx, "block_tables": bt}
    mutate(args)
    with pytest.raises(ValueError, match=message):
        prefill_attention(**args)


def test_unsupported_head_dim_and_group_rejected():
    q, k, v, cu, ctx, bt = _make_inputs([(0, 4)], 4, 4, 48, 16, torch.float16, DEVICE)
    with pytest.raises(ValueError, match="head_dim 48 is not supported"):
        prefill_attention(q, k, v, cu, ctx, bt)
    q, k, v, cu, ctx, bt = _make_inputs([(0, 4)], 64, 1, 64, 16, torch.float16, DEVICE)
    with pytest.raises(ValueError, match="at most 32 query heads per KV head"):
        _launch(q, k, v, cu, ctx, bt, None, None, SMALL)


@pytest.mark.parametrize(
    ("head_dim", "itemsize", "stages", "block_n"),
    [(128, 2, 3, 128), (128, 4, 2, 64), (64, 4, 3, 64), (256, 2, 2, 32), (256, 4, 2, 32)],
)
def test_tiles_fit_shared_memory(monkeypatch, head_dim, itemsize, stages, block_n):
    """On an H100 (227 KB a program) fp32 tiles at D=128 keep two stages of half-size K/V tiles, the rest
    run as configured."""
    monkeypatch.setattr(launcher, "max_shared_memory", lambda device: 227 * 1024)
    config = _fitted(_CONFIGS[head_dim], head_dim, itemsize, torch.device("cuda"))
    assert (config.num_stages, config.block_n) == (stages, block_n)
    assert config.block_m == _CONFIGS[head_dim].block_m


# GPU: bf16 at the shipped tiles, Llama-3 heads, contexts of several key tiles and pages.
GPU_CHUNKS = [
    [(0, 1)],
    [(0, 2048)],
    [(2048, 2048)],
    [(1, 300), (0, 1000), (4000, 1), (777, 129)],
    [(5000, 64)] * 8,
]


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("chunks", GPU_CHUNKS, ids=lambda c: f"{len(c)}x{c[0][0]}+{c[0][1]}")
@pytest.mark.parametrize(("heads", "head_dim"), [((32, 8), 128), ((8, 8), 64), ((16, 2), 256), ((12, 4), 96)])
@pytest.mark.parametrize("block_size", [16, 128])
def test_gpu_matches_reference(chunks, heads, head_dim, block_size):
    q, k, v, cu, ctx, bt = _make_inputs(chunks, *heads, head_dim, block_size, torch.bfloat16, "cuda")
    out = prefill_attention(q, k, v, cu, ctx, bt)
    torch.testing.assert_close(out, reference_prefill_attention(q, k, v, cu, ctx, bt), atol=1e-2, rtol=1e-2)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_whole_prompt_matches_flash(dtype):
    """A chunk without a prefix against SDPA flash on the contiguous K/V."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v, cu, ctx, bt = _make_inputs([(0, 4096)], 32, 8, 128, 16, dtype, "cuda")
    out = prefill_attention(q, k, v, cu, ctx, bt)
    keys, values = (c[bt[0]].flatten(0, 1)[:4096].transpose(0, 1)[None] for c in (k, v))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        flash = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(0, 1)[None], keys, values, is_causal=True, enable_gqa=True
        )
    # Two kernels that each round the probabilities to 16 bits, in different tile orders: bf16's tolerance.
    torch.testing.assert_close(out, flash[0].transpose(0, 1), **TOLERANCES[torch.bfloat16])
