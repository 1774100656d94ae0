"""FP8 (e4m3) KV cache: the quantization round trip, the cache writer (RoPE + cache write), the decode
kernel and the paged prefill kernel against their torch twins (interpreted on CPU, compiled on GPU), the
cache's scales and capacity, the `kv_cache_dtype` option, the tiny test models reading exactly the
quantized values, and greedy agreement with the unquantized cache on the embedded model."""

from __future__ import annotations

import importlib.util
import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from greedy_runner import GreedyRunner
from test_fused_ops import CACHE_LAYOUTS

from leanserve.kernels import ops
from leanserve.kernels import prefill_attention as prefill
from leanserve.kernels.fp8 import FP8, FP8_MAX, dequantize, quantize_rows
from leanserve.kernels.kv_quant import select_blocks, store_slots
from leanserve.kernels.lean_attention import (
    _CONFIGS,
    _launch,
    launch_config,
    lean_attention_decode,
)
from leanserve.kernels.reference import reference_decode_attention, reference_prefill_attention
from leanserve.kernels.rotary import reference_rope_and_cache, rope_and_cache
from leanserve.kernels.skinny_fused import skinny_linear_rope
from leanserve.models import attention, kv_cache
from leanserve.models.config import ModelConfig
from leanserve.models.kv_cache import KVCache, head_major, resolve_kv_cache_dtype, slot_major
from leanserve.models.loader import load_model
from leanserve.server.engine import engine_setup
from leanserve.server.engine.config import EngineConfig

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
ROOT = Path(__file__).resolve().parents[1]
# V's pages as the readers and the writer take them: [block_size, D] (K's layout) or slot-major.
V_LAYOUTS = {"d-major": lambda v: v, "slot-major": slot_major}


def fp8_ulp(values: torch.Tensor) -> torch.Tensor:
    """The spacing of e4m3 numbers at each of `values` (fp8 or float): 2^(exponent - 3), 2^-9 below the
    smallest normal 2^-6."""
    magnitude = values.float().abs().clamp(min=2.0**-6)
    return torch.exp2(torch.floor(torch.log2(magnitude)) - 3)


