"""The fused elementwise kernels (RMSNorm with the residual add, RoPE with the KV-cache write,
SiLU-and-multiply) against their torch twins (interpreted on CPU, compiled on GPU), the twins against
fp32 references written out here, the launchers' validation, the model run with the kernels in place of
the twins (CPU, interpreted), and on GPU: Llama-3-8B sizes in bf16 and a CUDA graph replayed with new
positions and slots."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from greedy_runner import GreedyRunner
from guard_page import against_guard_page

from leanserve.kernels import ops
from leanserve.kernels.activation import reference_silu_and_mul, silu_and_mul
from leanserve.kernels.rms_norm import (
    fused_add_rms_norm,
    reference_fused_add_rms_norm,
    reference_rms_norm,
    rms_norm,
)
from leanserve.kernels.rotary import reference_rope_and_cache, rope_and_cache
from leanserve.models.kv_cache import head_major
from leanserve.models.loader import load_model

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")

EPS = 1e-5
MAX_POS = 4096

# Kernel vs twin. fp16 and bf16: one ulp at the magnitudes of randn inputs, since the twin rounds some
# intermediates the kernel keeps in fp32 (x * cos in RoPE). bf16 also absorbs the interpreter's
# fp32 -> bf16 casts, which truncate (compiled Triton rounds to nearest even).
TOLERANCES = {
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
    torch.float16: {"atol": 2e-3, "rtol": 2e-3},
    torch.bfloat16: {"atol": 1.6e-2, "rtol": 1.6e-2},
}
DTYPES = list(TOLERANCES)


# -- fp32 references -------------------------------------------------------------------------------
def ref_rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS) * weight.float()


def ref_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """x: [T, H, D] halves layout: element i pairs with i + D/2 as the complex number x_i + j x_{i+D/2},
    turned by angles [T, D/2]."""
    half = x.shape[-1] // 2
    pairs = torch.complex(x[..., :half].double(), x[..., half:].double())
    turned = pairs * torch.polar(torch.ones_like(angles.double()), angles.double())[:, None, :]
    return torch.cat((turned.real, turned.imag), dim=-1).float()


def ref_silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.float().chunk(2, dim=-1)
    return gate * torch.sigmoid(gate) * up


def rope_angles(head_dim: int) -> torch.Tensor:
    """[MAX_POS, D/2] fp32 angles of Llama's plain RoPE (theta 10000)."""
    inv_freq = 1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)
    return torch.outer(torch.arange(MAX_POS).float(), inv_freq)


