"""Prefill through SDPA per chunk (models.sdpa_prefill) against the paged reference: whole chunks, and chunks
after a prefix split at it and merged by log-sum-exp (CPU flash attention here, cuDNN on the GPU)."""

from __future__ import annotations

import pytest
import torch
from test_kv_fp8 import _config
from test_prefill_attention import CHUNK_SETS, _make_inputs

from leanserve.kernels.fp8 import dequantize, quantize_rows
from leanserve.kernels.kv_quant import gather_pages
from leanserve.kernels.reference import reference_prefill_attention
from leanserve.models.kv_cache import KVCache
from leanserve.models.sdpa_prefill import prefix_gather_bytes, sdpa_prefill, splits_at_prefix
from leanserve.server.engine import engine_setup
from leanserve.server.engine.config import EngineConfig

HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
TOLERANCES = {
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
    torch.float16: {"atol": 2e-3, "rtol": 2e-3},
    torch.bfloat16: {"atol": 1.5e-2, "rtol": 1.5e-2},
}


def _run(chunks, heads, head_dim, block_size, dtype, device, fp8=False):
    """sdpa_prefill and the reference on one random paged cache: (ours, reference). Each chunk's own K/V
    are its rows of the cache (as the engine writes them before attention); an fp8 cache holds e4m3 rows
    with per-row scales, and the chunks' own K/V are those rows dequantized."""
    q, k_cache, v_cache, cu, context_lens, tables = _make_inputs(
        chunks, *heads, head_dim, block_size, dtype, device
    )
    scales = (None, None)
    if fp8:
        (k_cache, k_scale), (v_cache, v_scale) = (quantize_rows(c) for c in (k_cache, v_cache))
        scales = (k_scale, v_scale)
    query_lens = [query for _, query in chunks]
    context = context_lens.tolist()
    own = [[], []]
    for i, (prefix, query) in enumerate(chunks):
        pages = tables[i, : -(-(prefix + query) // block_size)]
        for rows, cache, scale in zip(own, (k_cache, v_cache), scales, strict=True):
            rows.append(gather_pages(cache, scale, pages, dtype)[prefix : prefix + query])
    k, v = (torch.cat(rows) for rows in own)
    ours = torch.empty_like(q)
    sm_scale = head_dim**-0.5
    sdpa_prefill(q, k, v, k_cache, v_cache, *scales, query_lens, context, tables, sm_scale, ours)
    reference = reference_prefill_attention(
        q, k_cache, v_cache, cu, context_lens, tables, sm_scale, k_scale=scales[0], v_scale=scales[1]
    )
    return ours, reference


CPU_CASES = [
    ("one-token", (4, 1), 64, 16, torch.float32),
    ("whole", (8, 2), 64, 16, torch.bfloat16),
    ("prefix1", (8, 1), 64, 32, torch.float32),
    ("decode-like", (4, 4), 64, 8, torch.float32),
    ("mixed", (8, 2), 64, 16, torch.float32),
    ("mixed", (9, 3), 80, 1, torch.float32),
    ("long-prefix", (8, 2), 128, 16, torch.bfloat16),
    ("long-prefix", (4, 2), 256, 64, torch.float32),
]


@pytest.mark.parametrize(("name", "heads", "head_dim", "block_size", "dtype"), CPU_CASES)
def test_matches_reference_on_cpu(name, heads, head_dim, block_size, dtype):
    ours, reference = _run(CHUNK_SETS[name], heads, head_dim, block_size, dtype, "cpu")
    torch.testing.assert_close(ours, reference, **TOLERANCES[dtype])


@pytest.mark.parametrize("name", ["prefix1", "mixed", "long-prefix"])
def test_fp8_cache_matches_reference_on_cpu(name):
    ours, reference = _run(CHUNK_SETS[name], (8, 2), 64, 16, torch.float32, "cpu", fp8=True)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def test_merge_is_needed():
    """A chunk after a prefix differs from attention over its own keys alone: the prefix half counts."""
    q, k_cache, v_cache, _, _, tables = _make_inputs([(24, 8)], 4, 1, 64, 8, torch.float32, "cpu")
    ours, reference = _run([(24, 8)], (4, 1), 64, 8, torch.float32, "cpu")
    rows = gather_pages(k_cache, None, tables[0], torch.float32)
    own_only = torch.empty_like(q)
    sdpa_prefill(q, rows[24:32], gather_pages(v_cache, None, tables[0], torch.float32)[24:32], k_cache,
                 v_cache, None, None, [8], [8], tables, 0.125, own_only)  # fmt: skip
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
    assert (own_only - reference).abs().max() > 0.1


def test_splits_where_cudnn_can():
    cpu = torch.empty(1, 1, 256, dtype=torch.float32)
    assert splits_at_prefix(cpu)
    if HAS_CUDA:
        assert splits_at_prefix(torch.empty(1, 1, 128, dtype=torch.bfloat16, device="cuda"))
        assert not splits_at_prefix(torch.empty(1, 1, 128, dtype=torch.float32, device="cuda"))
        assert not splits_at_prefix(torch.empty(1, 1, 256, dtype=torch.float16, device="cuda"))


GPU_CASES = [
    ("prefix1", (8, 1), 64, 16, torch.float16),
    ("mixed", (32, 8), 128, 16, torch.bfloat16),
    ("long-prefix", (8, 2), 128, 1, torch.float16),
    ("mixed", (4, 4), 64, 64, torch.bfloat16),
]


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize(("name", "heads", "head_dim", "block_size", "dtype"), GPU_CASES)
def test_matches_reference_on_gpu(name, heads, head_dim, block_size, dtype):
    ours, reference = _run(CHUNK_SETS[name], heads, head_dim, block_size, dtype, "cuda")
    torch.testing.assert_close(ours, reference, **TOLERANCES[dtype])


@gpu
@pytest.mark.gpu
def test_long_prefix_on_gpu():
    """A 2k chunk after a 6k prefix, Llama-3-8B heads, bf16 and an fp8 cache (cuDNN's tiles span the keys)."""
    for fp8 in (False, True):
        ours, reference = _run([(6000, 2048)], (32, 8), 128, 16, torch.bfloat16, "cuda", fp8=fp8)
        torch.testing.assert_close(ours, reference, **TOLERANCES[torch.bfloat16])


def test_dequantize_is_what_the_fp8_cache_reads():
    """The fp8 case's own K/V are the cache's rows dequantized: the helper agrees with kernels.fp8."""
    x = torch.randn(4, 2, 2, 8)
    values, scales = quantize_rows(x)
    got = gather_pages(values, scales, torch.tensor([1, 3]), torch.float32)
    torch.testing.assert_close(got, dequantize(values[[1, 3]], scales[[1, 3]], torch.float32).flatten(0, 1))


def test_kv_pool_leaves_room_for_the_longest_gathered_prefix(tmp_path, monkeypatch):
    """num_kv_blocks on a (pretend) 80 GB card keeps the largest prefix gather out of the KV pool: a
    longer max_model_len gives the pool fewer blocks, by that gather's bytes."""
    config = _config(tmp_path, layers=32)
    model = type("Model", (), {"config": config, "tp_size": 1})()
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (64 << 30, 80 << 30))
    cuda = torch.device("cuda")
    blocks = {n: engine_setup.num_kv_blocks(EngineConfig(max_model_len=n), model, torch.bfloat16, cuda)
              for n in (1 << 10, 1 << 20)}  # fmt: skip
    gather = prefix_gather_bytes((1 << 20) - (1 << 10), 8, 128, torch.bfloat16)
    assert gather == ((1 << 20) - (1 << 10)) * 8 * 128 * 9  # bf16 K and V, e4m3 bytes, fp32 products
    block_bytes = KVCache.bytes_per_block(config, 16, torch.bfloat16)
    assert blocks[1 << 10] - blocks[1 << 20] == pytest.approx(gather / block_bytes, abs=1)
