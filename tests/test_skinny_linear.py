"""The skinny decode matrix product against its twin F.linear (interpreted on CPU, compiled on GPU):
ragged N and K, 1..64 rows (every tile shape) with any leading shape, bias, guard pages, validation, the
product with rope_and_cache in its epilogue against the twins, the model with the kernel in its linear
layers (CPU, interpreted), and on GPU: Llama-3-8B's and the default model's projections in bf16 and a
CUDA-graph replay."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from greedy_runner import GreedyRunner
from guard_page import against_guard_page
from test_fused_ops import CACHE_LAYOUTS, MAX_POS, cos_sin_table

from leanserve.kernels.activation import reference_silu_and_mul, silu_and_mul
from leanserve.kernels.rotary import reference_rope_and_cache, rope_and_cache
from leanserve.kernels.skinny_config import SKINNY_MAX_ROWS, skinny_config
from leanserve.kernels.skinny_fused import (
    fuses_rope,
    fuses_silu,
    skinny_linear_residual,
    skinny_linear_rope,
    skinny_linear_silu,
)
from leanserve.kernels.skinny_linear import reference_skinny_linear, skinny_linear
from leanserve.kernels.stream_norm import StreamNorm
from leanserve.models import layers as model_layers
from leanserve.models import llama as model_llama
from leanserve.models.loader import load_model

# Tests pretend other SM counts and shared-memory sizes by patching what the tile rules read.
config_module = importlib.import_module("leanserve.kernels.skinny_config")

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
TOLERANCES = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _inputs(rows: int, n: int, k: int, dtype: torch.dtype, device: str, bias: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=gen)
    w = torch.randn(n, k, generator=gen) / k**0.5
    b = torch.randn(n, generator=gen) if bias else None
    return (t.to(dtype=dtype, device=device) if t is not None else None for t in (x, w, b))


def _expected(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """fp32 product, rounded once to the inputs' dtype (as the kernel's fp32 accumulator is)."""
    return F.linear(x.float(), w.float(), b.float() if b is not None else None).to(x.dtype)


@pytest.mark.parametrize(
    ("rows", "n", "k", "bias", "dtype", "block_n"),
    [
        (1, 64, 512, False, torch.float32, 32),  # K a multiple of the K tile: the unmasked loop
        (3, 50, 200, True, torch.float16, 32),  # ragged N and K, bias
        (16, 33, 300, False, torch.bfloat16, 32),  # the 16-row tile full; K over one tile + a ragged rest
        (17, 130, 200, True, torch.float16, 128),  # 32-row tile, W's rows on the MMA's M side, ragged N
        (64, 40, 300, True, torch.float32, 64),  # the most rows
    ],
)
def test_matches_fp32_product(rows, n, k, bias, dtype, block_n, monkeypatch):
    # Past 16 rows the W tile depends on the SM count: pretend one SM (128 rows of W a program) or very
    # many (64), so each tile shape runs on any device.
    monkeypatch.setattr(config_module, "sm_count", lambda device: 1 if block_n == 128 else 1 << 20)
    config = skinny_config(rows, n, k, dtype.itemsize, dtype.itemsize, torch.device(DEVICE))
    assert (config.block_n, config.programs) == (block_n, None)
    x, w, b = _inputs(rows, n, k, dtype, DEVICE, bias)
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(skinny_linear(x, w, b), _expected(x, w, b), atol=tol, rtol=tol)


def test_config_stages_follow_row_length_and_fit_shared_memory(monkeypatch):
    monkeypatch.setattr(config_module, "sm_count", lambda device: 132)
    monkeypatch.setattr(config_module, "max_shared_memory", lambda device: 232448)  # an H100's
    cpu = torch.device("cpu")
    assert skinny_config(1, 4096, 14336, 2, 2, cpu).num_stages == 5  # the down projection: long rows of W
    assert skinny_config(1, 6144, 4096, 2, 2, cpu).num_stages == 4  # q/k/v
    assert skinny_config(1, 4096, 14336, 4, 4, cpu).num_stages == 4  # fp32: 5 stages of 48 KB do not fit
    assert skinny_config(64, 6144, 4096, 4, 4, cpu).num_stages == 3  # nor 4 of 64 KB


def test_w8a8_config_streams_gate_up_past_16_rows_in_shorter_stages():
    """The W8A8 tiles of bench_fp8_linear.py --tune: 64 rows of W x 256 columns in 5 stages, 128-column
    stages for gate/up (N = 7 K) past 16 rows; x's rows pad to a 16-row MMA."""
    cpu = torch.device("cpu")
    for rows, n, k, block_m, block_k in [
        (1, 6144, 4096, 16, 256),
        (16, 28672, 4096, 16, 256),
        (17, 28672, 4096, 32, 128),
        (64, 28672, 4096, 64, 128),
        (64, 4096, 14336, 64, 256),
    ]:
        c = skinny_config(rows, n, k, 1, 1, cpu)
        assert (c.block_m, c.block_n, c.block_k, c.num_stages, c.swap) == (block_m, 64, block_k, 5, True)


