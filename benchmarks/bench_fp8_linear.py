"""FP8-weight products on a CUDA GPU, Llama-3-8B's projections (the LM head stays bf16): at decode rows
(1-64) the skinny Triton kernel reading FP8 W (per-row scales in the epilogue) against the same kernel
reading bf16 W, each beside its own floor = weight bytes / HBM read bandwidth measured in the same run;
at prefill rows (128-4096) the engine's W8A8 product (kernels.fp8.fp8_linear: x quantized per row, then
torch._scaled_mm) against dequantizing W to bf16 and calling cuBLASLt, and against bf16 cuBLASLt. Each
call reads its own weight copy (past the 50 MB L2), all captured in one CUDA graph. Writes JSON.
Usage: python benchmarks/bench_fp8_linear.py [--out DIR]"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_decode_attention import _time_graph, gpu_env, read_bandwidth
from benchmarks.bench_skinny_linear import ROTATE_BYTES, SHAPES
from leanserve.kernels.fp8 import dequantize, fp8_linear, quantize_rows, reference_fp8_linear
from leanserve.kernels.skinny_linear import skinny_linear
from leanserve.server.engine.runtime import setup_process

DECODE_ROWS = (1, 16, 32, 64)
PREFILL_ROWS = (128, 512, 4096)
PROJECTIONS = ("qkv", "o", "gate_up", "down")


def _weights(n: int, k: int, itemsize: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(bf16 W, FP8 W, scales) copies enough to pass L2 at `itemsize` bytes an element."""
    copies = max(2, min(16, ROTATE_BYTES // (n * k * itemsize)))
    out = []
    for _ in range(copies):
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / math.sqrt(k)
        out.append((w, *quantize_rows(w)))
    return out


def decode(rows: int, n: int, k: int) -> dict:
    weights = _weights(n, k, 1)
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    _, q, s = weights[0]
    want = reference_fp8_linear(x, q, s)
    torch.testing.assert_close(skinny_linear(x, q, scale=s), want, atol=2e-2, rtol=2e-2)
    result = {
        "fp8_us": 1e6 * _time_graph([lambda q=q, s=s: skinny_linear(x, q, scale=s) for _, q, s in weights]),
        "bf16_us": 1e6 * _time_graph([lambda w=w: skinny_linear(x, w) for w, _, _ in weights]),
    }
    del weights
    torch.cuda.empty_cache()
    return result


def prefill(rows: int, n: int, k: int) -> dict:
    weights = _weights(n, k, 2)
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    result = {
        "w8a8_us": 1e6 * _time_graph([lambda q=q, s=s: fp8_linear(x, q, s) for _, q, s in weights]),
        "dequant_us": 1e6
        * _time_graph(
            [lambda q=q, s=s: F.linear(x, dequantize(q, s, torch.bfloat16)) for _, q, s in weights]
        ),
        "bf16_us": 1e6 * _time_graph([lambda w=w: F.linear(x, w) for w, _, _ in weights]),
    }
    del weights
    torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("bench_out"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    setup_process("cuda")
    bandwidth = read_bandwidth()
    env = gpu_env(bandwidth)
    print(f"{env['gpu']}, torch {env['torch']}, triton {env['triton']}, read {bandwidth / 1e9:.0f} GB/s")
    print("decode: the skinny kernel, FP8 W vs bf16 W, each against its floor (weight bytes / bandwidth)")
    header = ("rows", "matrix", "fp8 us", "% floor", "bf16 us", "% floor", "speed-up")
    print(" ".join(f"{h:>{w}}" for h, w in zip(header, (4, 8, 8, 8, 8, 8, 9), strict=True)))
    results = []
    for rows in DECODE_ROWS:
        for name in PROJECTIONS:
            n, k = SHAPES[name]
            floor8, floor16 = (1e6 * n * k * size / bandwidth for size in (1, 2))
            r = {"rows": rows, "matrix": name, "fp8_floor_us": floor8, "bf16_floor_us": floor16}
            r |= decode(rows, n, k)
            results.append(r)
            print(
                f"{rows:4d} {name:>8} {r['fp8_us']:8.1f} {floor8 / r['fp8_us']:8.1%} {r['bf16_us']:8.1f} "
                f"{floor16 / r['bf16_us']:8.1%} {r['bf16_us'] / r['fp8_us']:8.2f}x",
                flush=True,
            )
    print("prefill: W8A8 (_scaled_mm) vs dequantize + cuBLASLt vs bf16 cuBLASLt (us)")
    print(f"{'rows':>4} {'matrix':>8} {'w8a8':>8} {'dequant':>8} {'bf16':>8}")
    for rows in PREFILL_ROWS:
        for name in PROJECTIONS:
            r = {"rows": rows, "matrix": name} | prefill(rows, *SHAPES[name])
            results.append(r)
            print(
                f"{rows:4d} {name:>8} {r['w8a8_us']:8.1f} {r['dequant_us']:8.1f} {r['bf16_us']:8.1f}",
                flush=True,
            )
    (args.out / "bench_fp8_linear.json").write_text(json.dumps({"env": env, "results": results}, indent=1))


if __name__ == "__main__":
    main()
