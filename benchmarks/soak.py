"""Reliability soak: concurrent clients against one leanserve for a bounded time, with random
cancellations (streams dropped after a few chunks, non-streaming requests given up mid-way) and slow
readers, a little malformed input, and health checks. Reports the server's RSS over time (start, after
warm-up, end, and its slope after warm-up), latency percentiles, outcomes by status, and the gauges
(running / waiting requests, KV cache usage) from /metrics once the load has stopped.

    python benchmarks/soak.py --duration 180                                   # starts the default model
    python benchmarks/soak.py --server-args "--model /path/to/tiny --device cpu"  # starts that model
    python benchmarks/soak.py --url http://127.0.0.1:8000 --pid 1234           # a running server

Traffic goes to this machine only (127.0.0.1 / localhost). Everything is bounded: the load stops at
--duration, every request has a timeout, the drain afterwards is bounded, and a launched server is
stopped with SIGTERM (then killed) at the end. Exit status 1 when a 5xx was seen or the gauges did not
return to 0."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shlex
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np
from bench_serving import launched_server  # benchmarks/ is the script's directory

_LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
_WORDS = ["the", "a", "model", "server", "token", "stream", "cancel", "slow", "reader", "batch", "cache"]


@dataclass
class Tally:
    outcomes: Counter = field(default_factory=Counter)  # "200", "499-client-cancel", "ReadTimeout", ...
    latencies: dict[str, list[float]] = field(default_factory=lambda: {"stream": [], "whole": [], "ttft": []})
    rss: list[tuple[float, float]] = field(default_factory=list)  # (seconds since start, MiB)


def _rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _prompt(rng: random.Random) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 40)))


async def _stream(client, rng, model, tally, cancel: bool, slow: bool, chat: bool) -> None:
    max_tokens = rng.randint(8, 64)
    if chat:
        path, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": _prompt(rng)}]}
    else:
        path, body = "/v1/completions", {"prompt": _prompt(rng)}
    body |= {"model": model, "max_tokens": max_tokens, "stream": True, "n": rng.choice([1, 1, 1, 2])}
    cancel_after = rng.randint(1, max_tokens) if cancel else None
    start = time.monotonic()
    chunks = 0
    async with client.stream("POST", path, json=body) as response:
        if response.status_code != 200:
            await response.aread()
            tally.outcomes[str(response.status_code)] += 1
            return
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            if '"error"' in line[:20]:
                tally.outcomes["200-stream-error-event"] += 1
                return
            chunks += 1
            if chunks == 1:
                tally.latencies["ttft"].append(time.monotonic() - start)
            if slow:
                await asyncio.sleep(rng.uniform(0.05, 0.3))
            if cancel_after is not None and chunks >= cancel_after:
                tally.outcomes["client-cancelled-stream"] += 1
                return  # leaving the context closes the connection mid-stream
    tally.latencies["stream"].append(time.monotonic() - start)
    tally.outcomes["200"] += 1


async def _whole(client, rng, model, tally, cancel: bool) -> None:
    body = {"model": model, "prompt": _prompt(rng), "max_tokens": rng.randint(8, 64)}
    start = time.monotonic()
    try:
        if cancel:  # give up mid-way: the client disconnects, the server logs a 499 and aborts
            response = await asyncio.wait_for(
                client.post("/v1/completions", json=body), timeout=rng.uniform(0.05, 0.5)
            )
        else:
            response = await client.post("/v1/completions", json=body)
    except TimeoutError:
        tally.outcomes["client-cancelled-whole"] += 1
        return
    tally.outcomes[str(response.status_code)] += 1
    if response.status_code == 200:
        tally.latencies["whole"].append(time.monotonic() - start)


async def _odd(client, rng, model, tally) -> None:
    """A little hostile input: each must be a 4xx, never a 5xx."""
    body = rng.choice(
        [
            b'{"prompt": "\\ud800abc", "model": "%s"}' % model.encode(),
            b'{"prompt": "x", "stop": ["' + b"a" * 5000 + b'"]}',
            b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}",
            b'{"prompt": "x", "n": 1000}',
            b"{oops",
        ]
    )
    response = await client.post(
        "/v1/completions", content=body, headers={"content-type": "application/json"}
    )
    tally.outcomes[f"{response.status_code}-malformed"] += 1


async def _worker(client, rng, model, tally, deadline, args) -> None:
    while time.monotonic() < deadline:
        roll = rng.random()
        cancel = rng.random() < args.cancel_fraction
        try:
            if roll < 0.02:
                await _odd(client, rng, model, tally)
            elif roll < 0.04:
                response = await client.head("/health")
                tally.outcomes[f"{response.status_code}-health"] += 1
            elif roll < 0.25:
                await _whole(client, rng, model, tally, cancel)
            else:
                slow = rng.random() < args.slow_fraction
                await _stream(client, rng, model, tally, cancel, slow, chat=roll < 0.45)
        except httpx.HTTPError as e:
            tally.outcomes[type(e).__name__] += 1


async def _sample_rss(pid: int | None, tally: Tally, t0: float, stop: asyncio.Event, every: float) -> None:
    while pid is not None:
        if (rss := _rss_mib(pid)) is not None:
            tally.rss.append((time.monotonic() - t0, rss))
        try:
            await asyncio.wait_for(stop.wait(), timeout=every)
            return
        except TimeoutError:
            pass


def _gauges(text: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    wanted = {
        "leanserve_num_requests_running",
        "leanserve_num_requests_waiting",
        "leanserve_kv_cache_usage_ratio",
        "leanserve_num_preemptions_total",
        "leanserve_generation_tokens_total",
    }
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in wanted:
                values[sample.name] = sample.value
            elif sample.name == "leanserve_request_success_total":
                values[f"finished[{sample.labels['finished_reason']}]"] = sample.value
    return values


def _percentiles(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    p = np.percentile(values, [50, 90, 99])
    return {"n": len(values), "p50_s": round(p[0], 3), "p90_s": round(p[1], 3), "p99_s": round(p[2], 3)}


async def _soak(args, url: str, pid: int | None) -> dict:
    limits = httpx.Limits(max_connections=args.concurrency * 2, max_keepalive_connections=args.concurrency)
    timeout = httpx.Timeout(60.0, connect=10.0)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout) as client:
        model = args.model or (await client.get("/v1/models")).json()["data"][0]["id"]
        tally = Tally()
        t0 = time.monotonic()
        stop = asyncio.Event()
        sampler = asyncio.create_task(_sample_rss(pid, tally, t0, stop, args.rss_every))
        rngs = [random.Random(args.seed * 1000 + i) for i in range(args.concurrency)]
        deadline = t0 + args.duration
        workers = [_worker(client, rng, model, tally, deadline, args) for rng in rngs]
        # Bounded even if a request hangs: every request has its own timeout besides.
        try:
            await asyncio.wait_for(asyncio.gather(*workers), timeout=args.duration + 90)
        except TimeoutError:
            tally.outcomes["soak-deadline-cut"] += 1
        load_end = time.monotonic() - t0
        drained = False  # the gauges back to 0 once the last aborts have been processed
        for _ in range(60):
            gauges = _gauges((await client.get("/metrics")).text)
            running = gauges.get("leanserve_num_requests_running", -1)
            waiting = gauges.get("leanserve_num_requests_waiting", -1)
            if running == waiting == gauges.get("leanserve_kv_cache_usage_ratio", -1) == 0:
                drained = True
                break
            await asyncio.sleep(0.5)
        await asyncio.sleep(min(args.rss_every, 5))
        if pid is not None and (rss := _rss_mib(pid)) is not None:
            tally.rss.append((time.monotonic() - t0, rss))
        stop.set()
        await sampler
    return _report(args, tally, gauges, drained, load_end)


def _report(args, tally: Tally, gauges: dict, drained: bool, load_end: float) -> dict:
    report: dict = {
        "duration_s": args.duration,
        "load_seconds": round(load_end, 1),
        "concurrency": args.concurrency,
        "cancel_fraction": args.cancel_fraction,
        "slow_fraction": args.slow_fraction,
        "outcomes": dict(sorted(tally.outcomes.items())),
        "server_errors_5xx": sum(v for k, v in tally.outcomes.items() if k[:1] == "5"),
        "latency": {k: _percentiles(v) for k, v in tally.latencies.items()},
        "gauges_after": gauges,
        "gauges_back_to_zero": drained,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    }
    if tally.rss:
        warm = args.warm_up if args.warm_up is not None else min(60.0, args.duration / 4)
        after_warm = [(t, r) for t, r in tally.rss if t >= warm and t <= load_end]
        slope = None
        if len(after_warm) >= 3:
            ts, rs = np.array(after_warm).T
            slope = round(float(np.polyfit(ts, rs, 1)[0]) * 60, 2)
        report["rss_mib"] = {
            "start": round(tally.rss[0][1], 1),
            "after_warm_up": round(after_warm[0][1], 1) if after_warm else None,
            "end_of_load": round(after_warm[-1][1], 1) if after_warm else None,
            "after_drain": round(tally.rss[-1][1], 1),
            "max": round(max(r for _, r in tally.rss), 1),
            "slope_after_warm_up_mib_per_min": slope,
            "warm_up_s": warm,
            "samples": [(round(t, 1), round(r, 1)) for t, r in tally.rss],
        }
    return report


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=180.0, help="seconds of load (default 180)")
    parser.add_argument("--url", default=None, help="a running server on this machine (else one is started)")
    parser.add_argument("--pid", type=int, default=None, help="with --url: the server's pid, for its RSS")
    parser.add_argument(
        "--server-args", default="", help="arguments for the started `leanserve` (default: none)"
    )
    parser.add_argument("--model", default=None, help="served model name (default: the server's)")
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent clients")
    parser.add_argument("--cancel-fraction", type=float, default=0.3, help="requests the client gives up")
    parser.add_argument("--slow-fraction", type=float, default=0.2, help="streams read slowly")
    parser.add_argument("--rss-every", type=float, default=5.0, help="seconds between RSS samples")
    parser.add_argument("--warm-up", type=float, default=None, help="seconds (default: min(60, duration/4))")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log", type=Path, default=Path("out/soak-server.log"), help="started server's log")
    parser.add_argument("--json-out", type=Path, default=None, help="also write the report here")
    args = parser.parse_args()
    if args.duration <= 0 or args.duration > 24 * 3600:
        parser.error("--duration must be in (0, 86400] seconds")
    if args.url is not None:
        if urlparse(args.url).hostname not in _LOCAL_HOSTS:
            parser.error("the soak only sends traffic to this machine (127.0.0.1 / localhost)")
        report = asyncio.run(_soak(args, args.url.rstrip("/"), args.pid))
    else:
        args.log.parent.mkdir(parents=True, exist_ok=True)
        with launched_server(args.server_args, args.log) as (url, pid):
            report = asyncio.run(_soak(args, url, pid))
        log_text = args.log.read_text(errors="replace")
        report["server_log"] = {
            "tracebacks": log_text.count("Traceback (most recent call last)"),
            "status_500_lines": log_text.count(" status=500"),
            "status_499_lines": log_text.count(" status=499"),
            "nanobind_leak_lines": log_text.count("nanobind: leaked"),
        }
    report["command"] = " ".join(shlex.quote(a) for a in sys.argv)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json_out is not None:
        args.json_out.write_text(text + "\n")
    sys.exit(0 if report["server_errors_5xx"] == 0 and report["gauges_back_to_zero"] else 1)


if __name__ == "__main__":
    main()