def test_w8a8_tiles_past_16_rows_fill_the_sms(monkeypatch):
    """On 132 SMs, past 16 rows, o and down (N = 4096: 64 tiles of 64 rows) take 32 rows of W a program
    with x's rows on the M side (down, whose rows are longer, 512 columns in 4 stages); q/k/v (96 tiles)
    and everything at <= 16 rows keep the 64-row tiles."""
    monkeypatch.setattr(config_module, "sm_count", lambda device: 132)
    cpu = torch.device("cpu")
    for rows, n, k, want in [
        (64, 4096, 4096, (64, 32, 256, 5, False)),  # o
        (17, 4096, 14336, (32, 32, 512, 4, False)),  # down
        (64, 6144, 4096, (64, 64, 256, 5, True)),  # q/k/v
        (16, 4096, 4096, (16, 64, 256, 5, True)),
    ]:
        c = skinny_config(rows, n, k, 1, 1, cpu)
        assert (c.block_m, c.block_n, c.block_k, c.num_stages, c.swap) == want, (rows, n, k)
    assert skinny_config(64, 4096, 4096, 1, 1, cpu, persistent=False).swap  # an epilogue's product


@pytest.mark.parametrize(
    ("rows", "n", "k", "bias", "dtype"),
    [
        (1, 600, 700, True, torch.float16),  # 19 blocks on 8 programs: runs of 2 and 3; ragged N and K
        (16, 1024, 1024, False, torch.bfloat16),  # 4 blocks a program, K a multiple of the K tile
        (5, 700, 300, True, torch.float32),  # fp32 takes half as many columns a stage
    ],
)
def test_persistent_grid_matches_fp32_product(rows, n, k, bias, dtype, monkeypatch):
    # With 8 SMs a matrix of 16-128 blocks of 32 rows is streamed by 8 programs, several blocks each.
    monkeypatch.setattr(config_module, "sm_count", lambda device: 8)
    config = skinny_config(rows, n, k, dtype.itemsize, dtype.itemsize, torch.device(DEVICE))
    assert (config.programs, config.block_k) == (8, 1024 // dtype.itemsize)
    x, w, b = _inputs(rows, n, k, dtype, DEVICE, bias)
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(skinny_linear(x, w, b), _expected(x, w, b), atol=tol, rtol=tol)


def test_leading_dims_and_strided_rows():
    x, w, b = _inputs(6, 40, 96, torch.float32, DEVICE, bias=True)
    x3 = x.view(2, 3, 96)
    got = skinny_linear(x3, w, b)
    assert got.shape == (2, 3, 40)
    torch.testing.assert_close(got, reference_skinny_linear(x3, w, b))
    wide = torch.zeros(6, 128, device=DEVICE)
    wide[:, :96] = x
    torch.testing.assert_close(skinny_linear(wide[:, :96], w), F.linear(x, w))  # row stride 128


@pytest.mark.skipif(HAS_CUDA, reason="guard pages catch accesses of the interpreted kernels on CPU")
@pytest.mark.parametrize(
    ("rows", "sms"),
    [(5, 1 << 20), (5, 1), (40, 1)],  # a 16-row tile; the same on a persistent grid; W's rows swapped in
)
def test_touches_nothing_past_its_inputs(rows, sms, monkeypatch):
    monkeypatch.setattr(config_module, "sm_count", lambda device: sms)
    persistent = skinny_config(rows, 45, 280, 2, 2, torch.device("cpu")).programs is not None
    assert persistent == ((rows, sms) == (5, 1))
    x, w, b = (against_guard_page(t) for t in _inputs(rows, 45, 280, torch.float16, "cpu", bias=True))
    torch.testing.assert_close(skinny_linear(x, w, b), _expected(x, w, b), atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda a: a.update(x=a["x"].repeat(22, 1)), "at most 64 rows"),
        (lambda a: a.update(x=a["x"][:, :-1]), "to match weight"),
        (lambda a: a.update(weight=a["weight"].t()), "contiguous"),
        (lambda a: a.update(weight=a["weight"].double()), "share a dtype"),
        (lambda a: a.update(bias=a["weight"][0]), "bias must be"),
    ],
    ids=["rows", "k", "weight", "dtype", "bias"],
)
def test_validation_errors(mutate, message):
    x, w, b = _inputs(3, 32, 64, torch.float32, DEVICE, bias=True)
    args = {"x": x, "weight": w, "bias": b}
    mutate(args)
    with pytest.raises(ValueError, match=message):
        skinny_linear(**args)


