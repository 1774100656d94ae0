"""FP8 weights: row-wise quantization and its inverse, the skinny decode product reading FP8 W with its
scales in the epilogue (plain, persistent grid, RoPE + cache write, residual + norm statistics)
against the dequantizing twin over ragged shapes and 1..64 rows (interpreted on CPU, compiled on GPU),
validation, and on GPU the many-row W8A8 product (`torch._scaled_mm`)."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from greedy_runner import GreedyRunner
from test_fused_ops import MAX_POS, cos_sin_table
from test_kv_fp8 import assert_fp8_close

from leanserve.kernels.activation import (
    reference_silu_and_mul_fp8,
    silu_and_mul,
    silu_and_mul_fp8,
)
from leanserve.kernels.fp8 import (
    FP8,
    FP8_MAX,
    FP8Rows,
    dequantize,
    fp8_linear,
    quantize_activations,
    quantize_rows,
    quantize_rows_fused,
    reference_fp8_linear,
)
from leanserve.kernels.rms_norm import (
    fused_add_rms_norm,
    fused_add_rms_norm_fp8,
    reference_fused_add_rms_norm_fp8,
    reference_rms_norm_fp8,
    rms_norm,
    rms_norm_fp8,
)
from leanserve.kernels.rotary import reference_rope_and_cache
from leanserve.kernels.skinny_config import SkinnyConfig
from leanserve.kernels.skinny_fused import (
    fuses_rope,
    skinny_linear_residual,
    skinny_linear_rope,
)
from leanserve.kernels.skinny_linear import launch_skinny, skinny_linear, skinny_linear_w8a8
from leanserve.models import layers as model_layers
from leanserve.models.loader import load_model

config_module = importlib.import_module("leanserve.kernels.skinny_config")
skinny_linear_module = importlib.import_module("leanserve.kernels.skinny_linear")
skinny_fused_module = importlib.import_module("leanserve.kernels.skinny_fused")
fp8_module = importlib.import_module("leanserve.kernels.fp8")
llama_module = importlib.import_module("leanserve.models.llama")

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
# Against the fp32 product of x and the dequantized W: the FP8 W is exact in every dtype, so only x's
# rounding and the output's remain (bf16 tl.dot is wrong in the interpreter: bf16 runs on GPU only).
TOLERANCES = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
CPU_DTYPES = [torch.float32, torch.float16]
DTYPES = [*CPU_DTYPES, torch.bfloat16] if HAS_CUDA else CPU_DTYPES


def _quantized(n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """An FP8 weight [n, k] and its scales [n] on DEVICE, rows of unequal magnitude."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * torch.rand(n, 1, generator=gen) / k**0.5
    q, scale = quantize_rows(w)
    return q.to(DEVICE), scale.to(DEVICE)


def _x(rows: int, k: int, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    return torch.randn(rows, k, generator=torch.Generator().manual_seed(seed)).to(dtype=dtype, device=DEVICE)


def _expected(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias=None) -> torch.Tensor:
    """fp32 product with the dequantized W, rounded once to x's dtype (as the kernel's accumulator is)."""
    b = bias.float() if bias is not None else None
    return F.linear(x.float(), dequantize(q, scale, torch.float32), b).to(x.dtype)


# -- quantization -------------------------------------------------------------------------------------
@pytest.mark.parametrize(("n", "k"), [(1, 1), (7, 19), (64, 989)])
def test_quantize_rows_round_trip(n, k):
    gen = torch.Generator().manual_seed(n)
    w = torch.randn(n, k, generator=gen) * 10.0 ** torch.randint(-4, 3, (n, 1), generator=gen)
    q, scale = quantize_rows(w)
    assert q.dtype == FP8 and scale.shape == (n,) and scale.dtype == torch.float32
    # Each row's largest magnitude maps to the largest FP8 value; every element rounds to 3 mantissa bits
    # (relative error <= 2^-4), or to the subnormal step (2^-9 of the scale) near zero.
    assert torch.equal(q.float().abs().amax(1), torch.full((n,), FP8_MAX))
    back = dequantize(q, scale, torch.float32)
    assert torch.all((back - w).abs() <= w.abs() * 2**-4 + scale[:, None] * 2**-9)
    # Dequantize-then-quantize with the same scales is the identity.
    assert torch.equal(quantize_rows(back)[0].view(torch.uint8), q.view(torch.uint8))


def test_zero_rows_quantize_to_zeros():
    q, scale = quantize_rows(torch.zeros(3, 8))
    assert torch.all(scale > 0) and torch.equal(q.float(), torch.zeros(3, 8))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("m", "k"), [(1, 1), (5, 19), (3, 4096), (2, 14336)])
