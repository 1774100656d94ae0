"""Whole-engine decode benchmark (scheduling, CUDA graphs, sampling, detokenization included).

GPU: Llama-3-8B shapes with random bf16 weights (`load_format="dummy"`), token-id prompts, ignore_eos:
TPOT at batch 1 with a 1k context and decode throughput of 64 concurrent 1k-prompt / 1k-output requests,
each beside the floor = (weight + KV bytes read per step) / HBM read bandwidth measured in the same run;
the same with FP8 weights (`--quantization fp8`, against its own floor: 1 byte a weight plus the scales);
then the per-request attention timing on vs off, asynchronous scheduling on vs off and programmatic
dependent launch on vs off (`--variants` runs a subset, e.g. `timing_on fp8` within a short time limit).
CPU: SmolLM2 single-stream tokens/s. `--profile`: kernel time per decode step by kernel (GPU).
Prints a table and writes JSON + a plot (per-step time vs floor) to --out."""

from __future__ import annotations

import argparse
import gc
import json
import logging
import platform
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from leanserve.kernels import launch
from leanserve.server.engine.config import EngineConfig
from leanserve.server.engine.llm_engine import LLMEngine
from leanserve.server.engine.runtime import settle_process, setup_process
from leanserve.server.engine.sampling_params import SamplingParams


@dataclass
class DecodeRun:
    """Per pure-decode step: wall seconds, seconds waiting on the device, batch size, KV tokens read."""

    step_s: list[float] = field(default_factory=list)
    sync_s: list[float] = field(default_factory=list)
    batch: list[int] = field(default_factory=list)
    kv_tokens: list[int] = field(default_factory=list)
    attention_s: float = 0.0  # attention time attributed to the requests, summed
    # Python's cyclic garbage collections during the run: (pure-decode steps before it, generation, ms).
    gc_pauses: list[tuple[int, int, float]] = field(default_factory=list)

    def floor_s(self, weight_bytes: int, kv_bytes_per_token: int, bandwidth: float) -> list[float]:
        return [(weight_bytes + kv_bytes_per_token * kv) / bandwidth for kv in self.kv_tokens]


def read_bandwidth(device: torch.device, gib: int = 4) -> float:
    """HBM read bandwidth in bytes/s: best of 20 full reductions over a `gib` GiB tensor."""
    x = torch.ones(gib << 29, dtype=torch.bfloat16, device=device)
    x.sum()
    best = float("inf")
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        x.sum()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    del x
    return (gib << 30) / best


def weight_bytes_read(engine: LLMEngine) -> int:
    """Bytes of weights one decode step reads: every parameter except the input embedding table (only a
    few rows are gathered), counting a tied LM head once; FP8 weights at 1 byte each plus their fp32
    scales."""
    model = engine.runner.model
    params = {id(p): p for p in model.parameters()}
    total = sum(p.numel() * p.element_size() for p in params.values())
    if not model.config.tie_word_embeddings:
        total -= model.embed_weight.numel() * model.embed_weight.element_size()
    return total


def kv_bytes_per_token(engine: LLMEngine) -> int:
    cfg, cache = engine.runner.model.config, engine.runner.kv_cache.data
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * cache.element_size()


def run_decode(engine: LLMEngine, prompts: list[list[int]], max_tokens: int) -> DecodeRun:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"b{i}", prompt, params)
    run = DecodeRun()
    started = 0.0

    def on_gc(phase: str, info: dict) -> None:
        nonlocal started
        if phase == "start":
            started = time.perf_counter()
        else:
            run.gc_pauses.append((len(run.step_s), info["generation"], 1e3 * (time.perf_counter() - started)))

    gc.callbacks.append(on_gc)
    try:
        _decode_until_done(engine, run)
    finally:
        gc.callbacks.remove(on_gc)
    return run


def _decode_until_done(engine: LLMEngine, run: DecodeRun) -> None:
    while engine.has_work:
        running = engine.scheduler.running
        pure_decode = not engine.scheduler.waiting and all(s.num_uncomputed == 1 for s in running)
        kv = sum(len(s.token_ids) for s in running)
        batch = len(running)
        for out in engine.step():
            if out.finished:
                run.attention_s += out.attention_seconds
        if pure_decode:
            run.step_s.append(engine.last_step.step_seconds)
            run.sync_s.append(engine.last_step.sync_seconds)
            run.batch.append(batch)
            run.kv_tokens.append(kv)