# -- the product with rope_and_cache in its epilogue ------------------------------------------------
def _rope_inputs(
    rows: int,
    heads: tuple[int, int],
    head_dim: int,
    k: int,
    bias: bool,
    dtype: torch.dtype,
    block_size: int = 4,
    layout: str = "head-major",
):
    """x, weight, bias of a q/k/v projection and rope_and_cache's other arguments: ragged positions,
    shuffled slots in caches of `layout` with spare blocks, filled with noise (so a stray write shows).
    Slot 0 is never used: padded rows of x would hit it (their slot loads as 0) if they stored anything."""
    hq, hkv = heads
    x, w, b = _inputs(rows, (hq + 2 * hkv) * head_dim, k, dtype, DEVICE, bias)
    gen = torch.Generator().manual_seed(1)
    positions = torch.randint(0, MAX_POS, (rows,), generator=gen)
    num_blocks = rows // block_size + 3
    slots = 1 + torch.randperm(num_blocks * block_size - 1, generator=gen)[:rows]
    shape = (num_blocks, block_size, hkv, head_dim)
    lay_out = CACHE_LAYOUTS[layout]
    k_cache, v_cache = (lay_out(torch.randn(shape, generator=gen).to(DEVICE, dtype)) for _ in range(2))
    table = cos_sin_table(head_dim, dtype, DEVICE)
    rope = (positions.to(DEVICE), table, k_cache, v_cache, slots.to(DEVICE))
    return x, w, b, rope