def test_fused_row_quantizer_is_its_twin(m, k, dtype):
    gen = torch.Generator().manual_seed(k)
    x = (torch.randn(m, k, generator=gen) * 10.0 ** torch.randint(-3, 3, (m, 1), generator=gen)).to(dtype)
    x[0, : k // 2] = 0.0  # zeros and, for k == 1, an all-zero row
    q, scale = quantize_rows_fused(x.to(DEVICE))
    want_q, want_scale = quantize_rows(x)
    torch.testing.assert_close(scale.cpu(), want_scale, rtol=0, atol=0)
    assert_quantized_like(q.cpu(), want_q)


def assert_quantized_like(got: torch.Tensor, want: torch.Tensor) -> None:
    """e4m3 values a Triton kernel quantized against quantize_rows' of the same numbers and scales: within
    one step (a GPU division may round the last fp32 bit the other way). Interpreted, fp32 -> fp8e4nv is
    wrong where rounding carries into the exponent, for subnormals (test_kv_fp8) and rounds some ties
    away from even: there every other value within one step, and most equal."""
    if HAS_CUDA:
        assert_fp8_close(got, want)
        return
    want_bits = want.view(torch.uint8)
    checked = (want_bits & 0x07 != 0) & (want_bits & 0x78 != 0)
    assert_fp8_close(got[checked], want[checked])
    assert (got.view(torch.uint8) == want_bits).float().mean() > 0.9


def assert_same_rows(got: FP8Rows, want: FP8Rows) -> None:
    """Bit for bit: values, scales and the dtype they stand for."""
    assert got.dtype == want.dtype and got.values.dtype == FP8 and got.values.shape == want.values.shape
    assert torch.equal(got.scales, want.scales)
    assert torch.equal(got.values.view(torch.uint8), want.values.view(torch.uint8))


def assert_rows_close(got: FP8Rows, want: FP8Rows, dtype: torch.dtype) -> None:
    """A kernel's quantized rows against its twin's, which rounds the unquantized rows in torch: scales
    within that rounding, values within one e4m3 step (see assert_quantized_like)."""
    assert got.dtype == want.dtype == dtype
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(got.scales.cpu(), want.scales, rtol=tol, atol=0)
    assert_quantized_like(got.values.cpu(), want.values)


def test_activation_quantizer_takes_rows_longer_than_the_fused_kernel():
    """The W8A8 product's quantizer: rows past the fused kernel's 32768 (a wide MLP's down projection)
    and strided rows take the torch ops, with the same result."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 32768 + 16, generator=gen).to(DEVICE)
    for rows in (x, x[:, ::2]):
        q, scale = quantize_activations(rows)
        want_q, want_scale = quantize_rows(rows)
        assert torch.equal(scale, want_scale) and torch.equal(q.view(torch.uint8), want_q.view(torch.uint8))


def test_fused_row_quantizer_refuses_strided_rows():
    with pytest.raises(ValueError, match="unit column stride"):
        quantize_rows_fused(torch.zeros(4, 8, device=DEVICE).t())


# -- producers that quantize their rows for the W8A8 product -------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize(("tokens", "hidden", "pad"), [(1, 64, 0), (7, 200, 0), (33, 576, 40)])
def test_norms_quantize_their_rows_as_the_row_quantizer_does(tokens, hidden, pad, residual, dtype):
    """rms_norm_fp8 / fused_add_rms_norm_fp8: the norm and the row quantizer in one launch, the same bits
    as the two launches (strided rows, hidden sizes off a power of two); the stream updated as
    fused_add_rms_norm updates it, x left alone; the twins within the norm's rounding."""
    gen = torch.Generator().manual_seed(tokens)
    x = (torch.randn(tokens, hidden + pad, generator=gen) * 3)[:, :hidden].to(dtype=dtype, device=DEVICE)
    stream = torch.randn(tokens, hidden, generator=gen).to(dtype=dtype, device=DEVICE)
    weight = torch.randn(hidden, generator=gen).to(dtype=dtype, device=DEVICE)
    x_before = x.clone()
    if residual:
        got, got_stream = fused_add_rms_norm_fp8(x, stream.clone(), weight, 1e-6)
        normed, want_stream = fused_add_rms_norm(x.clone(), stream.clone(), weight, 1e-6)
        twin, twin_stream = reference_fused_add_rms_norm_fp8(x.cpu(), stream.cpu(), weight.cpu(), 1e-6)
        assert torch.equal(got_stream, want_stream) and torch.equal(twin_stream, want_stream.cpu())
    else:
        got, normed = rms_norm_fp8(x, weight, 1e-6), rms_norm(x, weight, 1e-6)
        twin = reference_rms_norm_fp8(x.cpu(), weight.cpu(), 1e-6)
    assert torch.equal(x, x_before)
    assert_same_rows(got, FP8Rows(*quantize_rows_fused(normed), dtype))
    assert_rows_close(got, twin, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("tokens", "inter", "pad"), [(1, 64, 0), (7, 200, 0), (3, 1100, 30)])
def test_silu_and_mul_quantizes_its_rows_as_the_row_quantizer_does(tokens, inter, pad, dtype):
    """silu_and_mul_fp8: SiLU-and-multiply and the row quantizer in one launch (a whole row a program),
    the same bits as the two launches; its twin within SiLU's rounding."""
    gen = torch.Generator().manual_seed(inter)
    gate_up = (torch.randn(tokens, 2 * inter + pad, generator=gen) * 3)[:, : 2 * inter]
    gate_up = gate_up.to(dtype=dtype, device=DEVICE)
    got = silu_and_mul_fp8(gate_up)
    assert_same_rows(got, FP8Rows(*quantize_rows_fused(silu_and_mul(gate_up)), dtype))
    assert_rows_close(got, reference_silu_and_mul_fp8(gate_up.cpu()), dtype)


def test_silu_and_mul_fp8_takes_rows_wider_than_its_kernel():
    """Past I = 16384 (gate and up of a row no longer fit one program's registers) SiLU-and-multiply and
    the quantizer run as two launches, with the same result."""
    gate_up = torch.randn(2, 2 * (16384 + 16), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    assert_same_rows(
        silu_and_mul_fp8(gate_up), FP8Rows(*quantize_activations(silu_and_mul(gate_up)), gate_up.dtype)
    )


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("rows", [1, 17])
def test_w8a8_products_take_rows_their_producer_quantized(rows, dtype):
    """The skinny W8A8 product and its RoPE epilogue on FP8Rows: the same bits as on the unquantized rows,
    which they quantize themselves."""
    hq, hkv, head_dim, k = 4, 2, 64, 96
    q, scale = _quantized((hq + 2 * hkv) * head_dim, k)
    x = _x(rows, k, dtype)
    quantized = FP8Rows(*quantize_activations(x), dtype)
    got = skinny_linear_w8a8(quantized, q, scale)
    assert got.dtype == dtype and torch.equal(got, skinny_linear_w8a8(x, q, scale))
    positions = torch.arange(rows, device=DEVICE)
    table = cos_sin_table(head_dim, dtype, DEVICE)
    slots = torch.arange(1, rows + 1, device=DEVICE)
    caches = [torch.zeros(2, rows // 4 + 2, 4, hkv, head_dim, dtype=dtype, device=DEVICE) for _ in range(2)]
    outputs = [
        skinny_linear_rope(rows_in, q, None, positions, table, *cache, slots, scale=scale)
        for rows_in, cache in zip((x, quantized), caches, strict=True)
    ]
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(caches[0], caches[1])


def test_reads_fp8_rows_only_where_the_product_runs_w8a8():
    """Producers quantize only for a W8A8 product: never on the CPU (weight-only, dequantizing) nor for a
    dense weight."""
    q, _ = _quantized(64, 96)
    x = torch.zeros(3, 96)
    assert not model_layers.reads_fp8_rows(x, q.cpu())
    assert not model_layers.reads_fp8_rows(x.to(DEVICE, torch.float16), torch.zeros(64, 96, device=DEVICE))


def test_reference_product_is_the_dequantized_product():
    q, scale = _quantized(24, 40)
    x = _x(5, 40, torch.float32)
    bias = torch.randn(24, device=DEVICE)
    want = F.linear(x, dequantize(q, scale, torch.float32), bias)
    assert torch.equal(reference_fp8_linear(x, q, scale, bias), want)
    assert torch.equal(fp8_linear(x.cpu(), q.cpu(), scale.cpu(), bias.cpu()), want.cpu())  # CPU: the twin


# -- the skinny product ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("rows", "n", "k", "bias", "sms"),
    [
        (1, 64, 512, False, 1 << 20),  # one program per 32-row block, unmasked K loop
        (3, 50, 200, True, 1 << 20),  # ragged N and K, bias
        (7, 33 * 32, 96, False, 8),  # the persistent grid (4 blocks per program)
        (17, 130, 200, True, 1),  # W's rows on the MMA's M side, 128 a program, ragged N
        (64, 40, 300, False, 1 << 20),  # the most rows, 64 rows of W a program
    ],
)
def test_skinny_fp8_matches_dequantized_product(rows, n, k, bias, sms, dtype, monkeypatch):
    monkeypatch.setattr(config_module, "sm_count", lambda device: sms)
    q, scale = _quantized(n, k)
    x = _x(rows, k, dtype)
    b = torch.randn(n, device=DEVICE).to(dtype) if bias else None
    tol = TOLERANCES[dtype]
    got = skinny_linear(x, q, b, scale=scale)
    torch.testing.assert_close(got, _expected(x, q, scale, b), atol=tol, rtol=tol)
    # The twin (the CPU path) within x's rounding of the same.
    torch.testing.assert_close(reference_fp8_linear(x, q, scale, b), got, atol=2 * tol, rtol=2 * tol)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize(("rows", "head_dim"), [(1, 64), (5, 128), (17, 128), (64, 64)])
def test_rope_epilogue_runs_w8a8_and_scales_before_rotating(rows, head_dim, dtype):
    """An FP8 q/k/v weight in the RoPE epilogue's product: x quantized per row, both scales applied to
    the product before the rotation and the cache write (as linear's W8A8 product + rope_and_cache)."""
    hq, hkv, k = 4, 2, 96
    q, scale = _quantized((hq + 2 * hkv) * head_dim, k)
    x = _x(rows, k, dtype)
    assert fuses_rope(x, q, head_dim)
    gen = torch.Generator().manual_seed(2)
    positions = torch.randint(0, MAX_POS, (rows,), generator=gen).to(DEVICE)
    num_blocks, block_size = rows // 4 + 3, 4
    slots = (1 + torch.randperm(num_blocks * block_size - 1, generator=gen)[:rows]).to(DEVICE)
    k_cache, v_cache = (
        torch.randn(2, num_blocks, block_size, hkv, head_dim, generator=gen).to(dtype).to(DEVICE)
    )
    table = cos_sin_table(head_dim, dtype, DEVICE)
    # x as the product's quantizer rounds it (interpreted, some values a step from quantize_rows: see
    # test_fused_row_quantizer_is_its_twin).
    x_q = dequantize(*quantize_activations(x), torch.float32)
    expected = F.linear(x_q, dequantize(q, scale, torch.float32))
    k_want, v_want = k_cache.float(), v_cache.float()
    reference_rope_and_cache(expected, positions, table.float(), k_want, v_want, slots)
    qkv = skinny_linear_rope(x, q, None, positions, table, k_cache, v_cache, slots, scale=scale)
    tol = 2 * TOLERANCES[dtype]
    assert qkv.dtype == dtype
    torch.testing.assert_close(qkv, expected.to(dtype), atol=tol, rtol=tol)
    torch.testing.assert_close(k_cache, k_want.to(dtype), atol=tol, rtol=tol)
    torch.testing.assert_close(v_cache, v_want.to(dtype), atol=tol, rtol=tol)


def test_fp8_rope_epilogue_needs_heads_of_whole_w8a8_tiles():
    """The W8A8 tile holds 64 rows of W: a 32-wide head (which a dense weight's 32-row tile fuses) is
    left to linear + rope_and_cache."""
    q, _ = _quantized(8 * 32, 96)
    x = _x(1, 96, torch.float16)
    assert not fuses_rope(x, q, 32)
    assert fuses_rope(x, dequantize(q, torch.ones(8 * 32, device=DEVICE), torch.float16), 32)


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize(("rows", "n", "k"), [(1, 128, 256), (5, 200, 300), (16, 64, 512), (33, 96, 64)])
def test_w8a8_skinny_matches_dequantized_product(rows, n, k, with_bias):
    """W8A8: e4m3 x with its row scales against e4m3 W with its row scales (+ a bias of the output's
    dtype)."""
    q, scale = _quantized(n, k)
    x_q, x_scale = quantize_rows(_x(rows, k, torch.float32))
    bias = _x(1, n, torch.float32, seed=9)[0] if with_bias else None
    got = skinny_linear(x_q, q, bias, scale=scale, x_scale=x_scale, out_dtype=torch.float32)
    want = dequantize(x_q, x_scale, torch.float32) @ dequantize(q, scale, torch.float32).T
    torch.testing.assert_close(got, want + bias if with_bias else want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("rows", "block_n", "block_k"), [(1, 32, 256), (5, 64, 512), (17, 32, 256)])
def test_w8a8_tiles_with_x_rows_on_the_mma_m_side(rows, block_n, block_k):
    """The W8A8 tiles bench_fp8_linear.py --tune sweeps besides skinny_config's: x's rows on the MMA's M
    side (no swap) with 32 or 64 rows of W a program, ragged N and K."""
    n, k = 200, 300
    q, scale = _quantized(n, k)
    x_q, x_scale = quantize_rows(_x(rows, k, torch.float32))
    y = torch.empty(rows, n, device=DEVICE)
    config = SkinnyConfig(max(16, 1 << (rows - 1).bit_length()), block_n, block_k, 4, 4, swap=False)
    launch_skinny(x_q, q, None, y, config, scale=scale, x_scale=x_scale)
    want = dequantize(x_q, x_scale, torch.float32) @ dequantize(q, scale, torch.float32).T
    torch.testing.assert_close(y, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda x, xs, s: (x, xs[1:], s, torch.float32), "x_scale must be a contiguous float32"),
        (lambda x, xs, s: (x, xs, None, torch.float32), "x_scale is for an e4m3 x"),
        (lambda x, xs, s: (x.float(), xs, s, torch.float32), "x_scale is for an e4m3 x"),
        (lambda x, xs, s: (x, xs, s, None), "needs an out_dtype"),
    ],
)
def test_w8a8_validation_errors(mutate, message):
    q, scale = _quantized(32, 64)
    x_q, x_scale = quantize_rows(_x(3, 64, torch.float32))
    x_q, x_scale, scale, out_dtype = mutate(x_q, x_scale, scale)
    with pytest.raises(ValueError, match=message):
        skinny_linear(x_q, q, scale=scale, x_scale=x_scale, out_dtype=out_dtype)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize(("rows", "n"), [(1, 50), (3, 256), (20, 130)])
def test_residual_epilogue_scales_before_adding(rows, n, dtype, monkeypatch):
    monkeypatch.setattr(config_module, "sm_count", lambda device: 1)
    q, scale = _quantized(n, 64)
    x = _x(rows, 64, dtype)
    residual = _x(rows, n, dtype, seed=5)
    stream, squares = skinny_linear_residual(x, q, residual, scale=scale)
    want = (_expected(x, q, scale).float() + residual.float()).to(dtype)
    tol = 2 * TOLERANCES[dtype]
    torch.testing.assert_close(stream, want, atol=tol, rtol=tol)
    torch.testing.assert_close(squares.sum(0), stream.float().square().sum(1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda q, s: (q, None), "share a dtype"),  # FP8 without its scales
        (lambda q, s: (q, s[1:]), "float32 scale"),
        (lambda q, s: (q, s.double()), "float32 scale"),
        (lambda q, s: (q.float(), s), "float8_e4m3fn"),  # scales beside a dense weight
        (lambda q, s: (q.view(torch.float8_e5m2), s), "float8_e4m3fn"),
    ],
)
def test_validation_errors(mutate, message):
    q, scale = _quantized(32, 64)
    weight, scale = mutate(q, scale)
    with pytest.raises(ValueError, match=message):
        skinny_linear(_x(2, 64, torch.float32), weight, scale=scale)


