"""FP8-weight products on a CUDA GPU, Llama-3-8B's projections (the LM head stays bf16): at decode rows
(1-64) the engine's W8A8 skinny product (x quantized per row by one pass, then the skinny Triton kernel on
e4m3 x and W), the skinny kernel reading FP8 W with bf16 x (weight-only) and torch._scaled_mm W8A8,
against the skinny kernel reading bf16 W, each beside its own floor = weight bytes / HBM read bandwidth
measured in the same run; at prefill rows (128-4096) the engine's W8A8 product (kernels.fp8.fp8_linear:
x quantized per row, then torch._scaled_mm) against dequantizing W to bf16 and calling cuBLASLt, and
against bf16 cuBLASLt. Each call reads its own weight copy (past the 50 MB L2), all captured in one CUDA
graph. Writes JSON and a plot.
--tune instead sweeps the W8A8 skinny product's tiles at 1, 16 and 64 rows against skinny_config's
W8A8 choice.
Usage: python benchmarks/bench_fp8_linear.py [--out DIR] [--tune]"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict
from itertools import product
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from triton.runtime.errors import OutOfResources

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_decode_attention import _time_graph, gpu_env, read_bandwidth
from benchmarks.bench_skinny_linear import ROTATE_BYTES, SHAPES
from leanserve.kernels.fp8 import (
    dequantize,
    fp8_linear,
    quantize_activations,
    quantize_rows,
    reference_fp8_linear,
)
from leanserve.kernels.skinny_config import SkinnyConfig, _fits, skinny_config
from leanserve.kernels.skinny_linear import launch_skinny, skinny_linear, skinny_linear_w8a8
from leanserve.server.engine.runtime import setup_process

DECODE_ROWS = (1, 16, 32, 64)
PREFILL_ROWS = (128, 512, 4096)
PROJECTIONS = ("qkv", "o", "gate_up", "down")
TUNE_ROWS = (1, 16, 64)


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
    torch.testing.assert_close(skinny_linear_w8a8(x, q, s), fp8_linear(x, q, s), atol=2e-2, rtol=2e-2)
    result = {
        "fp8_us": 1e6 * _time_graph([lambda q=q, s=s: skinny_linear(x, q, scale=s) for _, q, s in weights]),
        "w8a8_us": 1e6 * _time_graph([lambda q=q, s=s: fp8_linear(x, q, s) for _, q, s in weights]),
        "w8a8_skinny_us": 1e6
        * _time_graph([lambda q=q, s=s: skinny_linear_w8a8(x, q, s) for _, q, s in weights]),
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


def tune_candidates(rows: int) -> list[SkinnyConfig]:
    """The W8A8 sweep's tiles at `rows`: W's rows on the MMA's M side (what lets sm_90 multiply e4m3
    natively), 64 or 128 of them, 128-512 columns a stage, 3-5 stages, 4 or 8 warps; and x's rows on the M
    side with 32 or 64 rows of W a program, which gives the 4096-row matrices (o, down) 128 programs where
    64 rows of W give them 64, fewer than an H100's 132 SMs."""
    block_m = max(16, triton.next_power_of_2(rows))
    swapped = [
        SkinnyConfig(block_m, block_n, block_k, stages, warps, swap=True)
        for block_n, block_k, stages, warps in product((64, 128), (128, 256, 512), (3, 4, 5), (4, 8))
    ]
    plain = [
        SkinnyConfig(block_m, block_n, block_k, stages, 4, swap=False)
        for block_n, block_k, stages in product((32, 64), (256, 512), (4, 5))
    ]
    return swapped + plain


def describe(config: SkinnyConfig) -> str:
    """A tile in one short word: x rows, W rows and K per stage, then stages, warps, swap, programs."""
    text = f"{config.block_m}x{config.block_n}x{config.block_k} s{config.num_stages} w{config.num_warps}"
    return text + (" swap" if config.swap else "") + (f" p{config.programs}" if config.programs else "")


def tune_shape(rows: int, name: str, floor_us: float) -> list[dict]:
    """skinny_config's W8A8 choice for this shape and every candidate that fits, each on e4m3 x (quantized
    once, as the engine's `linear` does per call) against FP8 W with their scales, checked once against
    torch._scaled_mm on the same x, then timed (the product alone, without the quantizer)."""
    n, k = SHAPES[name]
    weights = [(q, s) for _, q, s in _weights(n, k, 1)]
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    x_q, x_scale = quantize_activations(x)
    ys = [torch.empty(rows, n, device="cuda", dtype=x.dtype) for _ in weights]
    (q0, s0), y0 = weights[0], ys[0]
    want = fp8_linear(x, q0, s0)
    default = skinny_config(rows, n, k, x_q.element_size(), q0.element_size(), x.device)
    configs = [c for c in tune_candidates(rows) if _fits(c, x_q.element_size(), q0.element_size(), x.device)]
    results = []
    for config in [default, *configs]:
        r = {"rows": rows, "matrix": name, "tile": describe(config), "default": config is default}
        try:
            launch_skinny(x_q, q0, None, y0, config, scale=s0, x_scale=x_scale)
            torch.testing.assert_close(y0, want, atol=2e-2, rtol=2e-2)
        except (OutOfResources, AssertionError) as exc:  # past shared memory, or a wrong product
            first_line = str(exc).partition("\n")[0]
            reason = f"{type(exc).__name__}: {first_line}"
            print(f"  {rows} {name} {r['tile']}: {reason}", flush=True)
            results.append(r | asdict(config) | {"error": reason})
            continue
        calls = [
            lambda q=q, s=s, y=y, c=config: launch_skinny(x_q, q, None, y, c, scale=s, x_scale=x_scale)
            for (q, s), y in zip(weights, ys, strict=True)
        ]
        us = 1e6 * _time_graph(calls)
        results.append(r | asdict(config) | {"us": us, "pct_floor": 100 * floor_us / us})
    del weights, ys
    torch.cuda.empty_cache()
    return results