@pytest.mark.parametrize(
    ("rows", "heads", "head_dim", "k", "bias", "dtype", "block_n", "cache"),
    [  # cache: (block size, layout); the engine's is head-major, the epilogue takes any strides
        (1, (4, 2), 64, 200, True, torch.float32, 32, (16, "head-major")),  # skinny_linear: persistent
        (3, (4, 2), 128, 300, False, torch.bfloat16, 32, (1, "token-major")),  # 4 programs a head
        (17, (4, 2), 128, 200, True, torch.float16, 128, (4, "head-major")),  # W's rows on the M side
        (17, (3, 1), 64, 256, False, torch.bfloat16, 64, (16, "head-major")),  # 64-row swapped tile
        (40, (4, 2), 64, 256, True, torch.bfloat16, 64, (16, "token-major")),  # 64 rows, 24 of them padding
    ],
)
def test_rope_epilogue_matches_twins(rows, heads, head_dim, k, bias, dtype, block_n, cache, monkeypatch):
    monkeypatch.setattr(config_module, "sm_count", lambda device: 1 if block_n != 64 else 1 << 20)
    x, w, b, rope = _rope_inputs(rows, heads, head_dim, k, bias, dtype, *cache)
    assert fuses_rope(x, w, head_dim)
    config = skinny_config(
        rows, *w.shape, dtype.itemsize, dtype.itemsize, torch.device(DEVICE), persistent=False
    )
    assert (config.block_n, config.programs) == (block_n, None)
    positions, table, k_cache, v_cache, slots = rope
    expected = F.linear(x.float(), w.float(), b.float() if bias else None)
    k_expected, v_expected = k_cache.float(), v_cache.float()
    reference_rope_and_cache(expected, positions, table.float(), k_expected, v_expected, slots)

    two_launches = skinny_linear(x, w, b)  # the unfused path, on copies of the caches
    k_unfused, v_unfused = k_cache.clone(), v_cache.clone()
    rope_and_cache(two_launches, positions, table, k_unfused, v_unfused, slots)

    qkv = skinny_linear_rope(x, w, b, *rope)
    tol = TOLERANCES[dtype]  # the product rounded, then the rotation rounded: within that of fp32 throughout
    torch.testing.assert_close(qkv, expected.to(dtype), atol=2 * tol, rtol=2 * tol)
    # The epilogue rotates what the product stored, as rope_and_cache reads it: the same bits where the
    # plain product runs the same grid (the persistent one sums in another order: fp32 rounding apart).
    same_grid = skinny_config(rows, *w.shape, dtype.itemsize, dtype.itemsize, torch.device(DEVICE)) == config
    exact = 0 if same_grid else TOLERANCES[torch.float32]
    torch.testing.assert_close(qkv, two_launches, atol=exact, rtol=exact)
    torch.testing.assert_close(k_cache, k_unfused, atol=exact, rtol=exact)
    torch.testing.assert_close(v_cache, v_unfused, atol=exact, rtol=exact)
    written = torch.zeros(k_cache.shape[0] * k_cache.shape[1], dtype=torch.bool, device=DEVICE)
    written[slots] = True
    k_slots, v_slots = k_cache.flatten(0, 1), v_cache.flatten(0, 1)
    torch.testing.assert_close(
        k_slots[slots], k_expected.flatten(0, 1)[slots].to(dtype), atol=2 * tol, rtol=2 * tol
    )
    assert torch.equal(k_slots[~written], k_expected.flatten(0, 1)[~written].to(dtype))  # untouched
    assert torch.equal(v_slots[~written], v_expected.flatten(0, 1)[~written].to(dtype))


@pytest.mark.parametrize(
    ("rows", "head_dim", "sms", "fused"),
    [
        (1, 64, 1, True),  # a 32-row tile: 16 pairs of a 32-pair half
        (16, 32, 1, True),  # the smallest head a 32-row tile fits
        (16, 16, 1, False),
        (17, 64, 1 << 20, True),  # the 64-row tile: a head a program
        (17, 64, 1, False),  # the 128-row tile holds 64 pairs, a head only 32
        (64, 128, 1, True),
        (65, 128, 1, False),  # past the kernel's rows
    ],
)
def test_fuses_rope_where_a_tile_holds_whole_pairs_of_one_head(rows, head_dim, sms, fused, monkeypatch):
    monkeypatch.setattr(config_module, "sm_count", lambda device: sms)
    x = torch.empty(rows, 64, device=DEVICE)
    assert fuses_rope(x, torch.empty(8 * head_dim, 64, device=DEVICE), head_dim) == fused
    assert not fuses_rope(x, torch.empty(8 * head_dim + 2, 64, device=DEVICE), head_dim)  # not whole heads


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda a: a.update(x=a["x"][None]), r"x must be \[T, K\]"),
        (lambda a: a.update(x=a["x"][:, :-1]), "to match weight"),
        (lambda a: a.update(weight=a["weight"][:256], bias=a["bias"][:256]), "qkv must be"),  # no q heads
        (lambda a: a.update(k_cache=a["k_cache"].half()), "share a dtype"),
        (lambda a: a.update(slot_mapping=a["slot_mapping"].int()), "slot_mapping must be"),
        (
            lambda a: a.update(
                x=a["x"].repeat(6, 1),
                positions=a["positions"].repeat(6),
                slot_mapping=a["slot_mapping"].repeat(6),
            ),
            "no fused rope",
        ),
    ],
    ids=["x-dims", "k", "heads", "cache-dtype", "slots-dtype", "tile"],
)
def test_rope_validation_errors(mutate, message, monkeypatch):
    monkeypatch.setattr(config_module, "sm_count", lambda device: 1)  # 18 rows: the 128-row tile
    x, w, b, rope = _rope_inputs(3, (4, 2), 64, 64, True, torch.float32)
    names = ("positions", "cos_sin", "k_cache", "v_cache", "slot_mapping")
    args = {"x": x, "weight": w, "bias": b} | dict(zip(names, rope, strict=True))
    mutate(args)
    with pytest.raises(ValueError, match=message):
        skinny_linear_rope(**args)


