"""Long-context prefill benchmark on one CUDA GPU, Llama-3-8B shapes (bf16, random weights: dummy load).

Parts (--parts, default all), each printed as it finishes with its floor or peer in the same run:
  attention  the paged prefill kernel alone (block size 16, scattered pages) against SDPA on contiguous
             K/V for whole 1k / 8k / 32k prompts (flash, and the backend torch picks: the engine's path),
             and against FA2 varlen (contiguous, bottom-right causal) and the engine's SDPA split at the
             prefix (models.sdpa_prefill: cuDNN over the gathered prefix and over the chunk, merged) for the
             last 2k chunk of a 32k prompt and for all 16 chunks of one;
             TFLOP/s and % of the bf16 matrix-multiply throughput measured in the same run.
  ttft       time to first token of 1k / 8k / 32k prompts whole and of 32k in 2k chunks, by the paged
             kernel and by SDPA per chunk (models.attention.SDPA_PREFILL), against the compute floor (the
             prompt's FLOPs / the matrix-multiply throughput).
  profile    kernel time by kernel name of one TTFT run each: 8k whole and 32k in 2k chunks, by the paged
             kernel and by SDPA (torch profiler, PDL off: a kernel launched early would count its wait).
  serving    32 concurrent requests, prompts log-normal between 2k and 32k, 256 output tokens each: TTFT
             and TPOT p50 / p99, output tokens/s, the share of step time in attention, per KV cache dtype
             (--kv-dtypes, default bf16 and fp8; fp8-e4m3: the fp8 cache with V's pages slot-major,
             models.kv_cache.FP8_V_SLOT_MAJOR, whose decode attention runs on e4m3 tensor cores).
--tune sweeps the kernel's tiles on the attention part's shapes instead. Writes JSON + a plot to --out.
Usage: python benchmarks/bench_long_context.py [--parts attention ttft profile serving] [--out DIR]
       [--tune]"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict
from itertools import product
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import triton
from bench_decode_attention import relative_error  # benchmarks/ is the script's directory
from bench_engine import kernel_times, make_prompts
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

from leanserve.kernels import launch
from leanserve.kernels.prefill_attention import _CONFIGS, PrefillConfig, _launch
from leanserve.models import attention, kv_cache
from leanserve.models.kv_cache import head_major
from leanserve.models.sdpa_prefill import sdpa_prefill
from leanserve.server.engine.config import EngineConfig
from leanserve.server.engine.llm_engine import LLMEngine
from leanserve.server.engine.runtime import settle_process, setup_process
from leanserve.server.engine.sampling_params import SamplingParams

K = 1024
HQ, HKV, D = 32, 8, 128  # Llama-3-8B attention
DTYPE = torch.bfloat16
BLOCK_SIZE = 16
CHUNK = 2 * K
PROMPT_LENS = (K, 8 * K, 32 * K)


def matmul_throughput() -> float:
    """FLOP/s of a bf16 8192^3 matrix product (cuBLAS), median of do_bench."""
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=DTYPE) for _ in range(2))
    return 2 * 8192**3 / (do_bench(lambda: a @ b, warmup=50, rep=300) / 1e3)


def causal_pairs(prefix: int, query: int) -> int:
    """(query, key) pairs a chunk of `query` tokens after `prefix` cached ones computes."""
    return query * prefix + query * (query + 1) // 2


# -- attention alone --------------------------------------------------------------------------------------


def paged_inputs(context: int, gen: torch.Generator):
    """A scattered paged cache of one sequence of `context` tokens, head-major as the engine's (models.
    kv_cache): (k_cache, v_cache, block_table)."""
    blocks = -(-context // BLOCK_SIZE)
    shape = (blocks, BLOCK_SIZE, HKV, D)
    k_cache, v_cache = (head_major(torch.randn(shape, device="cuda", dtype=DTYPE)) for _ in range(2))
    table = torch.randperm(blocks, generator=gen).to(device="cuda", dtype=torch.int32)[None]
    return k_cache, v_cache, table


def contiguous_kv(k_cache, v_cache, table, context: int):
    """The sequence's K/V gathered into [context, Hkv, D] tensors (what the peers read)."""
    return (c[table[0].long()].flatten(0, 1)[:context].contiguous() for c in (k_cache, v_cache))


