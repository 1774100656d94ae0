"""Decode-sized matrix products on a CUDA GPU, Llama-3-8B's projections and LM head in bf16: the skinny
Triton kernel (kernels/skinny_linear.py) against cuBLASLt (F.linear, the engine's BLAS choice), in
microseconds per call beside the floor = weight bytes / HBM read bandwidth measured in the same run. Each
call reads its own weight copy (enough copies to pass the 50 MB L2), all captured in one CUDA graph.
128 rows (past SKINNY_MAX_ROWS) show cuBLASLt alone, which the engine keeps there; * marks the other
products the engine leaves to cuBLASLt (skinny_beats_cublas). Writes JSON.
Usage: python benchmarks/bench_skinny_linear.py [--out DIR]"""

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
from leanserve.kernels.skinny_config import SKINNY_MAX_ROWS, skinny_beats_cublas
from leanserve.kernels.skinny_linear import skinny_linear
from leanserve.server.engine.runtime import setup_process

DTYPE = torch.bfloat16
SHAPES = {  # name: (N, K), Llama-3-8B
    "qkv": (6144, 4096),
    "o": (4096, 4096),
    "gate_up": (28672, 4096),
    "down": (4096, 14336),
    "lm_head": (128256, 4096),
}
PER_STEP = {"qkv": 32, "o": 32, "gate_up": 32, "down": 32, "lm_head": 1}
ROWS = (1, 4, 16, 24, 32, 64, 128)
ROTATE_BYTES = 512 << 20


def measure(rows: int, n: int, k: int) -> dict:
    copies = max(2, min(16, ROTATE_BYTES // (n * k * DTYPE.itemsize)))
    weights = [torch.randn(n, k, device="cuda", dtype=DTYPE) / math.sqrt(k) for _ in range(copies)]
    x = torch.randn(rows, k, device="cuda", dtype=DTYPE)
    result = {"cublas_us": 1e6 * _time_graph([lambda w=w: F.linear(x, w) for w in weights])}
    if rows <= SKINNY_MAX_ROWS:
        torch.testing.assert_close(
            skinny_linear(x, weights[0]), F.linear(x, weights[0]), atol=2e-2, rtol=2e-2
        )
        result["triton_us"] = 1e6 * _time_graph([lambda w=w: skinny_linear(x, w) for w in weights])
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
    # The step line sums what the engine runs: the kernel where skinny_beats_cublas, else cuBLASLt (*).
    header = ("rows", "matrix", "floor us", "cuBLASLt us", "% floor", "triton us", "% floor", "speed-up")
    print(" ".join(f"{h:>{w}}" for h, w in zip(header, (4, 8, 9, 11, 8, 10, 8, 9), strict=True)))
    results = []
    for rows in ROWS:
        step = {"cublas_us": 0.0, "triton_us": 0.0, "floor_us": 0.0}
        for name, (n, k) in SHAPES.items():
            floor = 1e6 * n * k * DTYPE.itemsize / bandwidth
            r = {"rows": rows, "matrix": name, "floor_us": floor} | measure(rows, n, k)
            r["engine"] = "triton" if skinny_beats_cublas(rows, n, k) else "cublaslt"
            results.append(r)
            cublas, ours = r["cublas_us"], r.get("triton_us")
            step["floor_us"] += PER_STEP[name] * floor
            step["cublas_us"] += PER_STEP[name] * cublas
            step["triton_us"] += PER_STEP[name] * (ours if r["engine"] == "triton" else cublas)
            tail = f"{ours:10.1f} {floor / ours:8.1%} {cublas / ours:8.2f}x" if ours else f"{'-':>10}"
            tail += "" if r["engine"] == "triton" or not ours else " *"
            print(f"{rows:4d} {name:>8} {floor:9.1f} {cublas:11.1f} {floor / cublas:8.1%} {tail}")
        if rows <= SKINNY_MAX_ROWS:
            print(
                f"{rows:4d} {'step':>8} {step['floor_us']:9.0f} {step['cublas_us']:11.0f} "
                f"{step['floor_us'] / step['cublas_us']:8.1%} {step['triton_us']:10.0f} "
                f"{step['floor_us'] / step['triton_us']:8.1%} {step['cublas_us'] / step['triton_us']:8.2f}x"
            )
    (args.out / "bench_skinny_linear.json").write_text(json.dumps({"env": env, "results": results}, indent=1))


if __name__ == "__main__":
    main()