@pytest.mark.parametrize(
    ("rows", "inter", "k", "dtype", "block_n"),
    [
        (17, 128, 200, torch.float32, 128),  # 128 rows of W a program: 64 gate + 64 up rows; ragged K
        (40, 96, 64, torch.bfloat16, 64),  # 64 rows of W a program, I three tiles of 32 columns
    ],
)
def test_silu_epilogue_matches_twins(rows, inter, k, dtype, block_n, monkeypatch):
    monkeypatch.setattr(config_module, "sm_count", lambda device: 1 if block_n == 128 else 1 << 20)
    x, w, _ = _inputs(rows, 2 * inter, k, dtype, DEVICE, bias=False)
    assert fuses_silu(x, w)
    assert (
        skinny_config(rows, 2 * inter, k, dtype.itemsize, dtype.itemsize, torch.device(DEVICE)).block_n
        == block_n
    )
    act = skinny_linear_silu(x, w)
    expected = reference_silu_and_mul(F.linear(x.float(), w.float()))
    tol = TOLERANCES[dtype]  # the product rounded, then silu and the product: within that of fp32
    torch.testing.assert_close(act, expected.to(dtype), atol=2 * tol, rtol=2 * tol)
    # The epilogue reads back what the product stored, as silu_and_mul does: the two launches' bits on
    # the GPU. The interpreter's dot products go through numpy's BLAS, whose summation order depends on
    # the tile's shape and the CPU (AVX2 and AVX-512 differ), so there one fp32 rounding may move.
    exact = 0 if HAS_CUDA else 1e-6
    torch.testing.assert_close(act, silu_and_mul(skinny_linear(x, w)), atol=exact, rtol=exact)


@pytest.mark.parametrize(
    ("rows", "n", "sms", "fused"),
    [
        (16, 256, 1, False),  # up to 16 rows gate/up keeps its grid and the SiLU launch
        (17, 256, 1, True),  # 128 rows of W a program: I = 128 holds whole 64-column halves
        (17, 192, 1, False),  # I = 96 does not
        (17, 192, 1 << 20, True),  # 64 rows of W a program: 32-column halves
        (64, 256, 1, True),
        (65, 256, 1, False),  # past the kernel's rows
        (17, 257, 1, False),  # no gate || up split
    ],
)
def test_fuses_silu_where_a_tile_holds_gate_and_up_of_its_columns(rows, n, sms, fused, monkeypatch):
    monkeypatch.setattr(config_module, "sm_count", lambda device: sms)
    assert fuses_silu(torch.empty(rows, 64, device=DEVICE), torch.empty(n, 64, device=DEVICE)) == fused


def test_silu_validation_errors():
    x, w, _ = _inputs(17, 256, 64, torch.float32, DEVICE, bias=False)
    with pytest.raises(ValueError, match="no fused SiLU"):
        skinny_linear_silu(x[:16], w)
    with pytest.raises(ValueError, match="no fused SiLU"):
        skinny_linear_silu(x[None], w)
    with pytest.raises(ValueError, match="to match weight"):
        skinny_linear_silu(x[:, 1:], w)