def cos_sin_table(head_dim: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    """[MAX_POS, 2, D]: [cos, cos] and [-sin, sin], the layout of models.layers.RotaryEmbedding."""
    angles = rope_angles(head_dim)
    cos, sin = angles.cos(), angles.sin()
    table = torch.stack((torch.cat((cos, cos), -1), torch.cat((-sin, sin), -1)), dim=1)
    return table.to(dtype=dtype, device=device)


def _randn(*shape: int, dtype: torch.dtype, device: str, seed: int, scale: float = 1.0) -> torch.Tensor:
    values = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale
    return values.to(dtype=dtype, device=device)


def _strided(
    rows: int, cols: int, pad: int, dtype: torch.dtype, device: str, seed: int, scale: float = 1.0
) -> torch.Tensor:
    """[rows, cols] with a row stride of cols + pad (a column slice of a wider tensor when pad > 0)."""
    return _randn(rows, cols + pad, dtype=dtype, device=device, seed=seed, scale=scale)[:, :cols]


# -- RMSNorm ---------------------------------------------------------------------------------------
NORM_CASES = [  # (tokens, hidden, row padding)
    (1, 64, 0),
    (7, 200, 0),  # not a power of two: masked columns
    (33, 576, 40),  # SmolLM2's hidden size, strided rows
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("tokens", "hidden", "pad"), NORM_CASES)
def test_rms_norm_matches_twin(tokens, hidden, pad, dtype):
    x = _strided(tokens, hidden, pad, dtype, DEVICE, seed=0, scale=3)
    weight = _randn(hidden, dtype=dtype, device=DEVICE, seed=1)
    before = x.clone()
    out = rms_norm(x, weight, EPS)
    assert out.is_contiguous() and torch.equal(x, before)  # a new tensor; the input is left alone
    torch.testing.assert_close(out, reference_rms_norm(x, weight, EPS), **TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("tokens", "hidden", "pad"), NORM_CASES)
def test_fused_add_rms_norm_matches_twin(tokens, hidden, pad, dtype):
    x = _strided(tokens, hidden, pad, dtype, DEVICE, seed=2)
    residual = _strided(tokens, hidden, pad // 2, dtype, DEVICE, seed=3, scale=4)
    weight = _randn(hidden, dtype=dtype, device=DEVICE, seed=4)
    x_ref, residual_ref = reference_fused_add_rms_norm(x.clone(), residual.clone(), weight, EPS)
    out, summed = fused_add_rms_norm(x, residual, weight, EPS)
    assert out.data_ptr() == x.data_ptr() and summed.data_ptr() == residual.data_ptr()  # in place
    torch.testing.assert_close(summed, residual_ref, **TOLERANCES[dtype])
    torch.testing.assert_close(out, x_ref, **TOLERANCES[dtype])


def test_norm_twins_match_fp32_reference():
    x, residual = (_randn(7, 200, dtype=torch.float32, device="cpu", seed=s) for s in (5, 6))
    weight = _randn(200, dtype=torch.float32, device="cpu", seed=7)
    expected_sum = x + residual
    torch.testing.assert_close(reference_rms_norm(x, weight, EPS), ref_rms_norm(x, weight))
    out, summed = reference_fused_add_rms_norm(x, residual, weight, EPS)
    torch.testing.assert_close(summed, expected_sum)
    torch.testing.assert_close(out, ref_rms_norm(expected_sum, weight))


# -- RoPE + KV-cache write -------------------------------------------------------------------------
# The writers take any cache strides: the engine's head-major blocks (models.kv_cache) and token-major
# ones, each made from a token-major tensor of the values.
CACHE_LAYOUTS = {"head-major": head_major, "token-major": torch.Tensor.contiguous}


@dataclass
class RopeCase:
    tokens: int
    heads: tuple[int, int]  # (Hq, Hkv)
    head_dim: int
    block_size: int
    pad: int  # extra columns per qkv row (row stride > width)
    dtype: torch.dtype


# Every token count, head dim, block size and dtype appears, GQA with groups 1 to 4 and strided rows
# with both block sizes. D=96 has a half (48) that is not a power of two: masked lanes.
ROPE_CASES = [
    RopeCase(1, (4, 4), 64, 16, 0, torch.float32),
    RopeCase(7, (8, 2), 128, 1, 0, torch.float16),
    RopeCase(33, (6, 2), 64, 16, 24, torch.bfloat16),
    RopeCase(7, (32, 8), 128, 16, 0, torch.bfloat16),
    RopeCase(33, (4, 1), 128, 1, 64, torch.float32),
    RopeCase(1, (9, 3), 64, 1, 8, torch.bfloat16),
    RopeCase(7, (3, 1), 96, 16, 0, torch.float16),
]


def _case_id(case: RopeCase) -> str:
    hq, hkv = case.heads
    dtype = str(case.dtype).removeprefix("torch.")
    return f"t{case.tokens}-h{hq}x{hkv}-d{case.head_dim}-bs{case.block_size}-pad{case.pad}-{dtype}"


def _rope_inputs(
    case: RopeCase, device: str, seed: int = 0, layout: str = "head-major"
) -> tuple[torch.Tensor, ...]:
    """qkv, positions, table, zeroed caches of `layout` and distinct slots in shuffled blocks (spare
    blocks too)."""
    hq, hkv = case.heads
    gen = torch.Generator().manual_seed(seed)
    qkv = _strided(case.tokens, (hq + 2 * hkv) * case.head_dim, case.pad, case.dtype, device, seed)
    positions = torch.randint(0, MAX_POS, (case.tokens,), generator=gen).to(device)
    num_blocks = math.ceil(case.tokens / case.block_size) + 3
    slots = torch.randperm(num_blocks * case.block_size, generator=gen)[: case.tokens].to(device)
    cache_shape = (num_blocks, case.block_size, hkv, case.head_dim)
    k_cache, v_cache = (CACHE_LAYOUTS[layout](torch.zeros(cache_shape, dtype=case.dtype, device=device))
                        for _ in range(2))  # fmt: skip
    return qkv, positions, cos_sin_table(case.head_dim, case.dtype, device), k_cache, v_cache, slots


def _clone(inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """The inputs with fresh copies of what rope_and_cache writes (qkv and the caches, strides kept)."""
    qkv, positions, table, k_cache, v_cache, slots = inputs
    return qkv.clone(), positions, table, k_cache.clone(), v_cache.clone(), slots


def _check_rope(case: RopeCase, device: str, layout: str = "head-major") -> None:
    inputs = _rope_inputs(case, device, layout=layout)
    qkv, _, _, k_cache, v_cache, slots = inputs
    expected = _clone(inputs)
    original = qkv.clone()
    q_ref, k_ref, v_ref = reference_rope_and_cache(*expected)
    q, k, v = rope_and_cache(*inputs)
    tol = TOLERANCES[case.dtype]
    torch.testing.assert_close(qkv, expected[0], **tol)  # q and k rotated in place, v as it was
    assert not torch.equal(qkv, original)
    for view, ref in ((q, q_ref), (k, k_ref), (v, v_ref)):
        assert view.untyped_storage().data_ptr() == qkv.untyped_storage().data_ptr()  # views of qkv
        torch.testing.assert_close(view, ref, **tol)
    # The whole caches: the tokens' slots hold k and v, every other slot is still zero.
    torch.testing.assert_close(k_cache, expected[3], **tol)
    torch.testing.assert_close(v_cache, expected[4], atol=0, rtol=0)
    written = torch.zeros(k_cache.shape[0] * k_cache.shape[1], dtype=torch.bool, device=device)
    written[slots] = True
    assert (k_cache.flatten(0, 1)[written] != 0).any(dim=-1).all()
    assert (k_cache.flatten(0, 1)[~written] == 0).all() and (v_cache.flatten(0, 1)[~written] == 0).all()


@pytest.mark.parametrize("layout", CACHE_LAYOUTS)
@pytest.mark.parametrize("case", ROPE_CASES, ids=_case_id)
def test_rope_and_cache_matches_twin(case, layout):
    _check_rope(case, DEVICE, layout)


def test_rope_padded_rows_write_only_the_scratch_block():
    """A captured decode graph pads its batch with rows whose slot is the first slot of a scratch block
    (model_runner): those rows may write only there, and the real rows are unaffected by them."""
    case = RopeCase(5, (8, 2), 64, 16, 0, torch.float16)
    inputs = _rope_inputs(case, DEVICE)
    qkv, positions, _, k_cache, v_cache, slots = inputs
    scratch = k_cache.shape[0] - 1
    slots[:3] = torch.tensor([3, 17, 18])
    slots[3:] = scratch * case.block_size
    positions[3:] = 0
    expected = _clone(inputs)
    reference_rope_and_cache(*expected)
    rope_and_cache(*inputs)
    tol = TOLERANCES[case.dtype]
    torch.testing.assert_close(qkv[:3], expected[0][:3], **tol)
    torch.testing.assert_close(k_cache[:scratch], expected[3][:scratch], **tol)
    torch.testing.assert_close(v_cache[:scratch], expected[4][:scratch], atol=0, rtol=0)
    assert (k_cache[scratch, 0] != 0).any() and (k_cache[scratch, 1:] == 0).all()


@pytest.mark.skipif(HAS_CUDA, reason="guard pages catch accesses of the interpreted kernels on CPU")
def test_kernels_touch_nothing_past_their_inputs():
    """Every input and output buffer ends at an inaccessible page: a read or write one element past any
    of them (the caches head-major, as the engine's) crashes. The results still match the twins."""
    case = RopeCase(7, (8, 2), 64, 16, 0, torch.float16)
    inputs = _rope_inputs(case, "cpu")
    expected = _clone(inputs)
    reference_rope_and_cache(*expected)
    guarded = tuple(against_guard_page(t) for t in inputs)
    rope_and_cache(*guarded)
    for got, want in zip(guarded, expected, strict=True):
        torch.testing.assert_close(got, want, **TOLERANCES[case.dtype])
    x, residual, weight = (against_guard_page(_randn(*shape, dtype=torch.float16, device="cpu", seed=i))
                           for i, shape in enumerate([(5, 200), (5, 200), (200,)]))  # fmt: skip
    x_ref, residual_ref = reference_fused_add_rms_norm(x.clone(), residual.clone(), weight, EPS)
    fused_add_rms_norm(x, residual, weight, EPS)
    torch.testing.assert_close((x, residual), (x_ref, residual_ref), **TOLERANCES[torch.float16])
    gate_up = against_guard_page(_randn(5, 400, dtype=torch.float16, device="cpu", seed=9))
    torch.testing.assert_close(
        silu_and_mul(gate_up), reference_silu_and_mul(gate_up), **TOLERANCES[torch.float16]
    )


def test_rope_twin_matches_fp32_reference():
    """The twin's rotation is RoPE's: pairs (i, i + D/2) turned by position * inv_freq, in fp32."""
    case = RopeCase(7, (4, 2), 64, 16, 8, torch.float32)
    inputs = _rope_inputs(case, "cpu")
    qkv, positions, _, k_cache, v_cache, slots = inputs
    heads = qkv.clone().view(case.tokens, -1, case.head_dim)
    rotated = ref_rope(heads[:, :6], rope_angles(case.head_dim)[positions])
    q, k, v = reference_rope_and_cache(*inputs)
    torch.testing.assert_close(q, rotated[:, :4], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k, rotated[:, 4:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v, heads[:, 6:], atol=0, rtol=0)
    blocks, offsets = slots // case.block_size, slots % case.block_size
    torch.testing.assert_close(k_cache[blocks, offsets], rotated[:, 4:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v_cache[blocks, offsets], heads[:, 6:], atol=0, rtol=0)


# -- SiLU and multiply -----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    ("tokens", "inter", "pad"),
    [(1, 64, 0), (7, 200, 0), (33, 1100, 30)],  # 1100 > the 1024-column block: two column programs
)
def test_silu_and_mul_matches_twin(tokens, inter, pad, dtype):
    gate_up = _strided(tokens, 2 * inter, pad, dtype, DEVICE, seed=8, scale=3)
    out = silu_and_mul(gate_up)
    assert out.shape == (tokens, inter) and out.dtype == dtype
    torch.testing.assert_close(out, reference_silu_and_mul(gate_up), **TOLERANCES[dtype])


def test_silu_twin_matches_fp32_reference():
    gate_up = _randn(7, 400, dtype=torch.float32, device="cpu", seed=9, scale=3)
    torch.testing.assert_close(reference_silu_and_mul(gate_up), ref_silu_and_mul(gate_up))


# -- validation ------------------------------------------------------------------------------------
def _rope_args() -> dict:
    names = ("qkv", "positions", "cos_sin", "k_cache", "v_cache", "slot_mapping")
    return dict(zip(names, _rope_inputs(RopeCase(3, (4, 2), 64, 16, 0, torch.float16), DEVICE), strict=True))


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda a: a.update(qkv=a["qkv"][:, :-1]), "qkv must be"),
        (lambda a: a.update(qkv=a["qkv"].t().contiguous().t()), "unit column stride"),
        (lambda a: a.update(k_cache=a["k_cache"][:, :8]), "one shape and strides"),
        (lambda a: a.update(v_cache=a["v_cache"].contiguous()), "one shape and strides"),  # token-major V
        (lambda a: a.update(k_cache=a["k_cache"][..., ::2], v_cache=a["v_cache"][..., ::2]), "unit stride"),
        (lambda a: a.update(cos_sin=a["cos_sin"].float()), "share a dtype"),
        (lambda a: a.update(cos_sin=a["cos_sin"][:, :, :32]), "cos_sin must be"),
        (lambda a: a.update(positions=a["positions"].int()), "positions must be"),
        (lambda a: a.update(slot_mapping=a["slot_mapping"][:2]), "slot_mapping must be"),
    ],
    ids=["width", "stride", "caches", "cache-strides", "head-dim", "dtype", "table", "positions", "slots"],
)
def test_rope_validation_errors(mutate, message):
    args = _rope_args()
    mutate(args)
    with pytest.raises(ValueError, match=message):
        rope_and_cache(**args)


def test_norm_and_activation_validation_errors():
    x = _randn(3, 64, dtype=torch.float16, device=DEVICE, seed=0)
    weight = _randn(64, dtype=torch.float16, device=DEVICE, seed=1)
    with pytest.raises(ValueError, match="weight must be"):
        rms_norm(x, weight.float(), EPS)
    with pytest.raises(ValueError, match="residual must be"):
        fused_add_rms_norm(x, x[:2].clone(), weight, EPS)
    with pytest.raises(ValueError, match="x must be"):
        rms_norm(x.t(), weight, EPS)
    with pytest.raises(ValueError, match="gate_up must be"):
        silu_and_mul(x[:, :63])


# -- the model -------------------------------------------------------------------------------------
@pytest.mark.skipif(HAS_CUDA, reason="the GPU tests of test_models.py run the model's kernels natively")
@pytest.mark.parametrize("kind", ["llama3", "qwen3"])  # qwen3: q/k norm written back before the rotation
def test_model_with_kernels_matches_twins(tiny_model_factory, monkeypatch, kind):
    """The CPU model with each twin swapped for its (interpreted) kernel: same greedy tokens and logits
    through chunked prefill over cached pages and batched decode, so the kernels are wired in right."""
    model = load_model(tiny_model_factory(kind), torch.float32, "cpu")
    prompts = [[5, 300, 41, 9000, 12, 7], [77, 8, 1200]]

    def run() -> tuple[list[list[int]], torch.Tensor]:
        runner = GreedyRunner(model)
        return runner.generate(prompts, new_tokens=4, chunk=4, stagger=1), runner.last_logits

    expected, expected_logits = run()
    kernels = {
        "reference_rms_norm": rms_norm,
        "reference_fused_add_rms_norm": fused_add_rms_norm,
        "reference_rope_and_cache": rope_and_cache,
        "reference_silu_and_mul": silu_and_mul,
    }
    for name, kernel in kernels.items():
        monkeypatch.setattr(ops, name, kernel)
    got, logits = run()
    assert got == expected
    torch.testing.assert_close(logits, expected_logits, rtol=1e-4, atol=1e-4)


# -- GPU: Llama-3-8B sizes in bf16 -----------------------------------------------------------------
GPU_TOKENS = [1, 64, 2048]


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("tokens", GPU_TOKENS)
def test_gpu_llama3_8b_norms(tokens):
    x = _randn(tokens, 4096, dtype=torch.bfloat16, device="cuda", seed=0)
    residual = _randn(tokens, 4096, dtype=torch.bfloat16, device="cuda", seed=1, scale=4)
    weight = _randn(4096, dtype=torch.bfloat16, device="cuda", seed=2)
    tol = TOLERANCES[torch.bfloat16]
    torch.testing.assert_close(rms_norm(x, weight, EPS), reference_rms_norm(x, weight, EPS), **tol)
    x_ref, residual_ref = reference_fused_add_rms_norm(x.clone(), residual.clone(), weight, EPS)
    fused_add_rms_norm(x, residual, weight, EPS)
    torch.testing.assert_close(residual, residual_ref, atol=0, rtol=0)  # one rounding of the sum, as torch
    torch.testing.assert_close(x, x_ref, **tol)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("tokens", GPU_TOKENS)
def test_gpu_llama3_8b_rope_and_cache(tokens):
    _check_rope(RopeCase(tokens, (32, 8), 128, 16, 0, torch.bfloat16), "cuda")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("tokens", GPU_TOKENS)
def test_gpu_llama3_8b_silu_and_mul(tokens):
    gate_up = _randn(tokens, 2 * 14336, dtype=torch.bfloat16, device="cuda", seed=3, scale=3)
    torch.testing.assert_close(
        silu_and_mul(gate_up), reference_silu_and_mul(gate_up), **TOLERANCES[torch.bfloat16]
    )


@gpu
@pytest.mark.gpu
def test_gpu_fused_ops_replay_in_cuda_graph():
    """The three kernels captured once over static buffers give the twins' results on each replay with
    new hidden states, positions and slots (a decode step of batch 8)."""
    case = RopeCase(8, (32, 8), 128, 16, 0, torch.bfloat16)
    qkv, positions, table, k_cache, v_cache, slots = _rope_inputs(case, "cuda")
    x, residual = (_randn(8, 4096, dtype=torch.bfloat16, device="cuda", seed=s) for s in (4, 5))
    weight = _randn(4096, dtype=torch.bfloat16, device="cuda", seed=6)
    gate_up = _randn(8, 2 * 14336, dtype=torch.bfloat16, device="cuda", seed=7)

    def step() -> torch.Tensor:
        fused_add_rms_norm(x, residual, weight, EPS)
        rope_and_cache(qkv, positions, table, k_cache, v_cache, slots)
        return silu_and_mul(gate_up)

    step()  # warm-up: compiles the kernels
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        act = step()
    gen = torch.Generator().manual_seed(8)
    tol = TOLERANCES[torch.bfloat16]
    for _ in range(3):
        for t in (x, residual, qkv, gate_up):
            t.copy_(torch.randn(t.shape, generator=gen))
        positions.copy_(torch.randint(0, MAX_POS, (8,), generator=gen))
        slots.copy_(torch.randperm(k_cache.shape[0] * 16, generator=gen)[:8])
        expected = _clone((qkv, positions, table, k_cache, v_cache, slots))
        reference_rope_and_cache(*expected)
        x_ref, residual_ref = reference_fused_add_rms_norm(x.clone(), residual.clone(), weight, EPS)
        act_ref = reference_silu_and_mul(gate_up)
        graph.replay()
        torch.testing.assert_close(x, x_ref, **tol)
        torch.testing.assert_close(residual, residual_ref, **tol)
        torch.testing.assert_close(qkv, expected[0], **tol)
        torch.testing.assert_close(k_cache, expected[3], **tol)
        torch.testing.assert_close(v_cache, expected[4], atol=0, rtol=0)
        torch.testing.assert_close(act, act_ref, **tol)