def kernel_call(q, k_cache, v_cache, table, prefix: int, config: PrefillConfig) -> Callable:
    cu = torch.tensor([0, q.shape[0]], device="cuda", dtype=torch.int32)
    ctx = torch.tensor([prefix + q.shape[0]], device="cuda", dtype=torch.int32)
    out = torch.empty_like(q)
    return lambda: _launch(q, k_cache, v_cache, cu, ctx, table, None, out, config)


def sdpa_call(q, k, v, backend: SDPBackend | None) -> Callable:
    """SDPA, causal, GQA natively: q [L, Hq, D], k/v [L, Hkv, D] contiguous. backend None: the one torch
    picks, as the engine's whole-prompt path calls it (models.sdpa_prefill)."""
    qt, kt, vt = (t.transpose(0, 1)[None] for t in (q, k, v))

    def call():
        with sdpa_kernel(backend) if backend is not None else nullcontext():
            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)[0].transpose(
                0, 1
            )

    return call


def varlen_call(q, k, v) -> Callable:
    """FA2 varlen (packed, contiguous K/V): its causal mask aligns bottom-right when K is longer than Q."""
    cu_q = torch.tensor([0, q.shape[0]], device="cuda", dtype=torch.int32)
    cu_k = torch.tensor([0, k.shape[0]], device="cuda", dtype=torch.int32)
    return lambda: torch.ops.aten._flash_attention_forward(
        q, k, v, cu_q, cu_k, q.shape[0], k.shape[0], 0.0, True, False
    )[0]


def split_call(q, k_cache, v_cache, table, prefix: int, k, v) -> Callable:
    """The engine's SDPA path for one chunk after `prefix` cached tokens: the prefix gathered out of the
    paged cache and attended by cuDNN, the chunk's own K/V (k, v: [chunk, Hkv, D]) by cuDNN, merged."""
    out = torch.empty_like(q)
    lens = ([q.shape[0]], [prefix + q.shape[0]])
    return lambda: sdpa_prefill(q, k, v, k_cache, v_cache, None, None, *lens, table, D**-0.5, out) or out


def attention_cases(gen: torch.Generator) -> list[dict]:
    """Per case: name, FLOPs, the kernel's inputs (q, cache, prefix) and its peers as (name, call)."""
    cases = []
    for length in PROMPT_LENS:
        k_cache, v_cache, table = paged_inputs(length, gen)
        k, v = contiguous_kv(k_cache, v_cache, table, length)
        q = torch.randn(length, HQ, D, device="cuda", dtype=DTYPE)
        peers = [
            (name, sdpa_call(q, k, v, backend))
            for name, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_default", None))
        ]
        cases.append(dict(name=f"whole {length // K}k", flops=4 * HQ * D * causal_pairs(0, length), q=q,
                          cache=(k_cache, v_cache, table), prefix=0, peers=peers))  # fmt: skip
    length = 32 * K
    k_cache, v_cache, table = paged_inputs(length, gen)
    k, v = contiguous_kv(k_cache, v_cache, table, length)
    q = torch.randn(CHUNK, HQ, D, device="cuda", dtype=DTYPE)
    cases.append(dict(name="32k: last 2k chunk", flops=4 * HQ * D * causal_pairs(length - CHUNK, CHUNK), q=q,
                      cache=(k_cache, v_cache, table), prefix=length - CHUNK,
                      peers=[("fa2_varlen", varlen_call(q, k, v)),
                             ("sdpa_split", split_call(q, k_cache, v_cache, table, length - CHUNK,
                                                       k[-CHUNK:], v[-CHUNK:]))]))  # fmt: skip
    return cases


