"""Schema fuzzing: schemathesis generates requests (valid and invalid) from our own OpenAPI schema and
sends them to a real server on the tiny model. Whatever it sends, the answer is never a 5xx, and errors
keep the OpenAI shape. Bounded to a few hundred cases; the short context keeps generations short."""

from __future__ import annotations

import pytest
import schemathesis
from http_server import real_engine, serve
from hypothesis import HealthCheck, settings

from leanserve.server.api.app import create_app
from leanserve.server.api.settings import Settings


@pytest.fixture(scope="module")
def fuzz_url(tiny_model_path):
    with real_engine(tiny_model_path, max_model_len=48) as engine, serve(engine) as url:
        yield url


# The schema does not depend on the engine: build it from an app with none.
schema = schemathesis.openapi.from_dict(create_app(Settings()).openapi())


@schema.parametrize()
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
def test_no_input_makes_a_server_error(case, fuzz_url):
    response = case.call(base_url=fuzz_url, timeout=60)
    assert response.status_code < 500, f"{case.method} {case.path} {case.body!r} -> {response.text[:300]}"
    if response.status_code >= 400:
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