def assert_fp8_close(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Two fp8 tensors of values quantized from the same numbers, by two implementations: within one e4m3
    step of each other (a GPU division may differ in the last fp32 bit and round the other way)."""
    diff = (got.float() - expected.float()).abs()
    assert bool((diff <= fp8_ulp(expected)).all()), f"max step difference {(diff / fp8_ulp(expected)).max()}"


def random_rows(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Gaussian rows of varied magnitude (1e-3 to 1e2) with an outlier per row, and one all-zero row."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) * torch.logspace(-3, 2, shape[0])[:, None]
    x[:, 3] *= 30
    x[-1] = 0
    return x


# -- quantization ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantize_round_trip_error_bound(dtype):
    x = random_rows((64, 128), seed=0).to(dtype)
    values, scales = quantize_rows(x)
    assert values.dtype == FP8 and scales.dtype == torch.float32 and scales.shape == (64,)
    x32 = x.float()
    torch.testing.assert_close(scales[:-1], x32[:-1].abs().amax(-1) / FP8_MAX, rtol=0, atol=0)
    # Each row's largest element maps to +-448 (no overflow to NaN); an all-zero row stays zero.
    assert bool((values.float().abs().amax(-1)[:-1] == FP8_MAX).all())
    assert bool((values[-1].float() == 0).all())
    # e4m3 rounds to nearest: at most half a step (1/16 relative for normals, 2^-10 of the scale below).
    error = (dequantize(values, scales, torch.float32) - x32).abs()
    bound = torch.maximum(x32.abs() / 16, scales[:, None] * 2.0**-10) * (1 + 1e-6)
    assert bool((error <= bound).all())
    assert dequantize(values, scales, dtype).dtype == dtype


# -- the cache writer ---------------------------------------------------------------------------------
ROPE_CASES = [  # (tokens, (Hq, Hkv), D, block size, dtype)
    (1, (4, 4), 64, 16, torch.float32),
    (7, (8, 2), 128, 1, torch.float16),
    (33, (9, 3), 64, 16, torch.float32),
    (5, (3, 1), 96, 32, torch.float16),
]


def _rope_fp8_inputs(
    tokens, heads, head_dim, block_size, dtype, device, seed=0, layout="head-major", v_layout="d-major"
):
    """qkv, positions, cos_sin, zeroed fp8 caches and scales of `layout` (V's pages slot-major for
    v_layout "slot-major"), and shuffled distinct slots."""
    hq, hkv = heads
    gen = torch.Generator().manual_seed(seed)
    qkv = (torch.randn(tokens, (hq + 2 * hkv) * head_dim, generator=gen) * 3).to(dtype).to(device)
    positions = torch.randint(0, 512, (tokens,), generator=gen).to(device)
    angles = torch.outer(torch.arange(512.0), 1e4 ** (-torch.arange(0, head_dim, 2) / head_dim))
    cos, sin = angles.cos(), angles.sin()
    cos_sin = torch.stack((torch.cat((cos, cos), -1), torch.cat((-sin, sin), -1)), 1).to(dtype).to(device)
    num_blocks = math.ceil(tokens / block_size) + 2
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens].to(device)
    shape = (num_blocks, block_size, hkv, head_dim)
    lay_out = CACHE_LAYOUTS[layout]
    caches = [lay_out(torch.zeros(shape, dtype=FP8, device=device)) for _ in range(2)]
    caches[1] = V_LAYOUTS[v_layout](caches[1])
    scales = [lay_out(torch.zeros(shape[:3], device=device)) for _ in range(2)]
    return qkv, positions, cos_sin, caches, scales, slots


@pytest.mark.parametrize(
    ("layout", "v_layout"),
    [("head-major", "d-major"), ("token-major", "d-major"), ("head-major", "slot-major")],
)
@pytest.mark.parametrize(("tokens", "heads", "head_dim", "block_size", "dtype"), ROPE_CASES)
def test_rope_and_cache_fp8_matches_twin(tokens, heads, head_dim, block_size, dtype, layout, v_layout):
    """Interpreted, the kernel's fp32 -> fp8e4nv conversion is wrong where rounding carries into the
    exponent (triton 3.9's interpreter: 7.9 -> 4, 127 -> 64) and for subnormals: the scales, the slots and
    most values are checked on CPU, every value on the GPU. Caches and scales head-major (the engine's)
    or token-major; V's pages also slot-major."""
    _check_rope_fp8(
        tokens, heads, head_dim, block_size, dtype, DEVICE, HAS_CUDA, layout=layout, v_layout=v_layout
    )


def _check_rope_fp8(
    tokens,
    heads,
    head_dim,
    block_size,
    dtype,
    device,
    every_value=True,
    layout="head-major",
    v_layout="d-major",
):
    qkv, positions, cos_sin, (k_cache, v_cache), (k_scale, v_scale), slots = _rope_fp8_inputs(
        tokens, heads, head_dim, block_size, dtype, device, layout=layout, v_layout=v_layout
    )
    expected = [t.clone() for t in (qkv, k_cache, v_cache, k_scale, v_scale)]
    _, _, v_ref = reference_rope_and_cache(
        expected[0], positions, cos_sin, expected[1], expected[2], slots, expected[3], expected[4]
    )
    rope_and_cache(qkv, positions, cos_sin, k_cache, v_cache, slots, k_scale, v_scale)
    # q and k rotated in place, within one step of qkv's dtype (bf16: 2^-8 relative) of the twin's rotation.
    rotation_tol = 1.6e-2 if dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(qkv, expected[0], rtol=rotation_tol, atol=rotation_tol)
    # k's scale comes from k as rotated and rounded to qkv's dtype, so it inherits that step.
    scale_tol = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(k_scale, expected[3], rtol=scale_tol, atol=0)
    torch.testing.assert_close(v_scale, expected[4], rtol=0, atol=0)
    # k's rows hold k as the kernel rotated it (in qkv, rounded to its dtype) through quantize_rows. Against
    # the twin's cache instead, a bf16 k near 0 can move many e4m3 steps: the twin rotates in three bf16
    # ops, whose rounding is absolute (of the operands' size), while e4m3's steps near 0 are 2^-9.
    num_q_heads, num_kv_heads = heads
    rotated_k = qkv.view(tokens, -1, head_dim)[:, num_q_heads : num_q_heads + num_kv_heads]
    want_k, want_k_scale = quantize_rows(rotated_k)
    got_k = select_blocks(k_cache.flatten(0, 1), slots)
    torch.testing.assert_close(k_scale.flatten(0, 1)[slots], want_k_scale, rtol=1e-6, atol=0)
    if not every_value:
        for got, want in ((got_k, want_k), (v_cache, expected[2])):
            same = got.view(torch.uint8) == want.view(torch.uint8)
            assert same.float().mean() > 0.8
        return
    assert_fp8_close(got_k, want_k)
    assert_fp8_close(v_cache, expected[2])
    # What the cache holds dequantizes to the rotated k (the kernel's) and the v of the new tokens.
    for cache, scales, new in ((k_cache, k_scale, rotated_k), (v_cache, v_scale, v_ref)):
        rows = select_blocks(cache.flatten(0, 1), slots)
        stored = dequantize(rows, scales.flatten(0, 1)[slots], torch.float32)
        torch.testing.assert_close(stored, new.float(), rtol=1 / 14, atol=scales.max().item() * 2**-9)
    written = torch.zeros(k_scale.numel() // heads[1], dtype=torch.bool, device=device)
    written[slots] = True
    rows = k_scale.flatten(0, 1)
    assert bool((rows[written] > 0).all()) and bool((rows[~written] == 0).all())


def test_writers_refuse_fp8_caches_without_scales_and_the_fused_epilogue():
    qkv, positions, cos_sin, (k_cache, v_cache), (k_scale, v_scale), slots = _rope_fp8_inputs(
        3, (4, 2), 64, 16, torch.float32, DEVICE
    )
    with pytest.raises(ValueError, match="need k_scale"):
        rope_and_cache(qkv, positions, cos_sin, k_cache, v_cache, slots)
    with pytest.raises(ValueError, match="v_scale must be a float32"):
        rope_and_cache(qkv, positions, cos_sin, k_cache, v_cache, slots, k_scale, v_scale[:, :1])
    with pytest.raises(ValueError, match="k_scale and v_scale must share strides"):
        rope_and_cache(qkv, positions, cos_sin, k_cache, v_cache, slots, k_scale, v_scale.contiguous())
    with pytest.raises(ValueError, match="scales are for float8_e4m3fn caches"):
        rope_and_cache(qkv, positions, cos_sin, k_cache.float(), v_cache.float(), slots, k_scale, v_scale)
    with pytest.raises(ValueError, match="of one shape and strides"):
        rope_and_cache(qkv, positions, cos_sin, k_cache.float(), slot_major(v_cache.float()), slots)
    weight = torch.zeros(qkv.shape[1], 32, device=DEVICE)
    with pytest.raises(ValueError, match="fp8 caches take rope_and_cache"):
        x = torch.zeros(3, 32, device=DEVICE)
        skinny_linear_rope(x, weight, None, positions, cos_sin, k_cache, v_cache, slots)


# -- the decode kernel --------------------------------------------------------------------------------
DECODE_CASES = [  # (lens, (Hq, Hkv), D, block size, dtype); grids forced small so outputs split
    ([1, 15, 16, 17, 63, 65, 128], (9, 3), 64, 16, torch.float16),
    ([300], (32, 8), 128, 16, torch.float16),
    ([5, 1, 200], (8, 2), 128, 1, torch.float32),
    ([70, 1], (4, 4), 64, 32, torch.float32),
    ([130, 64, 1], (16, 1), 64, 16, torch.float16),
    ([90, 33], (8, 2), 96, 16, torch.float16),
    # Half-precision q on slot-major V pages of 32 and 8 slots, one and eight query heads a KV head, and
    # D=256 (its own tile): the e4m3 products' other page sizes, groups and head dim.
    ([70, 1, 129], (4, 4), 64, 32, torch.float16),
    ([33, 8, 250], (8, 1), 64, 8, torch.float16),
    ([40, 257], (16, 2), 256, 16, torch.float16),
]


def _fp8_cache_inputs(lens, heads, head_dim, block_size, dtype, device, seed=0, v_layout="d-major"):
    """A random paged fp8 cache (rows of varied magnitude; V's pages of `v_layout`) with shuffled blocks,
    its scales, and q."""
    hq, hkv = heads
    gen = torch.Generator().manual_seed(seed)
    max_blocks = max(math.ceil(max(lens) / block_size), 1)
    num_blocks = len(lens) * max_blocks + 3
    shape = (num_blocks, block_size, hkv, head_dim)
    magnitude = torch.logspace(-1, 1, num_blocks * block_size * hkv).view(shape[:3])[..., None]
    k, k_scale = quantize_rows(torch.randn(shape, generator=gen) * magnitude)
    v, v_scale = quantize_rows(torch.randn(shape, generator=gen) * magnitude.flip(0))
    tables = torch.randperm(num_blocks, generator=gen)[: len(lens) * max_blocks].view(len(lens), max_blocks)
    q = torch.randn(len(lens), hq, head_dim, generator=gen).to(dtype)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    v = V_LAYOUTS[v_layout](v)
    return [t.to(device) for t in (q, k, v, tables.to(torch.int32), seq_lens, k_scale, v_scale)]


def _check_decode_fp8(lens, heads, head_dim, block_size, dtype, device, num_programs, v_layout="d-major"):
    q, k, v, bt, sl, ks, vs = _fp8_cache_inputs(
        lens, heads, head_dim, block_size, dtype, device, v_layout=v_layout
    )
    config = replace(launch_config(q, v), min_tiles=1)
    out = _launch(q, k, v, bt, sl, None, None, config, num_programs, k_scale=ks, v_scale=vs)
    expected = reference_decode_attention(q, k, v, bt, sl, k_scale=ks, v_scale=vs)
    # Probabilities times V's scale are rounded to q's dtype for the P @ V product (fp16: 1e-3 relative);
    # in e4m3 products q and those probabilities are two e4m3 terms each (~7 mantissa bits), within the
    # same bounds (interpreted: 3.9e-3 at most on outputs of magnitude up to ~10, 2e-3 of their norm).
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 4e-3, "rtol": 4e-3}
    if dtype == torch.bfloat16:
        tol = {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(out, expected, **tol)
    norm_tol = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1e-2}[dtype]
    assert float((out.float() - expected.float()).norm() / expected.float().norm()) < norm_tol


@pytest.mark.parametrize("v_layout", V_LAYOUTS)
@pytest.mark.parametrize(("lens", "heads", "head_dim", "block_size", "dtype"), DECODE_CASES)
def test_decode_kernel_fp8_matches_twin(lens, heads, head_dim, block_size, dtype, v_layout):
    """Slot-major V pages with an fp16 q take the e4m3 products (_attend_tile_e4m3), with an fp32 q the
    widening form reading V through its strides."""
    _check_decode_fp8(lens, heads, head_dim, block_size, dtype, DEVICE, num_programs=7, v_layout=v_layout)


def test_decode_kernel_e4m3_takes_a_bf16_query():
    """The engine's queries are bf16. The e4m3 form multiplies no bf16 operand (q goes to e4m3 through
    fp32), so unlike the other forms it is checked with a bf16 q on CPU too."""
    _check_decode_fp8([1, 17, 65, 128], (9, 3), 64, 16, torch.bfloat16, DEVICE, 7, v_layout="slot-major")


def test_readers_take_head_major_caches_and_scales():
    """K/V and their scales stored head-major (a head's page and its scales contiguous): the decode and
    prefill kernels read them through their strides and give the token-major cache's outputs
    (`bench_decode_attention.py --layouts` times the layouts)."""
    q, k, v, bt, sl, ks, vs = _fp8_cache_inputs([40, 1, 77], (8, 2), 64, 16, torch.float32, DEVICE)
    config = replace(_CONFIGS[64], min_tiles=1)
    heads = [head_major(t) for t in (k, v, ks, vs)]
    assert heads[2].stride() == (32, 1, 16)
    want = _launch(q, k, v, bt, sl, None, None, config, 5, k_scale=ks, v_scale=vs)
    got = _launch(q, heads[0], heads[1], bt, sl, None, None, config, 5, k_scale=heads[2], v_scale=heads[3])
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    q, k, v, cu, ctx, bt, ks, vs = _fp8_prefill_inputs(
        [(40, 9), (0, 7)], (8, 2), 64, 16, torch.float32, DEVICE
    )
    k_h, v_h, ks_h, vs_h = (head_major(t) for t in (k, v, ks, vs))
    want = prefill._launch(q, k, v, cu, ctx, bt, None, None, PREFILL_SMALL, ks, vs)
    got = prefill._launch(q, k_h, v_h, cu, ctx, bt, None, None, PREFILL_SMALL, ks_h, vs_h)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    twin = reference_prefill_attention(q, k_h, v_h, cu, ctx, bt, k_scale=ks_h, v_scale=vs_h)
    torch.testing.assert_close(
        twin, reference_prefill_attention(q, k, v, cu, ctx, bt, k_scale=ks, v_scale=vs)
    )


def test_decode_twin_fp8_is_the_twin_on_dequantized_caches():
    q, k, v, bt, sl, ks, vs = _fp8_cache_inputs([40, 1, 77], (8, 2), 64, 16, torch.float32, "cpu")
    got = reference_decode_attention(q, k, v, bt, sl, k_scale=ks, v_scale=vs)
    k32, v32 = dequantize(k, ks, torch.float32), dequantize(v, vs, torch.float32)
    torch.testing.assert_close(got, reference_decode_attention(q, k32, v32, bt, sl), rtol=0, atol=0)


def test_decode_refuses_fp8_without_scales():
    q, k, v, bt, sl, ks, vs = _fp8_cache_inputs([10], (4, 2), 64, 16, torch.float32, DEVICE)
    with pytest.raises(ValueError, match="need k_scale"):
        lean_attention_decode(q, k, v, bt, sl)
    with pytest.raises(ValueError, match="share a dtype"):
        lean_attention_decode(q, k.float(), v.float().half(), bt, sl)
    with pytest.raises(ValueError, match="slot-major pages"):  # only an fp8 V may be slot-major
        lean_attention_decode(q, k.float(), slot_major(v.float()), bt, sl)
    with pytest.raises(ValueError, match="slot-major pages"):  # nor any other layout
        lean_attention_decode(
            q, k, v.transpose(2, 3).contiguous().transpose(2, 3), bt, sl, k_scale=ks, v_scale=vs
        )


# -- the prefill kernel -------------------------------------------------------------------------------
PREFILL_CASES = [  # ((prefix, query_len) per chunk, (Hq, Hkv), D, block size, dtype)
    ([(0, 1)], (4, 1), 64, 16, torch.float16),
    ([(0, 19), (23, 1), (1, 33), (50, 8)], (8, 2), 64, 16, torch.float16),
    ([(77, 13), (0, 5)], (9, 3), 128, 8, torch.float32),
    ([(5, 20)], (4, 4), 96, 1, torch.float32),
]
# Small tiles keep the interpreter fast and still give chunks of several query and key tiles.
PREFILL_SMALL = prefill.PrefillConfig(block_m=32, block_n=16, num_warps=4, num_stages=1)


def _fp8_prefill_inputs(chunks, heads, head_dim, block_size, dtype, device, seed=0, v_layout="d-major"):
    """q for the chunks' tokens and a paged fp8 cache holding each sequence's prefix + chunk."""
    context_lens = [prefix + query for prefix, query in chunks]
    _, k, v, tables, lens, k_scale, v_scale = _fp8_cache_inputs(
        context_lens, heads, head_dim, block_size, dtype, device, seed, v_layout
    )
    gen = torch.Generator().manual_seed(seed + 1)
    num_tokens = sum(query for _, query in chunks)
    q = torch.randn(num_tokens, heads[0], head_dim, generator=gen).to(dtype).to(device)
    cu = torch.tensor([0, *torch.tensor([q for _, q in chunks]).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, cu.to(device), lens, tables, k_scale, v_scale


def _check_prefill_fp8(chunks, heads, head_dim, block_size, dtype, device, config, v_layout="d-major"):
    q, k, v, cu, ctx, bt, ks, vs = _fp8_prefill_inputs(
        chunks, heads, head_dim, block_size, dtype, device, v_layout=v_layout
    )
    out = prefill._launch(q, k, v, cu, ctx, bt, None, None, config, ks, vs)
    expected = reference_prefill_attention(q, k, v, cu, ctx, bt, k_scale=ks, v_scale=vs)
    # As in decode: probabilities times V's scale are rounded to q's dtype for the P @ V product, so a
    # row's error is at most that rounding (bf16: 2^-9 relative) times the largest |v| it averages; rows
    # with few keys (a chunk's first tokens) keep it, where decode's long rows average it out.
    tol = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}[dtype]
    atol = tol
    if dtype == torch.bfloat16:
        atol = 2**-8 * float(dequantize(v, vs, torch.float32).abs().max())
    torch.testing.assert_close(out, expected, atol=atol, rtol=tol)


@pytest.mark.parametrize("v_layout", V_LAYOUTS)
@pytest.mark.parametrize(("chunks", "heads", "head_dim", "block_size", "dtype"), PREFILL_CASES)
def test_prefill_kernel_fp8_matches_twin(chunks, heads, head_dim, block_size, dtype, v_layout):
    _check_prefill_fp8(chunks, heads, head_dim, block_size, dtype, DEVICE, PREFILL_SMALL, v_layout)


def test_prefill_kernel_fp8_at_the_shipped_tiles():
    """The D=128 tiles the engine runs (128 query rows x 128 keys) on an fp8 cache: a chunk after a
    prefix whose keys end inside a key tile, and a chunk of its own."""
    config = prefill._fitted(prefill._CONFIGS[128], 128, 2, torch.device(DEVICE))
    for v_layout in V_LAYOUTS:
        _check_prefill_fp8([(200, 70), (0, 3)], (8, 2), 128, 16, torch.float16, DEVICE, config, v_layout)


def test_prefill_twin_fp8_is_the_twin_on_dequantized_caches():
    q, k, v, cu, ctx, bt, ks, vs = _fp8_prefill_inputs(
        [(40, 9), (0, 7)], (8, 2), 64, 16, torch.float32, "cpu"
    )
    got = reference_prefill_attention(q, k, v, cu, ctx, bt, k_scale=ks, v_scale=vs)
    k32, v32 = dequantize(k, ks, torch.float32), dequantize(v, vs, torch.float32)
    torch.testing.assert_close(got, reference_prefill_attention(q, k32, v32, cu, ctx, bt), rtol=0, atol=0)


def test_prefill_refuses_fp8_without_scales():
    q, k, v, cu, ctx, bt, ks, _ = _fp8_prefill_inputs([(3, 4)], (4, 2), 64, 16, torch.float32, DEVICE)
    with pytest.raises(ValueError, match="need v_scale"):
        prefill.prefill_attention(q, k, v, cu, ctx, bt, k_scale=ks)


# -- the cache, its capacity and the option -----------------------------------------------------------
def _config(tmp_path: Path, layers=2, kv_heads=8, head_dim=128) -> ModelConfig:
    (tmp_path / "config.json").write_text(
        '{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, '
        f'"intermediate_size": 64, "num_hidden_layers": {layers}, "num_attention_heads": 32, '
        f'"num_key_value_heads": {kv_heads}, "head_dim": {head_dim}, "vocab_size": 100, '
        '"max_position_embeddings": 128}'
    )
    return ModelConfig.from_dir(tmp_path)


def test_cache_copies_scales_and_counts_them_in_its_bytes(tmp_path):
    """copy_blocks copies a block's K, V and scales in every layer, as the per-layer views show them, and
    nothing else; the scales are head-major like K and V (a head's block_size scales contiguous)."""
    config = _config(tmp_path)
    cache = KVCache(config, 4, 16, FP8, "cpu")
    assert cache.quantized and cache.k[1].shape == (4, 16, 8, 128) and cache.k_scale[1].shape == (4, 16, 8)
    assert cache.k_scale[1].stride() == cache.v_scale[0].stride() == (8 * 16, 1, 16)
    gen = torch.Generator().manual_seed(0)
    views = [*cache.k, *cache.v, *cache.k_scale, *cache.v_scale]
    for view in views:  # block 1 of every layer's K, V and scales: its own random values
        view[1] = torch.randn(view.shape[1:], generator=gen).to(view.dtype)
    bits = [view.view(torch.uint8) if view.dtype == FP8 else view for view in views]
    source = [b[1].clone() for b in bits]
    cache.copy_blocks([(1, 3)])
    for b, src in zip(bits, source, strict=True):
        assert torch.equal(b[3], src) and torch.equal(b[1], src) and (src != 0).any()
        assert not b[0].any() and not b[2].any()
    allocated = cache.data.numel() * cache.data.element_size() + cache.scales.numel() * 4
    assert KVCache.bytes_per_block(config, 16, FP8) * 4 == allocated


def test_cache_stores_v_slot_major_under_its_switch(tmp_path, monkeypatch):
    """FP8_V_SLOT_MAJOR: an fp8 cache's V views have slot-major pages of the same storage (K's views and
    a bf16 cache's unchanged), a row written at a slot reads back there, and copy_blocks copies them."""
    config = _config(tmp_path)
    monkeypatch.setattr(kv_cache, "FP8_V_SLOT_MAJOR", True)
    cache = KVCache(config, 4, 16, FP8, "cpu")
    assert cache.v[1].shape == (4, 16, 8, 128) and cache.v[1].stride() == (8 * 128 * 16, 1, 128 * 16, 16)
    assert cache.k[1].stride() == (8 * 16 * 128, 128, 16 * 128, 1)
    assert KVCache(config, 4, 16, torch.bfloat16, "cpu").v[1].stride() == cache.k[1].stride()
    row, _ = quantize_rows(torch.randn(1, 8, 128))
    slot = torch.tensor([2 * 16 + 5])
    store_slots(cache.v[1], slot, row)
    assert torch.equal(cache.v[1][2, 5].view(torch.uint8), row[0].view(torch.uint8))
    page = cache.data[1, 1, 2, 3].view(torch.uint8).view(128, 16)  # block 2, KV head 3: [D, block_size]
    assert torch.equal(page[:, 5], row[0, 3].view(torch.uint8)) and int(page[:, 4].count_nonzero()) == 0
    cache.copy_blocks([(2, 0)])
    assert torch.equal(cache.v[1][0, 5].view(torch.uint8), row[0].view(torch.uint8))


@pytest.mark.parametrize("head_dim", [64, 128])
def test_fp8_cache_holds_twice_the_tokens_in_the_same_memory(tmp_path, monkeypatch, head_dim):
    """num_kv_blocks on a (pretend) 80 GB card: the fp8 cache gets ~2x the blocks of the bf16 one, less
    the scales' share (4 bytes a row of D bytes)."""
    config = _config(tmp_path, layers=32, head_dim=head_dim)
    model = type("Model", (), {"config": config, "tp_size": 1})()
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (64 << 30, 80 << 30))
    engine = EngineConfig()
    bf16 = engine_setup.num_kv_blocks(engine, model, torch.bfloat16, torch.device("cuda"))
    fp8 = engine_setup.num_kv_blocks(engine, model, FP8, torch.device("cuda"))
    assert fp8 / bf16 == pytest.approx(2 * head_dim / (head_dim + 4), rel=1e-3)
    assert fp8 / bf16 > 1.88


def test_kv_cache_dtype_option(monkeypatch):
    from leanserve.server.api.settings import parse_settings

    assert EngineConfig().kv_cache_dtype == "auto"
    assert parse_settings(["--kv-cache-dtype", "fp8"]).engine_config().kv_cache_dtype == "fp8"
    monkeypatch.setenv("LEANSERVE_KV_CACHE_DTYPE", "bf16")
    assert parse_settings([]).engine_config().kv_cache_dtype == "bf16"
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        EngineConfig(kv_cache_dtype="int8")
    cpu = torch.device("cpu")
    assert resolve_kv_cache_dtype("auto", torch.float32, cpu) == torch.float32
    assert resolve_kv_cache_dtype("fp8", torch.float32, cpu) == FP8
    with pytest.raises(ValueError, match="bf16 needs dtype bfloat16"):
        resolve_kv_cache_dtype("bf16", torch.float32, cpu)


# -- the model: prefill over cached fp8 pages, decode, greedy agreement --------------------------------
@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_model_fp8_cache_is_the_quantized_values(tiny_model_factory, monkeypatch, kind):
    """Chunked prefill (gathers cached fp8 pages) and batched decode of the tiny models (fp32) with an
    fp8 cache give the tokens and logits of an fp32 cache whose writer rounds every row through
    quantize_rows: the fp8 cache is read where it is written, with its scales, and nothing else differs."""
    _check_model_reads_quantized_values(tiny_model_factory(kind), DEVICE, monkeypatch)


def test_model_fp8_cache_with_slot_major_v_is_the_quantized_values(tiny_model_factory, monkeypatch):
    """The same with V's pages slot-major (kv_cache.FP8_V_SLOT_MAJOR): written and read through V's
    strides, the model's tokens and logits do not change."""
    monkeypatch.setattr(kv_cache, "FP8_V_SLOT_MAJOR", True)
    _check_model_reads_quantized_values(tiny_model_factory("llama"), DEVICE, monkeypatch)


@gpu
@pytest.mark.gpu
def test_gpu_model_fp8_cache_is_the_quantized_values(tiny_model_factory, monkeypatch):
    """The same on the GPU: the Triton writer and decode kernel in the model (fp32, so the products stay
    cuBLAS's and the unquantized run writes through the patched op too)."""
    _check_model_reads_quantized_values(tiny_model_factory("llama3"), "cuda", monkeypatch)


def _check_model_reads_quantized_values(path, device, monkeypatch):
    model = load_model(path, torch.float32, device)
    prompts = [[5, 300, 41, 9000, 12, 7, 88, 1000, 3], [77, 8, 1200, 15]]

    def run(cache_dtype):
        runner = GreedyRunner(model, cache_dtype=cache_dtype)
        return runner.generate(prompts, new_tokens=6, chunk=4, stagger=1), runner.last_logits

    tokens, logits = run(FP8)
    write = ops.rope_and_cache

    def write_quantized(qkv, positions, cos_sin, k_cache, v_cache, slots, k_scale=None, v_scale=None):
        q, k, v = write(qkv, positions, cos_sin, k_cache, v_cache, slots)
        for cache in (k_cache, v_cache):
            rows = cache.flatten(0, 1)[slots]
            store_slots(cache, slots, dequantize(*quantize_rows(rows), cache.dtype))
        return q, k, v

    monkeypatch.setattr(ops, "rope_and_cache", write_quantized)
    expected_tokens, expected_logits = run(None)
    assert tokens == expected_tokens
    # On the GPU a value may round to the neighbouring e4m3 step (the kernel's fp32 division).
    tol = 1e-4 if device == "cpu" else 2e-2
    torch.testing.assert_close(logits, expected_logits, rtol=tol, atol=tol)


def _accuracy_script():
    spec = importlib.util.spec_from_file_location(
        "kv_fp8_accuracy", ROOT / "benchmarks" / "kv_fp8_accuracy.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while they are defined
    spec.loader.exec_module(module)
    return module


def test_greedy_agreement_with_bf16_cache(monkeypatch):
    """The embedded model (bf16, CPU) through the engine with `--kv-cache-dtype fp8` against its bf16
    cache, teacher-forced over the first 64 greedy tokens of two fixed prompts, every key read from the
    cache (the paged prefill path, as decode steps read them): the same argmax at >= 90% of the positions
    that read the cache. A regression guard, not issue 28's target (>= 95% over the
    whole prompt set), which sits near its margin and moves with the CPU's bf16 arithmetic (95.2% and
    97.7% on two machines): benchmarks/kv_fp8_accuracy.py measures it (docs/kernel_notes.md, FP8 KV
    cache)."""
    monkeypatch.setattr(attention, "SDPA_PREFILL", False)
    accuracy = _accuracy_script()
    prompts = accuracy.tokenize(None, accuracy.PROMPTS[:2])
    result = accuracy.compare(None, "bfloat16", DEVICE, 64, prompts, free_running=False)
    assert result.forced_positions >= 2 * (64 - accuracy.CHUNK)
    assert result.forced_agreement >= 0.9, result
    assert result.mean_abs_dlogprob < 0.1, result


# -- GPU: the kernels compiled, bf16 ------------------------------------------------------------------
@gpu
@pytest.mark.gpu
@pytest.mark.parametrize(
    ("tokens", "heads", "head_dim", "block_size"),
    [(1, (32, 8), 128, 16), (2048, (32, 8), 128, 16), (33, (9, 3), 64, 16)],
)
def test_gpu_rope_and_cache_fp8(tokens, heads, head_dim, block_size):
    _check_rope_fp8(tokens, heads, head_dim, block_size, torch.bfloat16, "cuda")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("v_layout", V_LAYOUTS)
@pytest.mark.parametrize(("lens", "heads", "head_dim", "block_size", "dtype"), DECODE_CASES)
@pytest.mark.parametrize("num_programs", [None, 3, 37])
def test_gpu_decode_kernel_fp8(lens, heads, head_dim, block_size, dtype, num_programs, v_layout):
    _check_decode_fp8(lens, heads, head_dim, block_size, torch.bfloat16, "cuda", num_programs, v_layout)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("v_layout", V_LAYOUTS)
def test_gpu_decode_fp8_long_context_in_a_graph(v_layout):
    """B=2 with 100k and 3k tokens, replayed in a CUDA graph with new lengths."""
    q, k, v, bt, sl, ks, vs = _fp8_cache_inputs(
        [100_000, 3000], (32, 8), 128, 16, torch.bfloat16, "cuda", v_layout=v_layout
    )
    out = torch.empty_like(q)
    lean_attention_decode(q, k, v, bt, sl, out=out, k_scale=ks, v_scale=vs)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        lean_attention_decode(q, k, v, bt, sl, out=out, k_scale=ks, v_scale=vs)
    for lens in ([100_000, 3000], [5, 77_777]):
        sl.copy_(torch.tensor(lens, dtype=torch.int32))
        graph.replay()
        expected = reference_decode_attention(q, k, v, bt, sl, k_scale=ks, v_scale=vs)
        torch.testing.assert_close(out, expected, atol=2e-2, rtol=2e-2)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize(
    "chunks", [[(0, 2048)], [(2048, 2048)], [(1, 300), (0, 1000), (4000, 1), (777, 129)]], ids=str
)
@pytest.mark.parametrize(("heads", "head_dim"), [((32, 8), 128), ((16, 2), 256), ((12, 4), 96)])
@pytest.mark.parametrize("v_layout", V_LAYOUTS)
def test_gpu_prefill_kernel_fp8(chunks, heads, head_dim, v_layout):
    config = prefill._fitted(prefill._CONFIGS[head_dim], head_dim, 2, torch.device("cuda"))
    _check_prefill_fp8(chunks, heads, head_dim, 16, torch.bfloat16, "cuda", config, v_layout)