def chunked_prompt_calls(config: PrefillConfig, gen: torch.Generator) -> tuple[int, Callable, list]:
    """All 16 chunks of a 32k prompt, one launch each, against FA2 varlen and the SDPA split per chunk:
    (FLOPs, ours, [(peer name, call)])."""
    length = 32 * K
    k_cache, v_cache, table = paged_inputs(length, gen)
    k, v = contiguous_kv(k_cache, v_cache, table, length)
    q = torch.randn(length, HQ, D, device="cuda", dtype=DTYPE)
    starts = range(0, length, CHUNK)
    ours = [kernel_call(q[s : s + CHUNK], k_cache, v_cache, table, s, config) for s in starts]
    varlen = [varlen_call(q[s : s + CHUNK], k[: s + CHUNK], v[: s + CHUNK]) for s in starts]
    split = [split_call(q[s : s + CHUNK], k_cache, v_cache, table, s, k[s : s + CHUNK], v[s : s + CHUNK])
             for s in starts]  # fmt: skip
    flops = 4 * HQ * D * causal_pairs(0, length)
    peers = [("fa2_varlen", lambda: [c() for c in varlen]), ("sdpa_split", lambda: [c() for c in split])]
    return flops, lambda: [c() for c in ours], peers


def attention_part(peak: float) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    config = _CONFIGS[D]
    rows = []
    print(
        f"{'case':22}{'ours ms':>9}{'peer ms':>9}{'peer/ours':>10}{'ours TFLOP/s':>14}{'% matmul':>10}  peer"
    )
    for case in attention_cases(gen):
        ours = kernel_call(case["q"], *case["cache"], case["prefix"], config)
        ours_ms, out = do_bench(ours, warmup=25, rep=200), ours()
        for peer_name, peer in case["peers"]:
            err = relative_error(out, peer())
            rows.append(_attention_row(case["name"], case["flops"], ours_ms, peer_name, peer, peak, err))
    flops, ours, peers = chunked_prompt_calls(config, gen)
    ours_ms = do_bench(ours, warmup=25, rep=200)
    for peer_name, peer in peers:
        rows.append(_attention_row("32k in 16 chunks", flops, ours_ms, peer_name, peer, peak, None))
    whole = next(r for r in rows if r["case"] == "whole 32k")
    print(f"32k in 2k chunks / 32k whole (kernel alone): {ours_ms / whole['ours_ms']:.3f}x")
    return rows


def _attention_row(name, flops, ours_ms, peer_name, peer, peak, err) -> dict:
    peer_ms = do_bench(peer, warmup=25, rep=200)
    row = dict(case=name, flops=flops, ours_ms=ours_ms, peer=peer_name, peer_ms=peer_ms, rel_error=err)
    row |= dict(peer_over_ours=peer_ms / ours_ms, ours_tflops=flops / ours_ms / 1e9)
    row["ours_pct_matmul"] = 100 * flops / (ours_ms / 1e3) / peak
    note = "" if err is None else f" (rel. error vs peer {err:.1e})"
    print(f"{name:22}{ours_ms:9.3f}{peer_ms:9.3f}{row['peer_over_ours']:10.2f}{row['ours_tflops']:14.0f}"
          f"{row['ours_pct_matmul']:10.1f}  {peer_name}{note}", flush=True)  # fmt: skip
    return row