@pytest.mark.parametrize(
    ("rows", "n", "k", "dtype", "sms"),
    [
        (3, 50, 200, torch.float32, 1),  # 16-row tile, ragged N and K
        (2, 256, 64, torch.bfloat16, 1),  # 8 blocks of W: 8 rows of partial sums
        (20, 130, 64, torch.float16, 1),  # W's rows on the MMA's M side
    ],
)
def test_residual_epilogue_then_stream_norm(rows, n, k, dtype, sms, monkeypatch):
    """A product adds itself to the residual stream and sums the squares (the o projection); the next
    product (gate/up) scales by 1 / rms from them: together, the norm kernel between them."""
    monkeypatch.setattr(config_module, "sm_count", lambda device: sms)
    x, w, _ = _inputs(rows, n, k, dtype, DEVICE, bias=False)
    residual = torch.randn(rows, n, generator=torch.Generator().manual_seed(5)).to(dtype=dtype, device=DEVICE)
    stream, squares = skinny_linear_residual(x, w, residual)
    # The stream as fused_add_rms_norm rounds it: the product to the dtype, then the sum.
    want = (_expected(x, w, None).float() + residual.float()).to(dtype)
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(stream, want, atol=2 * tol, rtol=2 * tol)
    assert squares.shape == (
        -(-n // skinny_config(rows, n, k, dtype.itemsize, dtype.itemsize, torch.device(DEVICE)).block_n),
        rows,
    )
    torch.testing.assert_close(squares.sum(0), stream.float().square().sum(1), rtol=1e-5, atol=1e-5)

    w_next = (torch.randn(96, n, generator=torch.Generator().manual_seed(6)) / n**0.5).to(
        dtype=dtype, device=DEVICE
    )
    normed = F.rms_norm(stream.float(), (n,), None, 1e-5)
    got = skinny_linear(stream, w_next, norm=StreamNorm(squares, 1e-5))
    torch.testing.assert_close(got, F.linear(normed, w_next.float()).to(dtype), atol=2 * tol, rtol=2 * tol)


@pytest.mark.skipif(HAS_CUDA, reason="the GPU tests of test_models.py run the model's kernels natively")
def test_model_with_kernel_matches_twin(tiny_model_factory, monkeypatch):
    """The CPU model with the (interpreted) kernel in every linear layer of decode-sized steps: same
    greedy tokens and logits through chunked prefill and batched decode, so the kernel is wired in."""
    model = load_model(tiny_model_factory("qwen2"), torch.float32, "cpu")  # qwen2: the qkv bias
    prompts = [[5, 300, 41, 9000, 12, 7], [77, 8, 1200]]

    def run() -> tuple[list[list[int]], torch.Tensor]:
        runner = GreedyRunner(model)
        return runner.generate(prompts, new_tokens=2, chunk=4, stagger=1), runner.last_logits

    expected, expected_logits = run()
    calls = []
    monkeypatch.setattr(
        model_layers,
        "use_skinny_linear",
        lambda x, weight: calls.append(x.shape) or x.shape[0] <= SKINNY_MAX_ROWS,
    )
    fused = []  # q/k/v products that took RoPE and the cache write into their epilogue (<= 16 rows here)
    monkeypatch.setattr(
        model_layers,
        "skinny_linear_rope",
        lambda x, *rest, **kw: fused.append(x.shape) or skinny_linear_rope(x, *rest, **kw),
    )
    got, logits = run()
    assert calls and fused and got == expected
    torch.testing.assert_close(logits, expected_logits, rtol=1e-4, atol=1e-4)

    # The post-attention norm folded into gate/up and left to the o and gate/up products' epilogues.
    with torch.no_grad():
        for layer in model.layers:
            layer.fold_post_attention_norm()
    in_epilogue = []
    monkeypatch.setattr(
        model_llama,
        "skinny_linear_residual",
        lambda x, *rest: in_epilogue.append(x.shape) or skinny_linear_residual(x, *rest),
    )
    got, logits = run()
    assert in_epilogue and got == expected
    torch.testing.assert_close(logits, expected_logits, rtol=1e-4, atol=1e-4)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("num_seqs", [8, 40])
def test_gpu_bf16_model_decode_matches_cublas(num_seqs, tiny_model_factory, monkeypatch):
    """A bf16 decode step of 8 sequences (the post-attention norm in the o and gate/up epilogues) and of
    40 (64-row tiles with W's rows swapped in, the SiLU epilogue), with the qwen2 q/k/v bias: the logits
    with the kernel in the linear layers are as close to the fp32 model's as those with torch's products
    and the norm kernels (the epilogue norm rounds differently: it is not bit-identical to those)."""
    path = tiny_model_factory("qwen2")
    model = load_model(path, torch.bfloat16, "cuda")  # the norm folded into gate/up
    assert all(layer.post_attention_norm_folded for layer in model.layers)
    prompts = [[5 + i, 300, 41 + 7 * i] for i in range(num_seqs)]

    first_tokens = []

    def decode_logits() -> torch.Tensor:
        runner = GreedyRunner(model)
        tokens = runner.generate(prompts, new_tokens=2)  # one prefill step (cuBLASLt), one decode step
        first_tokens.append([t[0] for t in tokens])
        return runner.last_logits

    kernel_rows, silu_rows, stream_rows = [], [], []
    route = model_layers.use_skinny_linear

    def recording_route(x: torch.Tensor, weight: torch.Tensor) -> bool:
        if route(x, weight):
            kernel_rows.append(x.shape[0])
            return True
        return False

    monkeypatch.setattr(model_layers, "use_skinny_linear", recording_route)
    monkeypatch.setattr(
        model_layers,
        "skinny_linear_silu",
        lambda x, *rest: silu_rows.append(len(x)) or skinny_linear_silu(x, *rest),
    )
    monkeypatch.setattr(
        model_llama,
        "skinny_linear_residual",
        lambda x, *rest: stream_rows.append(len(x)) or skinny_linear_residual(x, *rest),
    )
    got = decode_logits()
    assert num_seqs in kernel_rows
    # 40 rows: the gate/up product took SiLU into its epilogue; 8: the o product added to the stream.
    assert (num_seqs in silu_rows, num_seqs in stream_rows) == (num_seqs == 40, num_seqs == 8)
    monkeypatch.setattr(model_layers, "use_skinny_linear", lambda x, w: False)
    unfused = decode_logits()
    assert first_tokens[0] == first_tokens[1]
    # The fp32 model's logits at the same positions: the prompts and their first tokens, prefilled.
    truth_runner = GreedyRunner(load_model(path, torch.float32, "cuda"))
    truth_runner.generate([[*p, t] for p, t in zip(prompts, first_tokens[0], strict=True)], new_tokens=1)
    truth = truth_runner.last_logits
    torch.testing.assert_close(got, unfused, atol=0.2, rtol=0.2)
    errors = float((got - truth).abs().max()), float((unfused - truth).abs().max())
    assert errors[0] <= 1.25 * errors[1], errors


# -- GPU: Llama-3-8B's projections, and the default model's (K = 576: the masked K loop), in bf16 -----
GPU_SHAPES = {
    "qkv": (6144, 4096),
    "o": (4096, 4096),
    "gate_up": (28672, 4096),
    "down": (4096, 14336),
    "smollm2-qkv": (960, 576),
    "smollm2-gate-up": (3072, 576),
}


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 16, 24, 64])
@pytest.mark.parametrize("name", list(GPU_SHAPES))
def test_gpu_projections(name, rows):
    n, k = GPU_SHAPES[name]
    x, w, _ = _inputs(rows, n, k, torch.bfloat16, "cuda", bias=False)
    torch.testing.assert_close(skinny_linear(x, w), _expected(x, w, None), atol=1.6e-2, rtol=1.6e-2)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("rows", [17, 64])
def test_gpu_silu_epilogue_llama3(rows):
    x, w, _ = _inputs(rows, *GPU_SHAPES["gate_up"], torch.bfloat16, "cuda", bias=False)
    act = skinny_linear_silu(x, w)
    torch.testing.assert_close(act, silu_and_mul(skinny_linear(x, w)), atol=0, rtol=0)
    expected = reference_silu_and_mul(F.linear(x.float(), w.float())).bfloat16()
    torch.testing.assert_close(act, expected, atol=3.2e-2, rtol=3.2e-2)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("rows", [8, 40])  # a 16-row tile; a 64-row one with W's rows swapped in; both biased
def test_gpu_replays_in_cuda_graph(rows):
    x, w, b = _inputs(rows, 4096, 4096, torch.bfloat16, "cuda", bias=True)
    skinny_linear(x, w, b)  # warm-up: compiles
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = skinny_linear(x, w, b)
    for seed in range(3):
        x.copy_(torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)))
        graph.replay()
        torch.testing.assert_close(y, _expected(x, w, b), atol=1.6e-2, rtol=1.6e-2)
