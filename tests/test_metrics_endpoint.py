"""GET /metrics on a real server: Prometheus text that `prometheus_client.parser` reads, holding every
contracted series; request-level series move with the requests we send; labels stay bounded."""

from __future__ import annotations

import httpx
import pytest
from http_server import metric_value, openai_client, real_engine, wait_until
from prometheus_client.parser import text_string_to_metric_families

HISTOGRAMS = [
    "leanserve_request_attention_seconds",
    "leanserve_step_attention_seconds",
    "leanserve_time_to_first_token_seconds",
    "leanserve_inter_token_latency_seconds",
    "leanserve_e2e_request_latency_seconds",
    "leanserve_request_queue_seconds",
]
GAUGES = [
    "leanserve_num_requests_running",
    "leanserve_num_requests_waiting",
    "leanserve_kv_cache_usage_ratio",
]
COUNTERS = [
    "leanserve_prompt_tokens_total",
    "leanserve_generation_tokens_total",
    "leanserve_request_success_total",
    "leanserve_num_preemptions_total",
]
# Series one finished request of `max_tokens` tokens moves (name, by how much).
PER_REQUEST = [
    ("leanserve_time_to_first_token_seconds_count", 1),
    ("leanserve_e2e_request_latency_seconds_count", 1),
    ("leanserve_request_queue_seconds_count", 1),
    ("leanserve_request_attention_seconds_count", 1),
    ("leanserve_inter_token_latency_seconds_count", 7),  # max_tokens - 1 gaps
    ("leanserve_generation_tokens_total", 8),
]


@pytest.fixture(scope="module")
def engine(tiny_model_path):
    with real_engine(tiny_model_path, max_model_len=256) as engine:
        yield engine


def _samples(base_url: str) -> list:
    response = httpx.get(f"{base_url}/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return [s for family in text_string_to_metric_families(response.text) for s in family.samples]


def _generate(base_url: str, model: str, stream: bool) -> None:
    client = openai_client(base_url)
    result = client.completions.create(
        model=model, prompt="Count:", max_tokens=8, stream=stream, extra_body={"ignore_eos": True}
    )
    list(result) if stream else None


def test_every_contracted_series_is_exposed(base_url, engine):
    _generate(base_url, engine.model_name, stream=False)
    names = {s.name for s in _samples(base_url)}
    for histogram in HISTOGRAMS:
        assert {f"{histogram}_bucket", f"{histogram}_count", f"{histogram}_sum"} <= names, histogram
    assert set(GAUGES) <= names
    assert set(COUNTERS) <= names


@pytest.mark.parametrize("stream", [False, True])
def test_request_series_move_with_a_request(base_url, engine, stream):
    before = {name: metric_value(base_url, name) for name, _ in PER_REQUEST}
    length = {"finished_reason": "length"}
    finished_before = metric_value(base_url, "leanserve_request_success_total", length)
    _generate(base_url, engine.model_name, stream)
    # Observed as the request ends, which may be a moment after the client has its last byte.
    assert wait_until(
        lambda: metric_value(base_url, "leanserve_request_success_total", length) == finished_before + 1
    )
    for name, delta in PER_REQUEST:
        assert metric_value(base_url, name) == before[name] + delta, name
    assert metric_value(base_url, "leanserve_request_attention_seconds_sum") > 0
    assert metric_value(base_url, "leanserve_kv_cache_usage_ratio") == 0  # idle again


def test_labels_are_bounded(base_url, engine):
    _generate(base_url, engine.model_name, stream=True)
    labels = {key for s in _samples(base_url) if s.name.startswith("leanserve_") for key in s.labels}
    assert labels <= {"le", "finished_reason"}
    reasons = {s.labels["finished_reason"] for s in _samples(base_url) if "finished_reason" in s.labels}
    assert reasons <= {"stop", "length", "abort", "error"}