# -- GPU: the many-row product -------------------------------------------------------------------------
@gpu
@pytest.mark.gpu
@pytest.mark.parametrize(("rows", "n", "k"), [(65, 96, 128), (1000, 4096, 4096), (333, 14336, 4096)])
def test_gpu_scaled_mm_matches_dequantized_product(rows, n, k):
    """W8A8 (x quantized per row): within FP8's rounding of x (2^-4 relative) of the weight-only product."""
    q, scale = _quantized(n, k)
    x = _x(rows, k, torch.bfloat16)
    got = fp8_linear(x, q, scale)
    want = _expected(x, q, scale)
    err = (got.float() - want.float()).norm() / want.float().norm()
    assert got.dtype == torch.bfloat16 and got.shape == (rows, n) and err < 0.05


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize(
    ("rows", "n", "k"), [(1, 6144, 4096), (16, 4096, 14336), (33, 512, 4096), (64, 96, 128)]
)
def test_gpu_w8a8_skinny_matches_scaled_mm(rows, n, k):
    """The decode products' W8A8 (e4m3 x in the skinny kernel) against torch._scaled_mm on the same
    quantized x: the same products up to the order of the sums."""
    q, scale = _quantized(n, k)
    x = _x(rows, k, torch.bfloat16)
    got = skinny_linear_w8a8(x, q, scale)
    want = fp8_linear(x, q, scale)
    err = (got.float() - want.float()).norm() / want.float().norm()
    assert got.shape == (rows, n) and err < 1e-2, err


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("num_seqs", [1, 8, 16, 40])
def test_gpu_fp8_model_decode_runs_w8a8_skinny(num_seqs, tiny_model_factory, monkeypatch):
    """A bf16 decode step of an FP8 model runs every FP8 product W8A8 in the skinny kernel, q/k/v with
    RoPE and the cache write in its epilogue: the same logits, bit for bit, as with the W8A8 product and
    rope_and_cache apart, and close to the model with every FP8 product on torch._scaled_mm (the same
    W8A8 arithmetic in cuBLASLt). Only the order of the sums differs there, but an activation rounded to
    the other side of an e4m3 step moves a later layer: on an H100 the logits differ by 0.066-0.090 of
    their norm (1-40 sequences) where the dense model's skinny and cuBLASLt products differ by <= 0.010."""
    path = tiny_model_factory("qwen2")  # qwen2: the q/k/v bias
    model = load_model(path, torch.bfloat16, "cuda", quantization="fp8")
    prompts = [[5 + i, 300, 41 + 7 * i] for i in range(num_seqs)]
    skinny_rows, fused_rows = [], []  # rows of the W8A8 skinny products and of their RoPE epilogues
    route, rope = model_layers.use_w8a8_skinny, model_layers.skinny_linear_rope

    def recording_route(x: torch.Tensor, weight: torch.Tensor) -> bool:
        used = route(x, weight)
        if used:
            skinny_rows.append(x.shape[0])
        return used

    def recording_rope(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        fused_rows.append(x.shape[0])
        return rope(x, *args, **kwargs)

    def last_logits(prompts: list[list[int]], new_tokens: int) -> tuple[torch.Tensor, list[int]]:
        runner = GreedyRunner(model)
        first = [t[0] for t in runner.generate(prompts, new_tokens=new_tokens)]
        return runner.last_logits.float(), first

    monkeypatch.setattr(model_layers, "use_w8a8_skinny", recording_route)
    monkeypatch.setattr(model_layers, "skinny_linear_rope", recording_rope)
    fused, first = last_logits(prompts, 2)  # a prefill step, a decode step
    layers = model.config.num_layers
    assert fused_rows.count(num_seqs) == layers and skinny_rows.count(num_seqs) >= 4 * layers

    monkeypatch.setattr(model_layers.RotaryEmbedding, "fuses_with", lambda self, x, weight: False)
    assert torch.equal(last_logits(prompts, 2)[0], fused)

    monkeypatch.setattr(model_layers, "use_w8a8_skinny", lambda x, weight: False)
    want, _ = last_logits([[*p, t] for p, t in zip(prompts, first, strict=True)], 1)
    err = float((fused - want).norm() / want.norm())
    assert err < 0.15, err


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, FP8], ids=["bf16-cache", "fp8-cache"])
@pytest.mark.parametrize("num_seqs", [1, 40, 70])
def test_gpu_fp8_model_norms_and_silu_quantize_for_the_products(
    num_seqs, cache_dtype, tiny_model_factory, monkeypatch
):
    """With FP8 weights the norms and SiLU-and-multiply write their rows quantized (FP8Rows), and of a
    layer's four W8A8 products only o (attention's output) quantizes its own input: the same logits, bit
    for bit, as the model with a quantizer launch in front of every product (decode in the skinny
    kernel, q/k/v with RoPE in its epilogue, or apart from it for an fp8 cache; 70 sequences:
    torch._scaled_mm)."""
    model = load_model(tiny_model_factory("llama3"), torch.bfloat16, "cuda", quantization="fp8")
    prompts = [[5 + i, 300, 41 + 7 * i] for i in range(num_seqs)]
    quantized_rows = []
    modules = (skinny_linear_module, skinny_fused_module, fp8_module)
    for module in modules:
        quantize = module.quantize_activations
        monkeypatch.setattr(
            module, "quantize_activations", lambda x, q=quantize: quantized_rows.append(x.shape[0]) or q(x)
        )

    def last_logits() -> torch.Tensor:
        quantized_rows.clear()
        runner = GreedyRunner(model, cache_dtype=cache_dtype)
        runner.generate(prompts, new_tokens=2)  # a prefill step, a decode step
        return runner.last_logits.float()

    got = last_logits()
    layers = model.config.num_layers
    assert quantized_rows.count(num_seqs) == layers  # the decode step: o's input only
    monkeypatch.setattr(model_layers, "reads_fp8_rows", lambda x, weight: False)
    monkeypatch.setattr(llama_module, "reads_fp8_rows", lambda x, weight: False)
    want = last_logits()
    assert quantized_rows.count(num_seqs) == 4 * layers
    assert torch.equal(got, want)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 40, 65])
def test_gpu_linear_runs_fp8_decode_products_w8a8_skinny(rows, monkeypatch):
    """models.layers.linear on an FP8 weight: decode-sized x (any leading shape) through the W8A8 skinny
    product, larger x through torch._scaled_mm, the same values either way."""
    q, scale = _quantized(512, 256)
    bias = _x(1, 512, torch.bfloat16, seed=3)[0]
    x = _x(rows, 256, torch.bfloat16).view(1, rows, 256)
    routed = []
    route = model_layers.use_w8a8_skinny
    monkeypatch.setattr(
        model_layers, "use_w8a8_skinny", lambda x, w: routed.append(route(x, w)) or routed[-1]
    )
    got = model_layers.linear(x, q, bias, scale=scale)
    want = fp8_linear(x, q, scale, bias)
    err = (got.float() - want.float()).norm() / want.float().norm()
    assert routed == [rows <= 64] and got.shape == (1, rows, 512) and got.dtype == torch.bfloat16
    assert err < 1e-2, err
