"""How kernels are launched (kernels/launch.py): programmatic dependent launch only for compiled kernels
on Hopper or later, and on GPU a chain of dependent PDL kernels (a decoder layer's MLP half: norm,
products, activation) captured in a CUDA graph gives bit for bit what the same kernels give launched in
full stream order: a kernel that read its input before the previous one had written it would differ.
The L2 prefetch (kernels/l2_prefetch.py) runs only there too."""

from __future__ import annotations

import pytest
import torch

from leanserve.kernels import launch
from leanserve.kernels.activation import silu_and_mul
from leanserve.kernels.fp8 import quantize_rows
from leanserve.kernels.l2_prefetch import prefetch_l2, supports_l2_prefetch
from leanserve.kernels.launch import use_pdl
from leanserve.kernels.lean_attention import lean_attention_decode
from leanserve.kernels.rms_norm import fused_add_rms_norm, rms_norm
from leanserve.kernels.rotary import rope_and_cache
from leanserve.kernels.skinny_linear import skinny_linear, skinny_linear_w8a8

HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


def _bf16_randn(seed: int):
    """randn(*shape, scale=1.0): seeded normal bf16 CUDA tensors, drawn on the CPU (reproducible)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to("cuda", torch.bfloat16)

    return randn


def test_no_pdl_off_the_gpu_or_under_the_interpreter(monkeypatch):
    assert not use_pdl(torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not use_pdl(torch.device("cuda"))  # decided before any CUDA call: no GPU needed here


def test_l2_prefetch_only_on_compiled_hopper_gpus():
    assert not supports_l2_prefetch(torch.device("cpu"))
    with pytest.raises(ValueError, match="Hopper GPU"):
        prefetch_l2(torch.zeros(4096), 4096)


@gpu
@pytest.mark.gpu
def test_gpu_dependent_pdl_chain_in_a_graph_matches_stream_order(monkeypatch):
    hidden, inter, layers = 2048, 8192, 6
    randn = _bf16_randn(seed=0)
    weights = [
        (randn(hidden), randn(2 * inter, hidden, scale=hidden**-0.5), randn(hidden, inter, scale=inter**-0.5))
        for _ in range(layers)
    ]
    x, residual = randn(4, hidden), randn(4, hidden)

    def chain() -> torch.Tensor:
        h, r = rms_norm(x, weights[0][0], 1e-5), residual.clone()
        for norm, gate_up, down in weights:
            h = skinny_linear(silu_and_mul(skinny_linear(h, gate_up)), down)
            h, r = fused_add_rms_norm(h, r, norm, 1e-5)
        return h

    chain()  # compile
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = chain()
    if torch.cuda.get_device_capability()[0] >= 9:
        assert use_pdl(x.device)  # the graph above really holds PDL launches
    monkeypatch.setattr(launch, "PDL_ENABLED", False)
    for seed in range(3):
        x.copy_(torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)))
        graph.replay()
        expected = chain()  # eager, PDL off: full stream order
        torch.testing.assert_close(out, expected, atol=0, rtol=0)
        assert out.abs().max() > 0


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("fp8_o", [False, True], ids=["bf16-o", "fp8-o"])
def test_gpu_attention_half_of_a_layer_with_pdl_matches_stream_order(fp8_o, monkeypatch):
    """LeanAttention reads lengths and block tables before waiting for the RoPE + cache-write kernel
    ahead of it: in a graph replayed with new lengths, tables and inputs it must still see the K/V that
    kernel wrote for the new token, and the output projection after it must see its output. With an
    FP8 output projection (W8A8) the row quantizer sits between the two, in the chain as well."""
    hidden, heads, kv_heads, head_dim, page, layers, batch = 1024, 8, 2, 128, 16, 3, 3
    randn = _bf16_randn(seed=1)
    qkv_width = (heads + 2 * kv_heads) * head_dim
    weights = [
        (randn(qkv_width, hidden, scale=hidden**-0.5), randn(hidden, heads * head_dim, scale=0.05))
        for _ in range(layers)
    ]
    o_fp8 = [quantize_rows(o_w) for _, o_w in weights] if fp8_o else []

    def output_projection(attn: torch.Tensor, layer: int) -> torch.Tensor:
        if fp8_o:
            return skinny_linear_w8a8(attn, *o_fp8[layer])
        return skinny_linear(attn, weights[layer][1])

    blocks = 64
    caches = [
        (randn(blocks, page, kv_heads, head_dim), randn(blocks, page, kv_heads, head_dim))
        for _ in range(layers)
    ]
    cos_sin = randn(blocks * page, 2, head_dim)
    x = randn(batch, hidden)
    seq_lens = torch.zeros(batch, dtype=torch.int32, device="cuda")
    tables = torch.zeros(batch, blocks // batch, dtype=torch.int32, device="cuda")
    positions = torch.zeros(batch, dtype=torch.int64, device="cuda")
    slots = torch.zeros(batch, dtype=torch.int64, device="cuda")

    def set_lengths(lengths: list[int], seed: int) -> None:
        perm = torch.randperm(blocks, generator=torch.Generator().manual_seed(seed))[: tables.numel()]
        tables.copy_(perm.view(batch, -1))
        seq_lens.copy_(torch.tensor(lengths))
        positions.copy_(seq_lens - 1)
        slots.copy_(
            tables.cpu().gather(1, (positions.cpu() // page)[:, None])[:, 0] * page + positions.cpu() % page
        )

    def chain() -> torch.Tensor:
        h = x
        for layer, ((qkv_w, _), (k_cache, v_cache)) in enumerate(zip(weights, caches, strict=True)):
            q, _, _ = rope_and_cache(skinny_linear(h, qkv_w), positions, cos_sin, k_cache, v_cache, slots)
            attn = lean_attention_decode(q, k_cache, v_cache, tables, seq_lens)
            h = h + output_projection(attn.reshape(batch, -1), layer)
        return h

    set_lengths([5, 300, 17], seed=0)
    chain()  # compile, allocate the workspace
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = chain()
    monkeypatch.setattr(launch, "PDL_ENABLED", False)
    for seed, lengths in enumerate(([300, 1, 64], [17, 250, 333], [1, 2, 3])):
        set_lengths(lengths, seed)
        x.copy_(torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)))
        graph.replay()
        expected = chain()  # eager, PDL off: full stream order (rewrites the same cache slots)
        torch.testing.assert_close(out, expected, atol=0, rtol=0)
