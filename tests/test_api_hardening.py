"""Issue 26, hardening under hostile clients, against a real uvicorn server (the server's own uvicorn
configuration) and the real engine on the tiny model: lone surrogates are a 400 naming the field; a
non-streaming client that goes away is a 499 with no traceback; client text cannot forge log lines;
request heads are bounded in size and time and connections in number; the stop strings' total length
and the choices of a request are bounded, and a large request cannot starve small ones; HEAD on
/health and /metrics; an ambiguous duplicate Authorization header is refused."""

from __future__ import annotations

import contextlib
import json
import logging
import shlex
import socket
import threading
import time

import httpx
import pytest
from http_server import assert_openai_error, openai_client, real_engine, serve, wait_until

from leanserve.server.api.cli import TextLogFormatter
from leanserve.server.api.request_inputs import MAX_STOP_CHARS

MAX_MODEL_LEN = 256
HI = [{"role": "user", "content": "hi"}]
LONE = "\ud800"  # json.dumps writes it as the escape \ud800, which json.loads accepts


@pytest.fixture(scope="module")
def engine(tiny_model_path):
    with real_engine(tiny_model_path, max_model_len=MAX_MODEL_LEN) as engine:
        yield engine


SURROGATE_CASES = {  # id: (route, body fields besides the model, param the error must name)
    "completion-prompt": ("/v1/completions", {"prompt": LONE + "abc"}, "prompt"),
    "completion-prompt-batch": ("/v1/completions", {"prompt": ["ok", "x" + LONE]}, "prompt"),
    "completion-stop": ("/v1/completions", {"prompt": "x", "stop": ["a" + LONE]}, "stop"),
    "completion-user": ("/v1/completions", {"prompt": "x", "user": LONE}, "user"),
    "completion-model": ("/v1/completions", {"prompt": "x", "model": LONE}, "model"),
    "chat-content": ("/v1/chat/completions", {"messages": [{"role": "user", "content": LONE}]}, "messages"),
    "chat-text-part": (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "a" + LONE}]}]},
        "messages",
    ),
    "chat-name": (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi", "name": LONE}]},
        "messages",
    ),
    "chat-template-kwargs": (
        "/v1/chat/completions",
        {"messages": HI, "chat_template_kwargs": {"x": [{"deep": LONE}]}},
        "chat_template_kwargs",
    ),
    "chat-template-kwargs-key": (
        "/v1/chat/completions",
        {"messages": HI, "chat_template_kwargs": {LONE: 1}},
        "chat_template_kwargs",
    ),
    "tokenize-prompt": ("/tokenize", {"prompt": LONE}, "prompt"),
    "tokenize-messages": ("/tokenize", {"messages": [{"role": "user", "content": "\udfff"}]}, "messages"),
}


@pytest.mark.parametrize("case", sorted(SURROGATE_CASES))
def test_lone_surrogates_are_400_naming_the_field(base_url, engine, case):
    route, fields, param = SURROGATE_CASES[case]
    body = json.dumps({"model": engine.model_name, **fields})  # ensure_ascii: "\ud800" escapes
    assert "\\ud" in body
    with httpx.Client() as client:  # one keep-alive connection: it survives the error
        response = client.post(
            f"{base_url}{route}", content=body, headers={"content-type": "application/json"}
        )
        error = assert_openai_error(response, 400, param)
        assert "surrogate" in error["message"]
        assert client.get(f"{base_url}/health").status_code == 200


@pytest.mark.parametrize("route", ["/v1/completions", "/tokenize"])
def test_raw_surrogate_bytes_are_400(base_url, route):
    """The UTF-8-style encoding of U+D800 (ED A0 80), which json.loads decodes with surrogatepass."""
    body = b'{"prompt": "\xed\xa0\x80abc"}'
    response = httpx.post(f"{base_url}{route}", content=body, headers={"content-type": "application/json"})
    assert_openai_error(response, 400, "prompt")


class _FailingTokenizerEngine:
    """A ready engine whose tokenizer has a bug: the one way left to a 500."""

    model_name, max_model_len = "buggy", 64

    def stats(self):
        from leanserve.server.engine.llm_engine import EngineStats

        return EngineStats(0, 0, 0.0, 0, 0, 0, 0, 0, 0, 0, loop_alive=True, last_error=None)

    def tokenizer(self, *args, **kwargs):
        raise TypeError("injected tokenizer bug")


