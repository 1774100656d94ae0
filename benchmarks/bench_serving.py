"""Serving benchmark in the manner of `vllm bench serve`: streams of random token-id prompts with fixed
input/output lengths (ignore_eos) against a leanserve on this machine, optionally at a Poisson request
rate, with a share of streams cancelled at random moments. Reports TTFT / TPOT / ITL (mean, p50, p99) and
token throughput, then checks that the KV cache is empty again and the server still answers.

    python benchmarks/bench_serving.py --num-prompts 64 --disconnect-fraction 0.3            # running server
    python benchmarks/bench_serving.py --launch "--device cpu" --num-prompts 64              # starts one
Traffic goes to localhost only; every loop is bounded in count and in time (--timeout)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shlex
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np

_LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


@dataclass
class StreamResult:
    ok: bool = False
    cancelled: bool = False
    error: str | None = None
    ttft: float | None = None
    latency: float | None = None
    output_tokens: int = 0
    itls: list[float] = field(default_factory=list)


def _random_prompt(rng: random.Random, length: int, token_range: tuple[int, int]) -> list[int]:
    return [rng.randrange(*token_range) for _ in range(length)]


async def _one_stream(
    client: httpx.AsyncClient, model: str, prompt: list[int], output_len: int, cancel_after: int | None
) -> StreamResult:
    """One streaming completion; with `cancel_after` = k the client goes away after k token chunks."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": output_len,
        "ignore_eos": True,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    result = StreamResult()
    start = time.perf_counter()
    last = start
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    result.error = chunk["error"]["message"]
                    return result
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                if not chunk["choices"]:
                    continue
                now = time.perf_counter()
                if result.ttft is None:
                    result.ttft = now - start
                else:
                    result.itls.append(now - last)
                last = now
                if cancel_after is not None and len(result.itls) + 1 >= cancel_after:
                    result.cancelled = True
                    return result  # leaving the block closes the connection: a client disconnect
        result.latency = time.perf_counter() - start
        result.ok = result.output_tokens == output_len
        if not result.ok:
            result.error = f"got {result.output_tokens} tokens, wanted {output_len}"
    except httpx.HTTPError as e:
        result.error = f"{type(e).__name__}: {e}"
    return result


def _percentiles(values: list[float], scale: float = 1e3) -> dict[str, float]:
    if not values:
        return {"mean": float("nan"), "p50": float("nan"), "p99": float("nan")}
    array = np.asarray(values) * scale
    return {
        "mean": float(array.mean()),
        "p50": float(np.percentile(array, 50)),
        "p99": float(np.percentile(array, 99)),
    }


async def _metric(client: httpx.AsyncClient, name: str) -> float:
    text = (await client.get("/metrics")).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


async def _run(args: argparse.Namespace) -> dict:
    rng = random.Random(args.seed)
    limits = httpx.Limits(
        max_connections=args.max_concurrency + 4, max_keepalive_connections=args.max_concurrency
    )
    timeout = httpx.Timeout(args.timeout, connect=10)
    async with httpx.AsyncClient(base_url=args.base_url, limits=limits, timeout=timeout) as client:
        model = args.model or (await client.get("/v1/models")).json()["data"][0]["id"]
        prompts = [_random_prompt(rng, args.input_len, args.token_range) for _ in range(args.num_prompts)]
        cancel_at = [
            rng.randint(1, max(1, args.output_len - 1)) if rng.random() < args.disconnect_fraction else None
            for _ in prompts
        ]
        gaps = [
            rng.expovariate(args.request_rate) if args.request_rate != float("inf") else 0.0 for _ in prompts
        ]
        semaphore = asyncio.Semaphore(args.max_concurrency)

        async def limited(i: int) -> StreamResult:
            async with semaphore:
                return await _one_stream(client, model, prompts[i], args.output_len, cancel_at[i])

        started = time.perf_counter()
        tasks = []
        for i, gap in enumerate(gaps):
            tasks.append(asyncio.create_task(limited(i)))
            if gap:
                await asyncio.sleep(gap)
        results = await asyncio.wait_for(asyncio.gather(*tasks), timeout=args.timeout)
        duration = time.perf_counter() - started

        # The server must be back to an empty cache and still answer.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            kv = await _metric(client, "leanserve_kv_cache_usage_ratio")
            running = await _metric(client, "leanserve_num_requests_running")
            if kv == 0 and running == 0:
                break
            await asyncio.sleep(0.1)
        health = (await client.get("/health")).status_code
        probe = await client.post(
            "/v1/completions", json={"model": model, "prompt": "Hello", "max_tokens": 4}
        )

    done = [r for r in results if r.ok]
    cancelled = [r for r in results if r.cancelled]
    failed = [r for r in results if not r.ok and not r.cancelled]
    generated = sum(r.output_tokens for r in done) + sum(len(r.itls) + 1 for r in cancelled)
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in done if r.output_tokens > 1]
    return {
        "model": model,
        "num_prompts": args.num_prompts,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "max_concurrency": args.max_concurrency,
        "request_rate": args.request_rate,
        "disconnect_fraction": args.disconnect_fraction,
        "completed": len(done),
        "cancelled": len(cancelled),
        "failed": len(failed),
        "errors": sorted({r.error for r in failed if r.error})[:5],
        "duration_s": duration,
        "request_throughput_rps": len(done) / duration,
        "output_tokens_per_s": generated / duration,
        "total_tokens_per_s": (generated + args.input_len * len(done)) / duration,
        "ttft_ms": _percentiles([r.ttft for r in done]),
        "tpot_ms": _percentiles(tpots),
        "itl_ms": _percentiles([itl for r in done for itl in r.itls]),
        "e2e_ms": _percentiles([r.latency for r in done]),
        "kv_usage_after": kv,
        "running_after": running,
        "health_after": health,
        "probe_after": probe.status_code,
    }