def tune() -> list[dict]:
    """The kernel's tiles, warps and stages on the attention part's cases (D=128)."""
    gen = torch.Generator().manual_seed(0)
    cases = attention_cases(gen)
    rows = []
    for block_m, block_n, warps, stages in product((64, 128), (32, 64, 128), (4, 8), (2, 3, 4)):
        config = PrefillConfig(block_m, block_n, warps, stages)
        times = {}
        for case in cases:
            try:
                times[case["name"]] = do_bench(
                    kernel_call(case["q"], *case["cache"], case["prefix"], config), warmup=10, rep=50
                )
            except Exception as exc:  # out of shared memory or registers for this combination
                print(f"  {config}: {type(exc).__name__}", flush=True)
                break
        if len(times) == len(cases):
            rows.append(
                {
                    **asdict(config),
                    "ms": times,
                    "geomean_ms": math.exp(statistics.fmean(map(math.log, times.values()))),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    for row in sorted(rows, key=lambda r: r["geomean_ms"])[:8]:
        print(f"best: {row}")
    return rows


# -- the engine: TTFT and serving -----------------------------------------------------------------------


def build_engine(args: argparse.Namespace, kv_dtype: str) -> LLMEngine:
    kv_cache.FP8_V_SLOT_MAJOR = kv_dtype == "fp8-e4m3"
    options = dict(model=args.model, tokenizer=args.tokenizer, load_format="dummy", dtype="bfloat16",
                   device="cuda", max_num_seqs=args.concurrency, max_num_batched_tokens=32 * K,
                   max_model_len=32 * K + args.output_len + BLOCK_SIZE,
                   kv_cache_dtype=kv_dtype.removesuffix("-e4m3"))  # fmt: skip
    engine = LLMEngine.from_config(EngineConfig(**options))
    settle_process()
    return engine


def prefill_flops(engine: LLMEngine, length: int) -> int:
    """FLOPs of a prompt's prefill: every matrix of the layers once per token, causal attention, the LM
    head for the last token."""
    model = engine.runner.model
    cfg = model.config
    tables = {id(model.embed_weight), id(model.lm_head_weight)}
    matrices = sum(p.numel() for p in model.parameters() if p.dim() == 2 and id(p) not in tables)
    attn = cfg.num_layers * 4 * cfg.num_heads * cfg.head_dim * causal_pairs(0, length)
    return 2 * matrices * length + attn + 2 * model.lm_head_weight.numel()


def time_to_first_token(engine: LLMEngine, prompt: list[int], request_id: str) -> tuple[float, float]:
    """(seconds from add_request to the first token, attention seconds of the request), on an idle engine."""
    torch.cuda.synchronize()
    started = time.perf_counter()
    engine.add_request(request_id, prompt, SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))
    attention_s = 0.0
    while engine.has_work:
        for out in engine.step():
            attention_s = out.attention_seconds
    return time.perf_counter() - started, attention_s


def ttft_part(engine: LLMEngine, peak: float, reps: int) -> list[dict]:
    vocab = len(engine.tokenizer)
    rows = []
    print(f"{'prompt':30}{'TTFT ms':>9}{'floor ms':>10}{'TTFT/floor':>11}{'attention ms':>14}")
    # (name, length, chunk budget, SDPA per chunk)
    configs = [(f"{n // K}k whole", n, 32 * K, False) for n in PROMPT_LENS]
    configs += [(f"{n // K}k whole, SDPA", n, 32 * K, True) for n in PROMPT_LENS]
    configs += [("32k in 2k chunks", 32 * K, CHUNK, False), ("32k in 2k chunks, SDPA", 32 * K, CHUNK, True)]
    default = attention.SDPA_PREFILL
    for name, length, budget, sdpa in configs:
        engine.scheduler.max_num_batched_tokens = budget
        attention.SDPA_PREFILL = sdpa
        prompts = make_prompts(reps + 1, length, vocab, seed=length + budget + sdpa)
        runs = [time_to_first_token(engine, p, f"{name}-{i}") for i, p in enumerate(prompts)][
            1:
        ]  # first: warm-up
        ttft = statistics.median(r[0] for r in runs)
        floor = prefill_flops(engine, length) / peak
        attention_s = statistics.median(r[1] for r in runs)
        rows.append(dict(prompt=name, length=length, chunk=budget, sdpa=sdpa, ttft_ms=1e3 * ttft,
                         floor_ms=1e3 * floor, attention_ms=1e3 * attention_s))  # fmt: skip
        print(
            f"{name:30}{1e3 * ttft:9.1f}{1e3 * floor:10.1f}{ttft / floor:11.2f}{1e3 * attention_s:14.1f}",
            flush=True,
        )
    attention.SDPA_PREFILL = default
    for chunked in (r for r in rows if r["chunk"] == CHUNK):
        for whole in (r for r in rows if r["length"] == 32 * K and r["chunk"] != CHUNK):
            print(f"{chunked['prompt']} / {whole['prompt']}: {chunked['ttft_ms'] / whole['ttft_ms']:.3f}x")
    return rows


def profile_part(engine: LLMEngine) -> list[dict]:
    """Where the TTFT of an 8k prompt and of a 32k one in 2k chunks goes (paged kernel, SDPA): kernel time
    by name over one run after a warm-up run, the 12 largest printed."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    pdl, sdpa = launch.PDL_ENABLED, attention.SDPA_PREFILL
    launch.PDL_ENABLED = False
    rows = []
    for name, length, budget, use_sdpa in [("8k whole", 8 * K, 32 * K, False),
                                           ("8k whole, SDPA", 8 * K, 32 * K, True),
                                           ("32k in 2k chunks", 32 * K, CHUNK, False),
                                           ("32k in 2k chunks, SDPA", 32 * K, CHUNK, True)]:  # fmt: skip
        engine.scheduler.max_num_batched_tokens = budget
        attention.SDPA_PREFILL = use_sdpa
        warm, prompt = make_prompts(2, length, len(engine.tokenizer), seed=length + use_sdpa)
        time_to_first_token(engine, warm, f"profile-warm-{name}")
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            ttft, _ = time_to_first_token(engine, prompt, f"profile-{name}")
            torch.cuda.synchronize()
        per_name = {n: sum(t) / 1e3 for n, t in kernel_times(prof).items()}  # ms
        total = sum(per_name.values())
        print(f"{name}: TTFT {1e3 * ttft:.1f} ms (profiled), {total:.1f} ms of kernels", flush=True)
        for kernel, ms in sorted(per_name.items(), key=lambda kv: -kv[1])[:12]:
            print(f"  {ms:8.2f} ms {ms / total:6.1%}  {kernel}", flush=True)
        rows.append(dict(prompt=name, ttft_ms=1e3 * ttft, kernel_ms=total, kernels=per_name))
    launch.PDL_ENABLED, attention.SDPA_PREFILL = pdl, sdpa
    return rows


def lognormal_lengths(count: int, low: int, high: int, seed: int) -> list[int]:
    """Log-normal prompt lengths with median sqrt(low * high), clipped to [low, high]."""
    rng = np.random.default_rng(seed)
    sigma = math.log(high / low) / 4
    lens = rng.lognormal(math.log(math.sqrt(low * high)), sigma, count)
    return [int(n) for n in np.clip(lens, low, high)]


def serving_part(engine: LLMEngine, args: argparse.Namespace) -> dict:
    engine.scheduler.max_num_batched_tokens = args.serving_chunk
    vocab = len(engine.tokenizer)
    # Warm-up, so that no kernel compiles inside the timed run: a few requests of the same length spread,
    # a few tokens each, through steps that mix prefill chunks and decoding.
    warm_params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    for i, n in enumerate(lognormal_lengths(8, 2 * K, 32 * K, seed=1)):
        engine.add_request(f"warm{i}", make_prompts(1, n, vocab, seed=900 + i)[0], warm_params)
    while engine.has_work:
        engine.step()
    lens = lognormal_lengths(args.concurrency, 2 * K, 32 * K, seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    for i, n in enumerate(lens):
        engine.add_request(f"s{i}", make_prompts(1, n, vocab, seed=100 + i)[0], params)
    finished, step_s = [], 0.0
    started = time.perf_counter()
    while engine.has_work:
        finished += [out for out in engine.step() if out.finished]
        step_s += engine.last_step.step_seconds
    wall = time.perf_counter() - started
    ttft = [o.timings.first_token - o.timings.arrival for o in finished]
    tpot = [(o.timings.finished - o.timings.first_token) / (o.completion_tokens - 1) for o in finished]
    return {
        "prompt_lens": lens,
        "wall_s": wall,
        "output_tokens_per_s": sum(o.completion_tokens for o in finished) / wall,
        "attention_share": sum(o.attention_seconds for o in finished) / step_s,
        "ttft_ms": {f"p{q}": 1e3 * float(np.percentile(ttft, q)) for q in (50, 99)},
        "tpot_ms": {f"p{q}": 1e3 * float(np.percentile(tpot, q)) for q in (50, 99)},
        "preemptions": engine.scheduler.num_preemptions,  # the KV cache should hold all 32 (~274k tokens)
    }


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    if rows := results.get("attention"):
        labels = [f"{r['case']} vs {r['peer']}" for r in rows]
        bars = {
            "paged prefill kernel": [r["ours_ms"] for r in rows],
            "peer (contiguous)": [r["peer_ms"] for r in rows],
        }
        _paired_bars(axes[0], labels, bars, "ms (one layer)")
    if rows := results.get("ttft"):
        bars = {"TTFT": [r["ttft_ms"] for r in rows], "compute floor": [r["floor_ms"] for r in rows]}
        _paired_bars(axes[1], [r["prompt"] for r in rows], bars, "ms")
    fig.suptitle(f"Long-context prefill, Llama-3-8B shapes, {results['gpu']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _paired_bars(ax, labels: list[str], bars: dict[str, list[float]], ylabel: str) -> None:
    """Two bars per label (log scale), named in the legend."""
    x = range(len(labels))
    for offset, (name, values) in zip((-0.2, 0.2), bars.items(), strict=True):
        ax.bar([i + offset for i in x], values, 0.4, label=name)
    ax.set_xticks(list(x), labels, rotation=30, ha="right")
    ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.legend()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--parts", nargs="+", choices=["attention", "ttft", "profile", "serving"],
                        default=["attention", "ttft", "serving"])  # fmt: skip
    parser.add_argument("--model", default="benchmarks/models/llama-3-8b")
    parser.add_argument("--tokenizer", default=".cache/leanserve/SmolLM2-135M-Instruct")
    parser.add_argument(
        "--kv-dtypes",
        nargs="+",
        choices=["bf16", "fp8", "fp8-e4m3"],
        default=["bf16", "fp8"],
        help="KV cache dtypes of the serving part",
    )
    parser.add_argument("--reps", type=int, default=3, help="TTFT runs per prompt (after one warm-up run)")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--serving-chunk", type=int, default=8 * K, help="token budget of a serving step")
    parser.add_argument("--out", type=Path, default=Path("out/bench_long_context"))
    parser.add_argument("--tune", action="store_true", help="sweep the kernel's tiles instead")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    setup_process("cuda", seed=0)
    peak = matmul_throughput()
    results: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                     "triton": triton.__version__, "matmul_TFLOPs": peak / 1e12}  # fmt: skip
    print(f"{results['gpu']}, torch {results['torch']}, triton {results['triton']}: "
          f"bf16 matmul {peak / 1e12:.0f} TFLOP/s", flush=True)  # fmt: skip
    if args.tune:
        results["tune"] = tune()
        (args.out / "bench_long_context_tune.json").write_text(json.dumps(results, indent=1))
        return
    if "attention" in args.parts:
        results["attention"] = attention_part(peak)
        torch.cuda.empty_cache()
    # One engine per KV cache dtype: the first also runs the TTFT part.
    dtypes = args.kv_dtypes if "serving" in args.parts else args.kv_dtypes[:1]
    for i, kv_dtype in enumerate(dtypes if {"ttft", "profile", "serving"} & set(args.parts) else []):
        engine = build_engine(args, kv_dtype)
        if i == 0 and "ttft" in args.parts:
            results["ttft"] = ttft_part(engine, peak, args.reps)
        if i == 0 and "profile" in args.parts:
            results["profile"] = profile_part(engine)
        if "serving" in args.parts:
            r = results.setdefault("serving", {})[kv_dtype] = serving_part(engine, args)
            ttft, tpot = r["ttft_ms"], r["tpot_ms"]
            print(
                f"serving {args.concurrency} x 2k-32k prompts, {args.output_len} out, KV {kv_dtype}: "
                f"TTFT p50 {ttft['p50']:.0f} / p99 {ttft['p99']:.0f} ms, "
                f"TPOT p50 {tpot['p50']:.1f} / p99 {tpot['p99']:.1f} ms, "
                f"{r['output_tokens_per_s']:.0f} output tok/s, "
                f"attention {r['attention_share']:.1%} of step time",
                flush=True,
            )
        del engine
        gc.collect()
        torch.cuda.empty_cache()
    (args.out / "bench_long_context.json").write_text(json.dumps(results, indent=1))
    plot(results, args.out / "bench_long_context.png")


if __name__ == "__main__":
    main()