def test_a_500_closes_its_connection_so_the_next_request_gets_a_fresh_one():
    with serve(_FailingTokenizerEngine()) as url, httpx.Client() as client:
        response = client.post(f"{url}/tokenize", json={"prompt": "x"})
        assert assert_openai_error(response, 500)["code"] == "internal_error"
        assert response.headers["connection"] == "close"
        assert client.get(f"{url}/health").status_code == 200  # not reset


def test_non_streaming_disconnect_is_a_499_without_traceback(base_url, engine, caplog):
    caplog.set_level(logging.INFO)
    body = {
        "model": engine.model_name,
        "prompt": "Tell me a long story",
        "max_tokens": 200,
        "ignore_eos": True,
    }
    for _ in range(3):  # the race (disconnect seen before the consumer stops) is not hit every time
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{base_url}/v1/completions", json=body, timeout=httpx.Timeout(5, read=0.3))
    assert wait_until(lambda: engine.stats().num_running == engine.stats().num_waiting == 0, timeout=5)

    def access_statuses():
        return [
            r.fields["status"]
            for r in caplog.records
            if r.name == "leanserve.access" and r.fields["path"] == "/v1/completions"
        ]

    assert wait_until(lambda: len(access_statuses()) == 3, timeout=5)
    assert access_statuses() == [499] * 3
    problems = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not problems, [r.getMessage() for r in problems]


def _raw_request(base_url: str, head: bytes, timeout: float = 5.0) -> bytes:
    host, port = base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(head)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
            if b"\r\n\r\n" in b"".join(chunks) and b"content-length: 0" not in chunks[0].lower():
                break
        return b"".join(chunks)


def test_client_text_cannot_forge_access_log_lines(base_url, caplog):
    caplog.set_level(logging.INFO)
    forged = "%0a2026-01-01%2000:00:00,000%20INFO%20leanserve.access:%20request_id=x%20status=200%00"
    answer = _raw_request(
        base_url, f"GET /health{forged} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
    )
    assert answer.startswith(b"HTTP/1.1 404")

    def forged_records() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.name == "leanserve.access" and "2026" in r.fields["path"]]

    # The access line is written when the response has been sent, which may be after the client read it.
    assert wait_until(lambda: forged_records(), timeout=5)
    records = forged_records()
    assert len(records) == 1
    line = TextLogFormatter().format(records[0])
    assert "\n" not in line and "\x00" not in line
    pairs = [token.partition("=") for token in shlex.split(line.split(" leanserve.access: ", 1)[1])]
    keys = [key for key, _, _ in pairs]
    assert len(keys) == len(set(keys)) and dict((k, v) for k, _, v in pairs)["status"] == "404"
    assert 'path="/health\\n2026-01-01 00:00:00,000 INFO' in line  # quoted and escaped, one field


def test_text_log_format_escapes_control_characters_from_any_logger():
    record = logging.LogRecord("x", logging.WARNING, __file__, 1, "bad %s", ("a\nb\rc\x00d\u2028",), None)
    assert TextLogFormatter().format(record).endswith("x: bad a\\nb\\rc\\x00d\\u2028")


def test_oversized_request_head_is_refused(engine):
    with serve(engine, max_header_bytes=4096) as url:
        head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 64 * 1024  # never finished
        assert _raw_request(url, head).startswith(b"HTTP/1.1 400")
        ok = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Small: " + b"a" * 1000 + b"\r\nConnection: close\r\n\r\n"
        assert _raw_request(url, ok).startswith(b"HTTP/1.1 200")


@pytest.mark.parametrize(
    "sent",
    [b"", b"GET /health HTTP/1.1\r\nHost: x\r\n", b"GET /health HTTP/1.1\r\nHost: x\r\n\r\nGET /he"],
    ids=["nothing", "unfinished-head", "unfinished-second-head"],
)
def test_a_request_head_not_finished_in_time_is_disconnected(engine, sent):
    with serve(engine, header_timeout_seconds=0.5) as url:
        started = time.monotonic()
        answer = _raw_request(url, sent, timeout=10)
        assert time.monotonic() - started < 5
        assert answer.count(b"HTTP/1.1 200") == (1 if b"\r\n\r\n" in sent else 0)


def test_connections_beyond_the_limit_get_503_then_are_closed(engine):
    with serve(engine, max_connections=3) as url:
        host, port = url.removeprefix("http://").split(":")
        held = [socket.create_connection((host, int(port))) for _ in range(3)]
        try:
            assert wait_until(lambda: httpx.get(f"{url}/health").status_code == 503, timeout=5)
            held += [socket.create_connection((host, int(port))) for _ in range(3)]  # 6 = twice the limit
            time.sleep(0.2)
            with socket.create_connection((host, int(port)), timeout=5) as extra:  # the 7th + 1
                extra.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                with contextlib.suppress(ConnectionResetError):  # closed at once, nothing answered
                    assert extra.recv(100) == b""
        finally:
            for sock in held:
                sock.close()
        assert wait_until(lambda: httpx.get(f"{url}/health").status_code == 200, timeout=5)