def tune(bandwidth: float, env: dict, path: Path) -> None:
    """Sweep every (rows, projection), a line each as it finishes; the JSON is rewritten after every
    shape, so a run cut off by its time limit keeps what it measured."""
    print("tune: W8A8 skinny, skinny_config's choice vs the fastest candidate, each against the FP8 floor")
    header = ("rows", "matrix", "default us", "% floor", "best us", "% floor", "speed-up", " best tile")
    print(" ".join(f"{h:>{w}}" for h, w in zip(header, (4, 8, 10, 8, 8, 8, 9, 10), strict=True)), flush=True)
    results: list[dict] = []
    for rows in TUNE_ROWS:
        for name in PROJECTIONS:
            n, k = SHAPES[name]
            shape = tune_shape(rows, name, 1e6 * n * k / bandwidth)
            results += shape
            path.write_text(json.dumps({"env": env, "results": results}, indent=1))
            timed = [r for r in shape if "us" in r]
            default = next((r for r in timed if r["default"]), None)
            best = min((r for r in timed if not r["default"]), key=lambda r: r["us"], default=None)
            if default is None or best is None:
                print(f"{rows:4d} {name:>8} the default or every candidate failed", flush=True)
                continue
            print(
                f"{rows:4d} {name:>8} {default['us']:10.1f} {default['pct_floor']:7.1f}% {best['us']:8.1f} "
                f"{best['pct_floor']:7.1f}% {default['us'] / best['us']:8.2f}x {best['tile']}",
                flush=True,
            )


def plot(results: list[dict], gpu: str, path: Path) -> None:
    """Two panels: at decode rows each product's share of its floor (W8A8 skinny, weight-only FP8 skinny,
    W8A8 _scaled_mm, bf16 skinny); at prefill rows bf16 cuBLASLt's time over W8A8's (above 1: W8A8 is
    faster)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    decode_rows = [r for r in results if "fp8_us" in r]
    prefill_rows = [r for r in results if "dequant_us" in r]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    labels = [f"{r['rows']} {r['matrix']}" for r in decode_rows]
    series = (
        ("w8a8_skinny_us", "fp8_floor_us", "W8A8 skinny"),
        ("fp8_us", "fp8_floor_us", "FP8 W skinny"),
        ("w8a8_us", "fp8_floor_us", "W8A8 _scaled_mm"),
        ("bf16_us", "bf16_floor_us", "bf16 skinny"),
    )
    width = 0.2
    for i, (key, floor, name) in enumerate(series):
        xs = [j + (i - 1.5) * width for j, r in enumerate(decode_rows) if key in r]
        ys = [100 * r[floor] / r[key] for r in decode_rows if key in r]
        if ys:
            left.bar(xs, ys, width, label=name)
    left.set_xticks(range(len(labels)), labels, rotation=70, fontsize=7)
    left.set_ylabel("% of own floor (weight bytes / bandwidth)")
    left.set_title("decode rows")
    left.legend(fontsize=8)
    labels = [f"{r['rows']} {r['matrix']}" for r in prefill_rows]
    right.bar(range(len(labels)), [r["bf16_us"] / r["w8a8_us"] for r in prefill_rows])
    right.axhline(1.0, color="black", linewidth=0.8)
    right.set_xticks(range(len(labels)), labels, rotation=70, fontsize=7)
    right.set_ylabel("bf16 cuBLASLt us / W8A8 us")
    right.set_title("prefill rows")
    fig.suptitle(f"FP8 weights, Llama-3-8B projections, {gpu}")
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("bench_out"))
    parser.add_argument("--tune", action="store_true", help="sweep the W8A8 skinny tiles instead")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    setup_process("cuda")
    bandwidth = read_bandwidth()
    env = gpu_env(bandwidth)
    print(f"{env['gpu']}, torch {env['torch']}, triton {env['triton']}, read {bandwidth / 1e9:.0f} GB/s")
    if args.tune:
        tune(bandwidth, env, args.out / "bench_fp8_linear_tune.json")
        return
    print(
        "decode: the engine's W8A8 skinny product, weight-only FP8 skinny and W8A8 _scaled_mm against "
        "bf16 skinny, each against its floor (weight bytes / bandwidth); speed-up: bf16 over W8A8 skinny"
    )
    header = ("rows", "matrix", "w8a8sk", "% floor", "fp8 w", "% floor", "scaledmm", "% floor", "bf16 us",
              "% floor", "speed-up")  # fmt: skip
    print(" ".join(f"{h:>{w}}" for h, w in zip(header, (4, 8, 8, 8, 8, 8, 8, 8, 8, 8, 9), strict=True)))
    results = []
    for rows in DECODE_ROWS:
        for name in PROJECTIONS:
            n, k = SHAPES[name]
            floor8, floor16 = (1e6 * n * k * size / bandwidth for size in (1, 2))
            r = {"rows": rows, "matrix": name, "fp8_floor_us": floor8, "bf16_floor_us": floor16}
            r |= decode(rows, n, k)
            results.append(r)
            timed = (
                ("w8a8_skinny_us", floor8),
                ("fp8_us", floor8),
                ("w8a8_us", floor8),
                ("bf16_us", floor16),
            )
            cells = [f"{r[key]:8.1f} {floor / r[key]:8.1%}" for key, floor in timed]
            print(
                f"{rows:4d} {name:>8} {' '.join(cells)} {r['bf16_us'] / r['w8a8_skinny_us']:8.2f}x",
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
    plot(results, env["gpu"], args.out / "bench_fp8_linear.png")


if __name__ == "__main__":
    main()