# Engine variants: (attention timing, async scheduling, programmatic dependent launch, quantization).
# timing_on always runs first and the others after it in this order: fp8 against its own floor, then the
# overhead variants, compared with timing_on's first steps.
VARIANTS = {
    "timing_on": (True, True, True, "none"),
    "fp8": (True, True, True, "fp8"),
    "timing_off": (False, True, True, "none"),
    "sync": (True, False, True, "none"),
    "pdl_off": (True, True, False, "none"),
}
# Variants that decode the full --output-len in the concurrent run (the others: the overhead one).
FULL_RUNS = ("timing_on", "fp8")


def make_prompts(num: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1000, vocab) for _ in range(length)] for _ in range(num)]


def gpu_config(
    args: argparse.Namespace, async_scheduling: bool | None = None, quantization: str = "none"
) -> EngineConfig:
    """The engine the GPU runs measure: Llama-3-8B shapes with dummy bf16 (or FP8) weights."""
    return EngineConfig(
        model=args.model,
        tokenizer=args.tokenizer,
        load_format="dummy",
        quantization=quantization,
        dtype="bfloat16",
        device="cuda",
        max_num_seqs=args.concurrency,
        max_num_batched_tokens=8192,
        max_model_len=4096,
        async_scheduling=async_scheduling,
    )


def gpu_benchmark(args: argparse.Namespace) -> dict:
    device = torch.device("cuda")
    bandwidth = read_bandwidth(device)
    results: dict = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "read_bandwidth_GBps": bandwidth / 1e9,
    }
    # The decode graphs are captured when the engine is built.
    for key in args.variants:
        timing, async_scheduling, pdl, quantization = VARIANTS[key]
        launch.PDL_ENABLED = pdl
        logging.info("[%s] building the engine", key)
        config = gpu_config(args, async_scheduling, quantization)
        engine = LLMEngine.from_config(config, time_attention=timing)
        settle_process()
        weights, kv_token = weight_bytes_read(engine), kv_bytes_per_token(engine)
        vocab = len(engine.tokenizer)
        run_decode(engine, make_prompts(2, 64, vocab, seed=9), 16)  # warm-up (caches, allocator)
        tpot = run_decode(engine, make_prompts(1, args.context, vocab), args.tpot_tokens)
        # For the comparisons a shorter concurrent run suffices.
        out_len = args.output_len if key in FULL_RUNS else args.overhead_output_len
        concurrent = run_decode(engine, make_prompts(args.concurrency, args.context, vocab, 1), out_len)
        tpot_floor = statistics.median(tpot.floor_s(weights, kv_token, bandwidth))
        conc_floor = concurrent.floor_s(weights, kv_token, bandwidth)
        steps = concurrent.step_s
        if key not in FULL_RUNS:  # the same steps as timing_on's first ones
            on = results["timing_on"]["concurrent_step_ms_list"][: len(steps)]
            results[f"{key}_vs_on_concurrent_pct"] = 100 * (sum(x * 1e3 for x in steps) / sum(on) - 1)
        results[key] = {
            "weight_GB": weights / 1e9,
            "kv_cache_blocks": engine.block_manager.pool.num_blocks,
            "tpot_ms": 1e3 * statistics.median(tpot.step_s),
            "tpot_floor_ms": 1e3 * tpot_floor,
            "tpot_host_ms": 1e3
            * statistics.median(s - w for s, w in zip(tpot.step_s, tpot.sync_s, strict=True)),
            "concurrent_tokens_per_s": sum(concurrent.batch) / sum(steps),
            "concurrent_floor_tokens_per_s": sum(concurrent.batch) / sum(conc_floor),
            "concurrent_floor_ratio": sum(conc_floor) / sum(steps),
            "concurrent_mean_step_ms": 1e3 * sum(steps) / len(steps),
            "concurrent_host_ms": 1e3
            * statistics.median(s - w for s, w in zip(steps, concurrent.sync_s, strict=True)),
            "concurrent_step_ms_list": [1e3 * s for s in steps],
            "concurrent_floor_ms_list": [1e3 * f for f in conc_floor],
            "attention_seconds_attributed": concurrent.attention_s,
            "concurrent_gc_pauses": concurrent.gc_pauses,
            "preemptions": engine.scheduler.num_preemptions,
        }
        r = results[key]
        # One line per configuration as it finishes: a run cut off by its time limit still reports.
        print(
            f"[{key}] TPOT {r['tpot_ms']:.2f} ms (floor {r['tpot_floor_ms']:.2f}), "
            f"{args.concurrency}-way {r['concurrent_tokens_per_s']:.0f} tok/s "
            f"({r['concurrent_floor_ratio']:.1%} of floor, {len(steps)} steps)",
            flush=True,
        )
        del engine
        gc.collect()
        torch.cuda.empty_cache()
    launch.PDL_ENABLED = True
    if "timing_off" in results:
        on, off = results["timing_on"], results["timing_off"]
        results["timing_overhead_tpot_pct"] = 100 * (on["tpot_ms"] / off["tpot_ms"] - 1)
        results["timing_overhead_concurrent_pct"] = 100 * (
            1 / (1 + results["timing_off_vs_on_concurrent_pct"] / 100) - 1
        )
    return results


