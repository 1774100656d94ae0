"""How kernels are launched (kernels/launch.py): programmatic dependent launch only for compiled kernels
on Hopper or later, and on GPU a chain of dependent PDL kernels (a decoder layer's MLP half: norm,
products, activation) captured in a CUDA graph gives bit for bit what the same kernels give launched in
full stream order: a kernel that read its input before the previous one had written it would differ."""

from __future__ import annotations

import pytest
import torch

from kernels import fused_add_rms_norm, launch, rms_norm, silu_and_mul, skinny_linear
from kernels.launch import use_pdl

HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


def test_no_pdl_off_the_gpu_or_under_the_interpreter(monkeypatch):
    assert not use_pdl(torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not use_pdl(torch.device("cuda"))  # decided before any CUDA call: no GPU needed here


@gpu
@pytest.mark.gpu
def test_gpu_dependent_pdl_chain_in_a_graph_matches_stream_order(monkeypatch):
    hidden, inter, layers = 2048, 8192, 6
    gen = torch.Generator().manual_seed(0)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to("cuda", torch.bfloat16)

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
