"""Prometheus metrics (names documented in docs/api.md), published by the HTTP layer alone: request-level
series as requests finish (serving.py), per-step series from the engine's `StepStats` (`observe_step`),
the engine's gauges and totals read from `EngineStats` at each scrape (`EngineCollector`). Labels are
bounded: never a request id."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from leanserve.server.engine.async_engine import AsyncEngine
    from leanserve.server.engine.llm_engine import StepStats

# vLLM-like latency buckets (seconds).
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0)  # fmt: skip
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
                0.3, 0.4, 0.5, 0.75, 1.0, 2.5)  # fmt: skip
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                240.0, 480.0, 960.0)  # fmt: skip
# Attention is our product: fine buckets from 100 us.
_ATTENTION_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                      2.5, 5.0, 10.0, 30.0, 60.0)  # fmt: skip
_STEP_ATTENTION_BUCKETS = (0.00002, 0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05,
                           0.1, 0.2, 0.5, 1.0)  # fmt: skip

request_attention = Histogram(
    "leanserve_request_attention_seconds",
    "Attention time attributed to a request over its life (prefill + its share of decode steps).",
    buckets=_ATTENTION_BUCKETS,
)
step_attention = Histogram(
    "leanserve_step_attention_seconds",
    "Attention kernel time of one decode step, all layers.",
    buckets=_STEP_ATTENTION_BUCKETS,
)
time_to_first_token = Histogram(
    "leanserve_time_to_first_token_seconds",
    "From HTTP arrival to the first generated token.",
    buckets=_TTFT_BUCKETS,
)
inter_token_latency = Histogram(
    "leanserve_inter_token_latency_seconds",
    "Time between consecutive generated tokens of a request.",
    buckets=_ITL_BUCKETS,
)
e2e_request_latency = Histogram(
    "leanserve_e2e_request_latency_seconds",
    "From HTTP arrival to the last token.",
    buckets=_E2E_BUCKETS,
)
request_queue_time = Histogram(
    "leanserve_request_queue_seconds",
    "Time a request waited before it was first scheduled.",
    buckets=_E2E_BUCKETS,
)
request_success = Counter(
    "leanserve_request_success", "Finished requests by finish reason.", labelnames=["finished_reason"]
)


def observe_step(stats: StepStats) -> None:
    """The engine loop's step observer (runs on the engine thread)."""
    for seconds in stats.decode_attention_seconds:
        step_attention.observe(seconds)


class EngineCollector(Collector):
    """The serving engine's gauges and totals, read at scrape time (also while the engine loop idles)."""

    def __init__(self) -> None:
        self.engine: AsyncEngine | None = None  # the engine the app serves; None while it loads

    def collect(self) -> Iterator[Metric]:
        if self.engine is None:
            return
        stats = self.engine.stats()
        gauges = (
            (
                "leanserve_num_requests_running",
                "Sequences in the running batch (each choice counts).",
                stats.num_running,
            ),
            (
                "leanserve_num_requests_waiting",
                "Sequences waiting to be scheduled (each choice counts).",
                stats.num_waiting,
            ),
            ("leanserve_kv_cache_usage_ratio", "Fraction of KV cache blocks in use (0..1).", stats.kv_usage),
        )
        for name, documentation, value in gauges:
            yield GaugeMetricFamily(name, documentation, value=value)
        counters = (
            ("leanserve_prompt_tokens", "Prompt tokens processed.", stats.prompt_tokens),
            ("leanserve_generation_tokens", "Tokens generated.", stats.generation_tokens),
            (
                "leanserve_num_preemptions",
                "Sequences preempted (recompute) for lack of KV blocks or to give a waiting request a slot.",
                stats.num_preemptions,
            ),
            (
                "leanserve_prefix_cache_queries",
                "Prompt tokens looked up in the prefix cache.",
                stats.prefix_cache_queries,
            ),
            (
                "leanserve_prefix_cache_hits",
                "Prompt tokens found in the prefix cache.",
                stats.prefix_cache_hits,
            ),
        )
        for name, documentation, value in counters:
            yield CounterMetricFamily(name, documentation, value=value)


engine_collector = EngineCollector()
REGISTRY.register(engine_collector)


def publish(engine: AsyncEngine) -> None:
    """Publish `engine`'s metrics: its gauges and totals at each scrape, its steps as they run."""
    engine_collector.engine = engine
    engine.step_observer = observe_step