def kernel_times(prof) -> dict[str, list[float]]:
    """A torch profiler run's CUDA kernel times (us) by kernel name (its first 80 characters)."""
    per_name: dict[str, list[float]] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            per_name.setdefault(e.name[:80], []).append(e.device_time)
    return per_name


def profile(args: argparse.Namespace) -> None:
    """Kernel time per decode step by kernel name (torch profiler over 10 steps after 20 warm-up steps),
    at batch 1 and at --concurrency, with --context tokens of prompt. PDL is off here: a kernel launched
    early sits in its wait for the one before it, and the profiler counts that wait as its time (on an
    H100 at batch 1 the SiLU kernel read 80 us a call and the step 11 ms of kernels against 5.9 ms)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    launch.PDL_ENABLED = False
    engine = LLMEngine.from_config(gpu_config(args, quantization=args.quantization))
    settle_process()
    params = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    for batch in (1, args.concurrency):
        for i, prompt in enumerate(make_prompts(batch, args.context, len(engine.tokenizer), seed=batch)):
            engine.add_request(f"p{batch}-{i}", prompt, params)
        for _ in range(20):
            engine.step()
        torch.cuda.synchronize()
        steps = 10
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                engine.step()
            torch.cuda.synchronize()
        per_name = kernel_times(prof)
        total = sum(map(sum, per_name.values())) / steps
        count = sum(map(len, per_name.values())) / steps
        print(f"batch {batch}: {total / 1e3:.2f} ms of kernels per step, {count:.0f} kernels")
        for name, times in sorted(per_name.items(), key=lambda kv: -sum(kv[1]))[:15]:
            print(f"  {sum(times) / steps:8.1f} us  x{len(times) / steps:4.0f}  {name}")
        while engine.has_work:
            for request_id in list(engine.requests):
                engine.abort(request_id)
            engine.step()


def cpu_benchmark(args: argparse.Namespace) -> dict:
    engine = LLMEngine.from_config(EngineConfig(device="cpu", kv_cache_tokens=8192))
    settle_process()
    tok = engine.tokenizer
    messages = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    prompt = prompt["input_ids"] if hasattr(prompt, "keys") else prompt  # a BatchEncoding in transformers 5
    run_decode(engine, [prompt], 32)  # warm-up (the first steps of a process are slow under load)
    run = run_decode(engine, [prompt], args.cpu_tokens)
    return {
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "dtype": str(engine.runner.kv_cache.data.dtype),
        "single_stream_tokens_per_s": len(run.step_s) / sum(run.step_s),
        # Other jobs on a shared 2-core machine inflate the mean (a stalled step counts whole); the median
        # step is robust to a few stalls, and the fastest step estimates an idle machine.
        "median_step_tokens_per_s": 1.0 / statistics.median(run.step_s),
        "best_step_tokens_per_s": 1.0 / min(run.step_s),
    }


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for key, name in (("timing_on", "bf16"), ("fp8", "fp8")):
        if key in results:
            ax.plot(results[key]["concurrent_step_ms_list"], label=f"{name} engine decode step")
            ax.plot(
                results[key]["concurrent_floor_ms_list"], label=f"{name} floor: (weights + KV) / bandwidth"
            )
    ax.set_xlabel("decode step")
    ax.set_ylabel("ms")
    ax.set_title(f"Llama-3-8B shapes, {results['gpu']}, batch {results['concurrency']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--model", default="benchmarks/models/llama-3-8b")
    parser.add_argument("--tokenizer", default=".cache/leanserve/SmolLM2-135M-Instruct")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--tpot-tokens", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=1024)
    parser.add_argument("--overhead-output-len", type=int, default=256)
    parser.add_argument("--cpu-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("out/bench_engine"))
    parser.add_argument("--profile", action="store_true", help="kernel time per step instead (GPU)")
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=list(VARIANTS),
        default=list(VARIANTS),
        help="GPU engine variants to build and run (each costs a start-up: minutes on a cold Triton cache)",
    )
    parser.add_argument(
        "--quantization", choices=["none", "fp8"], default="none", help="--profile's weights (GPU)"
    )
    args = parser.parse_args()
    args.variants = ["timing_on"] + [v for v in VARIANTS if v in args.variants and v != "timing_on"]
    args.out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")  # start-up phases
    setup_process(args.device, seed=0)
    if args.profile:
        profile(args)
        return
    if args.device == "cpu":
        results = cpu_benchmark(args)
        print(
            f"CPU single-stream ({results['threads']} threads, {results['dtype']}): "
            f"{results['single_stream_tokens_per_s']:.1f} tok/s "
            f"(median step: {results['median_step_tokens_per_s']:.1f} tok/s, "
            f"fastest step: {results['best_step_tokens_per_s']:.1f} tok/s)"
        )
    else:
        results = gpu_benchmark(args) | {"concurrency": args.concurrency, "context": args.context}
        print_gpu_table(results, args.concurrency)
        plot(results, args.out / "bench_engine.png")
    (args.out / f"bench_engine_{args.device}.json").write_text(json.dumps(results, indent=1))


def print_gpu_table(results: dict, concurrency: int) -> None:
    """The table of the configurations that ran: bf16 and FP8 against their floors, then the overheads."""
    print(f"{results['gpu']}  read bandwidth {results['read_bandwidth_GBps']:.0f} GB/s")
    print(f"{'':40}{'engine':>12}{'floor':>12}{'floor/engine':>14}")
    for key, name in (("timing_on", "bf16"), ("fp8", "fp8")):
        if key not in results:
            continue
        r = results[key]
        print(
            f"{f'{name} TPOT, batch 1, 1k context (ms)':40}{r['tpot_ms']:12.2f}{r['tpot_floor_ms']:12.2f}"
            f"{r['tpot_floor_ms'] / r['tpot_ms']:14.1%}"
        )
        print(
            f"{f'{name} decode, {concurrency} x 1k/1k (tok/s)':40}{r['concurrent_tokens_per_s']:12.0f}"
            f"{r['concurrent_floor_tokens_per_s']:12.0f}{r['concurrent_floor_ratio']:14.1%}"
        )
    on = results["timing_on"]
    print(
        f"host time per step (not waiting on the GPU): batch 1 {on['tpot_host_ms']:.2f} ms, "
        f"batch {concurrency} {on['concurrent_host_ms']:.2f} ms"
    )
    pause_ms = [p[2] for p in on["concurrent_gc_pauses"]]
    print(
        f"garbage collections in the {concurrency}-way run: {len(pause_ms)}, "
        f"{sum(pause_ms):.1f} ms in all, longest {max(pause_ms, default=0):.1f} ms"
    )
    if "timing_off" in results:
        print(
            f"attention timing overhead: TPOT {results['timing_overhead_tpot_pct']:+.2f}% "
            f"({results['timing_off']['tpot_ms']:.2f} ms off), "
            f"{concurrency}-way {results['timing_overhead_concurrent_pct']:+.2f}%"
        )
    if "sync" in results:
        sync = results["sync"]
        print(
            f"without async scheduling: TPOT {sync['tpot_ms']:.2f} ms (host {sync['tpot_host_ms']:.2f} ms), "
            f"{concurrency}-way steps {results['sync_vs_on_concurrent_pct']:+.1f}% longer "
            f"(host {sync['concurrent_host_ms']:.2f} ms)"
        )
    if "pdl_off" in results:
        print(
            f"without programmatic dependent launch: TPOT {results['pdl_off']['tpot_ms']:.2f} ms, "
            f"{concurrency}-way steps {results['pdl_off_vs_on_concurrent_pct']:+.1f}% longer"
        )


if __name__ == "__main__":
    main()
