"""Decode attention per tensor-parallel rank on one CUDA GPU: Llama-3-8B's 32 query / 8 KV heads (D=128)
split over 1, 2, 4, 8 GPUs leaves 32/8, 16/4, 8/2, 4/1 heads per rank. Times LeanAttention and the peers
(SDPA cuDNN and flash, FA2 varlen) on each rank's share, against the HBM floor of that share; with fewer
heads the same KV length gives fewer lean tiles per program, which stream-K must still spread over every
SM. Usage: python benchmarks/bench_tp_attention.py [--out DIR] [--tp 1 2 4 8]"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_decode_attention import (
    Result,
    Shape,
    _fmt,
    _lognormal_lens,
    bench_shape,
    gpu_env,
    read_bandwidth,
)
from leanserve.kernels.lean_attention import _CONFIGS

NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM = 32, 8, 128  # Llama-3-8B
PEERS = ("sdpa_cudnn", "sdpa_flash", "varlen_fa2")


@dataclass
class Scenario:
    name: str
    lens: list[int]
    ragged: bool = False


def scenarios() -> list[Scenario]:
    k = 1024
    cases = [Scenario(f"B=1 {n // k}k", [n]) for n in (4 * k, 32 * k, 128 * k)]
    cases += [Scenario(f"B={b} 4k", [4 * k] * b) for b in (8, 32)]
    cases += [Scenario("B=256 1k", [k] * 256)]
    cases += [Scenario("ragged 32x~2k", _lognormal_lens(32, 2 * k, 1), ragged=True)]
    return cases


def rank_shape(scenario: Scenario, tp: int) -> Shape:
    """One rank's share of the heads at tensor-parallel size `tp` (the whole KV length of every
    sequence: heads, not tokens, are split)."""
    return Shape(
        f"{scenario.name} TP={tp}",
        scenario.lens,
        NUM_Q_HEADS // tp,
        NUM_KV_HEADS // tp,
        HEAD_DIM,
        scenario.ragged,
    )


def tiles_per_program(shape: Shape, num_sms: int) -> float:
    """Lean tiles (one KV head x `tile` tokens of one sequence) per launched program: the work units
    stream-K balances. Below a few per program, per-program fixed costs dominate."""
    config = _CONFIGS[shape.head_dim]
    tiles = shape.num_kv_heads * sum(math.ceil(n / config.tile) for n in shape.lens)
    return tiles / (num_sms * config.programs_per_sm)


def markdown(rows: list[tuple[Scenario, int, Result, float]], env: dict) -> str:
    lines = [
        f"GPU: {env['gpu']}; torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}; "
        f"read bandwidth {env['bandwidth_gbs']:.0f} GB/s. bf16, Llama-3-8B attention (32/8 heads, D=128) "
        "per tensor-parallel rank; each call timed in a CUDA graph over rotated inputs (> L2).",
        "",
        "| shape | TP | heads / rank | tiles / program | floor us | lean us | lean % floor "
        "| SDPA cuDNN us | SDPA flash us | FA2 varlen us | lean speedup vs TP=1 |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    unsplit = {scenario.name: result.us["lean"] for scenario, tp, result, _ in rows if tp == 1}
    for scenario, tp, result, tiles in rows:
        lean = result.us["lean"]
        speedup = unsplit[scenario.name] / lean if scenario.name in unsplit else None
        lines.append(
            f"| {scenario.name} | {tp} | {NUM_Q_HEADS // tp}/{NUM_KV_HEADS // tp} | {tiles:.1f} "
            f"| {result.floor_us:.1f} | {lean:.1f} | {_fmt(result.pct_floor('lean'))} | "
            + " | ".join(_fmt(result.us.get(p)) for p in PEERS)
            + f" | {_fmt(speedup, 2)}x |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[tuple[Scenario, int, Result, float]], path: Path) -> None:
    """Lean and SDPA cuDNN as % of the per-rank floor, one group of bars per shape, one bar per TP."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(scenario.name for scenario, *_ in rows))
    sizes = sorted({tp for _, tp, *_ in rows})
    width = 0.8 / len(sizes)
    fig, ax = plt.subplots(figsize=(12, 5))
    for i, tp in enumerate(sizes):
        by_name = {scenario.name: result for scenario, t, result, _ in rows if t == tp}
        xs = [x + i * width for x in range(len(names))]
        ax.bar(xs, [by_name[n].pct_floor("lean") or 0 for n in names], width, label=f"lean TP={tp}")
        cudnn = [by_name[n].pct_floor("sdpa_cudnn") for n in names]
        ax.scatter(xs, [c if c is not None else float("nan") for c in cudnn], color="k", marker="_", s=80)
    ax.scatter([], [], color="k", marker="_", label="SDPA cuDNN")
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(names))], names, rotation=30, ha="right")
    ax.set_ylabel("% of the rank's HBM floor (higher is better)")
    ax.set_title("Decode attention per tensor-parallel rank, Llama-3-8B heads, bf16")
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("bench_out"))
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4, 8], help="tensor-parallel sizes")
    args = parser.parse_args()
    bad = [tp for tp in args.tp if tp < 1 or NUM_KV_HEADS % tp]
    if bad:
        parser.error(f"--tp must divide the {NUM_KV_HEADS} KV heads, got {bad}")
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (one is enough: it times a single rank's share)")
    args.out.mkdir(parents=True, exist_ok=True)
    bandwidth = read_bandwidth()
    torch.cuda.empty_cache()
    env = gpu_env(bandwidth)
    print(env, flush=True)
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for scenario in scenarios():
        for tp in sorted(args.tp):
            shape = rank_shape(scenario, tp)
            result = bench_shape(shape, bandwidth)  # also checks lean against FA2 varlen
            rows.append((scenario, tp, result, tiles_per_program(shape, num_sms)))
            torch.cuda.empty_cache()
            print(json.dumps({"tp": tp, "tiles_per_program": rows[-1][3], **asdict(result)}), flush=True)
    records = [{"tp": tp, "tiles_per_program": tiles, **asdict(r)} for _, tp, r, tiles in rows]
    (args.out / "tp_attention.json").write_text(json.dumps({"env": env, "results": records}, indent=1))
    plot(rows, args.out / "tp_attention.png")
    table = markdown(rows, env)
    (args.out / "tp_attention.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