def test_total_stop_string_length_is_bounded(base_url, engine):
    for route, fields in (
        ("/v1/completions", {"prompt": "x"}),
        ("/v1/chat/completions", {"messages": HI}),
    ):
        stop = ["a" * (MAX_STOP_CHARS // 2), "b" * (MAX_STOP_CHARS // 2 + 1)]
        response = httpx.post(f"{base_url}{route}", json={"model": engine.model_name, **fields, "stop": stop})
        assert str(MAX_STOP_CHARS) in assert_openai_error(response, 400, "stop")["message"]
    ok = {"model": engine.model_name, "prompt": "x", "max_tokens": 2, "stop": ["a" * MAX_STOP_CHARS]}
    assert httpx.post(f"{base_url}/v1/completions", json=ok).status_code == 200


def test_choices_per_request_are_bounded_by_the_setting(engine):
    with serve(engine, max_choices_per_request=4) as url:
        cases = (
            ("/v1/completions", {"prompt": "x", "n": 5}, "n"),
            ("/v1/completions", {"prompt": ["a", "b", "c"], "n": 2}, "prompt"),
            ("/v1/chat/completions", {"messages": HI, "n": 5}, "n"),
        )
        for route, fields, param in cases:
            response = httpx.post(
                f"{url}{route}", json={"model": engine.model_name, "max_tokens": 2, **fields}
            )
            assert "at most 4 choices" in assert_openai_error(response, 400, param)["message"]
        body = {"model": engine.model_name, "prompt": ["a", "b"], "n": 2, "max_tokens": 2}
        assert len(httpx.post(f"{url}/v1/completions", json=body).json()["choices"]) == 4


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_a_large_request_cannot_starve_a_small_one(tiny_model_path, async_scheduling):
    """Issue 26: a request whose choices fill every sequence slot; a small request sent meanwhile ends
    long before it (before, it waited for the large one to end). With asynchronous scheduling too, where
    the preempted sequence may be in the step in flight."""
    engine_cm = real_engine(tiny_model_path, max_num_seqs=4, async_scheduling=async_scheduling)
    with engine_cm as engine, serve(engine) as url:
        big = {
            "model": engine.model_name,
            "prompt": ["a", "b"],
            "n": 2,
            "max_tokens": 1500,
            "ignore_eos": True,
            "stream": True,
        }
        finished: dict[str, float] = {}

        def read_big():
            with httpx.stream("POST", f"{url}/v1/completions", json=big, timeout=120) as response:
                for line in response.iter_lines():
                    if line == "data: [DONE]":
                        finished["big"] = time.monotonic()

        reader = threading.Thread(target=read_big)
        reader.start()
        assert wait_until(lambda: engine.stats().num_running == 4, timeout=30)
        client = openai_client(url)
        small = client.completions.create(
            model=engine.model_name, prompt="c", max_tokens=4, extra_body={"ignore_eos": True}
        )
        assert "big" not in finished  # the small request ended while the large one still streams
        assert small.usage.completion_tokens == 4
        reader.join(timeout=300)  # generous: on a loaded 2-core machine the 6000 tokens take minutes
        assert "big" in finished
        assert wait_until(lambda: engine.stats().num_running == engine.stats().num_waiting == 0)
        assert engine.stats().kv_usage == 0


def test_head_on_health_and_metrics(base_url):
    for path in ("/health", "/metrics"):
        response = httpx.head(f"{base_url}{path}")
        assert response.status_code == 200 and response.content == b""


@pytest.mark.parametrize("api_key", [None, "s3cret"])
def test_duplicate_authorization_headers_are_refused(engine, api_key):
    with serve(engine, api_key=api_key) as url:
        body = {"model": engine.model_name, "prompt": "x", "max_tokens": 1}
        for second in ("Bearer nope", "Bearer s3cret"):
            headers = [("Authorization", "Bearer s3cret"), ("Authorization", second)]
            response = httpx.post(f"{url}/v1/completions", json=body, headers=headers)
            assert assert_openai_error(response, 400)["code"] == "duplicate_authorization"
        ok = httpx.post(f"{url}/v1/completions", json=body, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
