"""Schema fuzzing: schemathesis generates requests (valid and invalid) from our own OpenAPI schema and
sends them to a real server on the tiny model. Whatever it sends, the answer is never a 5xx, and errors
keep the OpenAI shape. Bounded to a few hundred cases; the short context keeps generations short. A
second fuzzer sends what schemathesis does not: lone surrogates, huge and deeply nested values."""

from __future__ import annotations

import json

import httpx
import pytest
import schemathesis
from http_server import real_engine, serve
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from leanserve.server.api.app import create_app
from leanserve.server.api.protocol import ChatRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
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


# Hostile values that schemathesis does not generate (it keeps to valid UTF-8 and small sizes): lone
# surrogates (as JSON escapes and as raw ED A0 80 bytes), huge strings, numbers and arrays, and deep
# nesting, in the fields of every request schema. Values are JSON text, so any depth can be written.
_ROUTES = {
    "/v1/completions": CompletionRequest,
    "/v1/chat/completions": ChatRequest,
    "/tokenize": TokenizeRequest,
    "/detokenize": DetokenizeRequest,
}
_any_char = st.one_of(st.characters(), st.characters(categories=["Cs"]))
_text = st.text(_any_char, max_size=12)
_scalar = st.one_of(
    _text.map(json.dumps),  # surrogates as \ud800 escapes
    _text.map(lambda t: json.dumps(t, ensure_ascii=False)),  # surrogates as raw bytes (surrogatepass)
    st.integers(-(2**70), 2**70).map(str),
    st.integers(20, 5000).map(lambda k: "9" * k),
    st.sampled_from(["1e999", "-1e999", "1e-999", "-0.0", "true", "false", "null", "0", "1", "2", "[]"]),
    st.floats(allow_nan=False).map(json.dumps),
)
_small = st.recursive(
    _scalar,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3).map(lambda items: "[" + ",".join(items) + "]"),
        st.dictionaries(_text.map(json.dumps), inner, max_size=3).map(
            lambda d: "{" + ",".join(f"{k}:{v}" for k, v in d.items()) + "}"
        ),
    ),
    max_leaves=5,
)


def _nest(depth: int, inner: str, kind: str) -> str:
    return ("[" * depth + inner + "]" * depth) if kind == "list" else ('{"a":' * depth + inner + "}" * depth)


_big = st.one_of(  # each at most a few MB: the body limit (1 MiB) answers the largest with 413
    st.builds(lambda c, n: json.dumps(c * n, ensure_ascii=False), _any_char, st.integers(1_000, 300_000)),
    st.builds(_nest, st.integers(1, 3000), _scalar, st.sampled_from(["list", "dict"])),
    st.builds(lambda v, n: "[" + ",".join([v] * n) + "]", _scalar, st.integers(100, 20_000)),
)
_value = st.one_of(
    _small,
    _big,
    st.one_of(_small, _big).map(lambda v: f'[{{"role":"user","content":{v}}}]'),  # where messages go
)


@st.composite
def _hostile_body(draw) -> tuple[str, bytes]:
    route = draw(st.sampled_from(sorted(_ROUTES)))
    names = sorted(_ROUTES[route].model_fields)
    chosen = draw(st.lists(st.sampled_from(names), unique=True, min_size=1, max_size=4))
    fields = [f"{json.dumps(name)}:{draw(_value)}" for name in chosen]
    if "max_tokens" not in chosen and draw(st.booleans()):  # keep what does run short
        fields.append('"max_tokens":2')
    return route, ("{" + ",".join(fields) + "}").encode("utf-8", "surrogatepass")


@given(request_body=_hostile_body())
@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck), database=None)
def test_hostile_values_make_no_server_error(fuzz_url, request_body):
    route, body = request_body
    response = httpx.post(
        f"{fuzz_url}{route}", content=body, headers={"content-type": "application/json"}, timeout=60
    )
    assert response.status_code < 500, f"{route} {body[:300]!r} -> {response.text[:300]}"
    if response.status_code >= 400:
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
