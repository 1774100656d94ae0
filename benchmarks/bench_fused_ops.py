"""Fused elementwise kernels of a decoder layer on a CUDA GPU, Llama-3-8B shapes in bf16: each Triton
kernel against the torch ops the layer ran before it (residual add + F.rms_norm; RoPE by cat + mul +
addcmul on cos/sin gathered once per step, then k and v stored at their slots' (block, offset) of the
engine's head-major cache; F.silu then multiply),
in microseconds per call beside the floor = bytes moved / HBM read bandwidth measured in the same run.
Each op is timed LAYERS calls at a time in one CUDA graph, as a decode step replays it; at small token
counts its inputs stay in L2, so the floor only binds at large ones. Per layer: two norms, one RoPE,
one SiLU-and-multiply. Writes JSON and a plot. Usage: python benchmarks/bench_fused_ops.py [--out DIR]"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_decode_attention import _time_graph, gpu_env, read_bandwidth
from leanserve.kernels.activation import silu_and_mul
from leanserve.kernels.rms_norm import fused_add_rms_norm
from leanserve.kernels.rotary import rope_and_cache
from leanserve.models.kv_cache import head_major

DTYPE = torch.bfloat16
HIDDEN, INTER, HQ, HKV, HEAD_DIM, BLOCK_SIZE = 4096, 14336, 32, 8, 128, 16  # Llama-3-8B
LAYERS = 32
EPS = 1e-5
TOKENS = (1, 8, 64, 256, 2048)
PER_LAYER = {"add + rms_norm": 2, "rope + cache write": 1, "silu_and_mul": 1}


@dataclass
class Op:
    name: str
    bytes: int  # read + written per call
    torch: Callable[[], object]
    triton: Callable[[], object]


def make_ops(tokens: int, device: str = "cuda") -> list[Op]:
    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=device).to(DTYPE)

    size = DTYPE.itemsize
    x, residual, weight = randn(tokens, HIDDEN), randn(tokens, HIDDEN), randn(HIDDEN)
    qkv = randn(tokens, (HQ + 2 * HKV) * HEAD_DIM)
    positions = torch.randint(0, 8192, (tokens,), device=device)
    table = randn(8192, 2, HEAD_DIM)
    num_blocks = tokens // BLOCK_SIZE + 2
    slots = torch.randperm(num_blocks * BLOCK_SIZE, device=device)[:tokens]
    k_cache = head_major(torch.zeros(num_blocks, BLOCK_SIZE, HKV, HEAD_DIM, dtype=DTYPE, device=device))
    v_cache = torch.zeros_like(k_cache)  # head-major too
    gate_up = randn(tokens, 2 * INTER)
    cos, sin = table[positions].unsqueeze(1).unbind(2)  # the old path gathered these once per step
    blocks, offsets = slots // BLOCK_SIZE, slots % BLOCK_SIZE  # and these

    def torch_rope() -> None:
        qk = qkv[:, : (HQ + HKV) * HEAD_DIM].view(tokens, -1, HEAD_DIM)
        v = qkv[:, (HQ + HKV) * HEAD_DIM :].view(tokens, HKV, HEAD_DIM)
        half = HEAD_DIM // 2
        rotated = torch.addcmul(qk * cos, torch.cat((qk[..., half:], qk[..., :half]), dim=-1), sin)
        k_cache[blocks, offsets] = rotated[:, HQ:]
        v_cache[blocks, offsets] = v

    def torch_silu() -> torch.Tensor:
        gate, up = gate_up.split(INTER, dim=-1)
        return F.silu(gate) * up

    # Bytes: norm reads x, residual, weight and writes x, residual; RoPE reads the qkv row and the cos and
    # sin halves, writes q and k back and k, v to the cache (plus an int64 position and slot); SiLU reads
    # gate and up, writes one of them.
    rope_bytes = tokens * (((HQ + 2 * HKV) + (HQ + HKV) + 2 * HKV + 1) * HEAD_DIM * size + 16)
    return [
        Op(
            "add + rms_norm",
            (4 * tokens + 1) * HIDDEN * size,
            lambda: F.rms_norm(x + residual, (HIDDEN,), weight, EPS),
            lambda: fused_add_rms_norm(x, residual, weight, EPS),
        ),
        Op(
            "rope + cache write",
            rope_bytes,
            torch_rope,
            lambda: rope_and_cache(qkv, positions, table, k_cache, v_cache, slots),
        ),
        Op("silu_and_mul", 3 * tokens * INTER * size, torch_silu, lambda: silu_and_mul(gate_up)),
    ]


def bench(bandwidth: float) -> list[dict]:
    rows = []
    for tokens in TOKENS:
        for op in make_ops(tokens):
            row = {"tokens": tokens, "op": op.name, "bytes": op.bytes, "floor_us": 1e6 * op.bytes / bandwidth}
            for impl in ("torch", "triton"):
                row[f"{impl}_us"] = 1e6 * _time_graph([getattr(op, impl)] * LAYERS)
            rows.append(row)
        torch.cuda.empty_cache()
    return rows


def per_layer(rows: list[dict], tokens: int, key: str) -> float:
    """Microseconds of one layer's fused-op share: two norms, one RoPE, one SiLU-and-multiply."""
    return sum(PER_LAYER[r["op"]] * r[key] for r in rows if r["tokens"] == tokens)


def print_table(rows: list[dict]) -> None:
    print(f"{'tokens':>7} {'op':<20}{'torch us':>10}{'triton us':>11}{'floor us':>10}{'triton GB/s':>13}")
    for r in rows:
        gbs = r["bytes"] / r["triton_us"] / 1e3
        print(
            f"{r['tokens']:>7} {r['op']:<20}{r['torch_us']:>10.2f}{r['triton_us']:>11.2f}"
            f"{r['floor_us']:>10.2f}{gbs:>13.0f}"
        )
    for tokens in TOKENS:
        old, new = per_layer(rows, tokens, "torch_us"), per_layer(rows, tokens, "triton_us")
        print(
            f"{tokens:>7} tokens: per layer {old:.1f} -> {new:.1f} us; "
            f"x{LAYERS} layers {LAYERS * old / 1e3:.2f} -> {LAYERS * new / 1e3:.2f} ms"
        )


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("torch_us", "torch ops"), ("triton_us", "fused Triton"), ("floor_us", "floor")):
        ax.plot(TOKENS, [per_layer(rows, t, key) for t in TOKENS], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens")
    ax.set_ylabel("us per layer")
    ax.set_title(f"Elementwise ops of a Llama-3-8B layer, bf16, {torch.cuda.get_device_name()}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("bench_out"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    bandwidth = read_bandwidth()
    torch.cuda.empty_cache()
    env = gpu_env(bandwidth)
    print(env, flush=True)
    rows = bench(bandwidth)
    print_table(rows)
    (args.out / "fused_ops.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    plot(rows, args.out / "fused_ops.png")


if __name__ == "__main__":
    main()