def _print_report(report: dict) -> None:
    print(f"\n== leanserve serving benchmark: {report['model']} ==")
    print(
        f"prompts {report['num_prompts']} x (in {report['input_len']}, out {report['output_len']}), "
        f"concurrency {report['max_concurrency']}, rate {report['request_rate']}/s, "
        f"disconnect fraction {report['disconnect_fraction']}"
    )
    print(f"completed {report['completed']}  cancelled {report['cancelled']}  failed {report['failed']}")
    print(f"duration {report['duration_s']:.2f} s  requests/s {report['request_throughput_rps']:.2f}")
    print(f"output tokens/s {report['output_tokens_per_s']:.1f}", end="  ")
    print(f"total tokens/s {report['total_tokens_per_s']:.1f}")
    print(f"{'metric':<8}{'mean ms':>12}{'p50 ms':>12}{'p99 ms':>12}")
    for name in ("ttft", "tpot", "itl", "e2e"):
        p = report[f"{name}_ms"]
        print(f"{name.upper():<8}{p['mean']:>12.2f}{p['p50']:>12.2f}{p['p99']:>12.2f}")
    print(
        f"after: kv usage {report['kv_usage_after']}, running {report['running_after']}, "
        f"/health {report['health_after']}, probe completion {report['probe_after']}"
    )


@contextmanager
def launched_server(extra_args: str, log_path: Path):
    """(url, pid) of a leanserve subprocess on a free localhost port; SIGTERM (graceful drain) when done,
    then kill. soak.py starts its server with this too."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [
        sys.executable,
        "-m",
        "leanserve.server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *shlex.split(extra_args),
    ]
    root = Path(__file__).resolve().parents[1]
    with log_path.open("w") as log:
        proc = subprocess.Popen(argv, cwd=root, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 900
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
            else:
                raise RuntimeError(f"the server did not become ready; see {log_path}")
            yield url, proc.pid
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base-url", default="http://127.0.0.1:8000", help="a running server (localhost)")
    parser.add_argument(
        "--launch", default=None, help="start `python -m leanserve.server` with these arguments instead"
    )
    parser.add_argument("--model", default=None, help="served model name (default: the server's)")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--max-concurrency", type=int, default=None, help="default: all prompts at once")
    parser.add_argument(
        "--request-rate", type=float, default=float("inf"), help="Poisson arrivals per second"
    )
    parser.add_argument("--disconnect-fraction", type=float, default=0.0)
    parser.add_argument("--token-range", type=int, nargs=2, default=(1000, 30000), help="random prompt ids")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=1200.0, help="bound on the whole run, seconds")
    parser.add_argument("--result-json", type=Path, default=None)
    args = parser.parse_args()
    args.max_concurrency = args.max_concurrency or args.num_prompts
    if not 0.0 <= args.disconnect_fraction <= 1.0:
        parser.error("--disconnect-fraction must lie in [0, 1]")

    def run(base_url: str) -> dict:
        if urlparse(base_url).hostname not in _LOCAL_HOSTS:
            parser.error("the benchmark only sends traffic to this machine (localhost)")
        args.base_url = base_url
        return asyncio.run(_run(args))

    if args.launch is not None:
        log_path = (args.result_json or Path("bench_serving.json")).with_suffix(".server.log")
        with launched_server(args.launch, log_path) as (url, _):
            report = run(url)
        report["server_args"] = args.launch
    else:
        report = run(args.base_url)
    report["host"] = {
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }
    _print_report(report)
    if args.result_json:
        args.result_json.write_text(json.dumps(report, indent=2))
    healthy = report["kv_usage_after"] == 0 and report["health_after"] == report["probe_after"] == 200
    if report["failed"] or not healthy:
        sys.exit(f"FAILED: {report['failed']} failed streams, server healthy after the run: {healthy}")


if __name__ == "__main__":
    main()
