"""Helpers for the HTTP tests: a real engine on the tiny model, and real uvicorn servers (in threads, on
free localhost ports) serving apps over it. One engine can back several apps (settings differ)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import uvicorn

from leanserve.server.api.app import create_app
from leanserve.server.api.cli import uvicorn_config
from leanserve.server.api.settings import Settings
from leanserve.server.engine.async_engine import AsyncEngine
from leanserve.server.engine.config import EngineConfig


@contextmanager
def real_engine(model_path: Path, **overrides) -> Iterator[AsyncEngine]:
    config = {
        "model": str(model_path),
        "dtype": "float32",
        "device": "cpu",
        "kv_cache_tokens": 8192,
    } | overrides
    engine = AsyncEngine.from_config(EngineConfig(**config))
    engine.start()
    try:
        yield engine
    finally:
        asyncio.run(engine.shutdown(0.0))


@contextmanager
def serve(engine, **settings) -> Iterator[str]:
    """Base URL of a uvicorn server running `create_app(Settings(**settings), engine)`."""
    config = Settings(**settings)
    app = create_app(config, engine)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    # The server's own uvicorn configuration: its protocol and connection limits.
    server = uvicorn.Server(uvicorn_config(app, config, log_config=None, access_log=False, lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def wait_until(condition, timeout: float = 10.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()


def metric_value(base_url: str, sample_name: str, labels: dict[str, str] | None = None) -> float:
    """One sample of GET /metrics (0.0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{base_url}/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == sample_name and (labels is None or labels.items() <= sample.labels.items()):
                return sample.value
    return 0.0


def assert_openai_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    """The error body of `response`, checked to be OpenAI's shape with this status (and `param`)."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error


def openai_client(base_url: str, timeout: float = 120.0) -> openai.OpenAI:
    """The official client against a test server, without retries: a failure shows at once."""
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=timeout)
