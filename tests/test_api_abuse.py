"""Behaviour under abuse, against a real uvicorn server and the real engine on the tiny model: every bad
input is a 4xx in the OpenAI error shape naming the parameter, never a 500; disconnects abort at once
and free the KV blocks; a full queue answers 429; the API key; a failing step; a dead engine loop;
SIGTERM drains and exits 0."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from http_server import assert_openai_error, metric_value, openai_client, real_engine, serve, wait_until

from leanserve.server.api.settings import Settings
from leanserve.server.engine.llm_engine import EngineStats

MAX_MODEL_LEN = 256
MAX_CHOICES = Settings().max_choices_per_request


@pytest.fixture(scope="module")
def engine(tiny_model_path):
    # Asynchronous scheduling as on a GPU: disconnects and failures land while a step is in flight.
    with real_engine(tiny_model_path, max_model_len=MAX_MODEL_LEN, async_scheduling=True) as engine:
        yield engine


@pytest.fixture(scope="module")
def base_url(engine):
    with serve(engine, max_request_body_bytes=64 * 1024) as url:
        yield url


COMPLETION_CASES = {  # id: (body fields besides the model, param the error must name)
    "prompt-wrong-type": ({"prompt": 5}, "prompt"),
    "prompt-missing": ({}, "prompt"),
    "prompt-empty-string": ({"prompt": ""}, "prompt"),
    "prompt-empty-list": ({"prompt": []}, "prompt"),
    "prompt-token-out-of-vocab": ({"prompt": [1, 10**9]}, "prompt"),
    "prompt-token-negative": ({"prompt": [-1]}, "prompt"),
    "prompt-beyond-context": ({"prompt": [1] * (MAX_MODEL_LEN + 5)}, "prompt"),
    "prompt-plus-max-tokens-beyond-context": ({"prompt": [1] * 200, "max_tokens": 100}, "max_tokens"),
    "max-tokens-string": ({"prompt": "x", "max_tokens": "ten"}, "max_tokens"),
    "max-tokens-negative": ({"prompt": "x", "max_tokens": -1}, "max_tokens"),
    "max-tokens-zero-without-echo": ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    "max-tokens-negative-with-echo": ({"prompt": "x", "max_tokens": -1, "echo": True}, "max_tokens"),
    "max-tokens-huge": ({"prompt": "x", "max_tokens": 10**30}, "max_tokens"),
    "max-tokens-bool": ({"prompt": "x", "max_tokens": True}, "max_tokens"),
    "temperature-string": ({"prompt": "x", "temperature": "hot"}, "temperature"),
    "temperature-negative": ({"prompt": "x", "temperature": -1}, "temperature"),
    "top-p-zero": ({"prompt": "x", "top_p": 0}, "top_p"),
    "top-k-negative": ({"prompt": "x", "top_k": -5}, "top_k"),
    "min-p-above-one": ({"prompt": "x", "min_p": 1.5}, "min_p"),
    "n-too-large": ({"prompt": "x", "n": 1000}, "n"),
    "n-float": ({"prompt": "x", "n": 1.5}, "n"),
    "seed-too-large": ({"prompt": "x", "seed": 2**70}, "seed"),
    "stop-empty-string": ({"prompt": "x", "stop": [""]}, "stop"),
    "stop-token-out-of-vocab": ({"prompt": "x", "stop_token_ids": [10**8]}, "stop_token_ids"),
    "penalty-out-of-range": ({"prompt": "x", "presence_penalty": 5}, "presence_penalty"),
    "logprobs-too-many": ({"prompt": "x", "logprobs": 50}, "logprobs"),
    "logprobs-too-many-with-echo": (
        {"prompt": "x", "logprobs": 21, "echo": True, "max_tokens": 0},
        "logprobs",
    ),
    "stream-not-bool": ({"prompt": "x", "stream": "yes"}, "stream"),
    "suffix": ({"prompt": "x", "suffix": "y"}, "suffix"),
    "best-of-above-n": ({"prompt": "x", "best_of": 3}, "best_of"),
    "logit-bias-key-not-a-token-id": ({"prompt": "x", "logit_bias": {"abc": 1}}, "logit_bias"),
    "logit-bias-negative-token-id": ({"prompt": "x", "logit_bias": {"-5": 1}}, "logit_bias"),
    "logit-bias-token-out-of-vocab": ({"prompt": "x", "logit_bias": {"100000000": 1}}, "logit_bias"),
    "logit-bias-token-id-of-5000-digits": ({"prompt": "x", "logit_bias": {"9" * 5000: 1}}, "logit_bias"),
    "logit-bias-above-100": ({"prompt": "x", "logit_bias": {"5": 101}}, "logit_bias"),
    "logit-bias-string-value": ({"prompt": "x", "logit_bias": {"5": "1"}}, "logit_bias"),
    "min-tokens-above-max-tokens": ({"prompt": "x", "max_tokens": 2, "min_tokens": 3}, "min_tokens"),
    "min-tokens-negative": ({"prompt": "x", "min_tokens": -1}, "min_tokens"),
    "min-tokens-string": ({"prompt": "x", "min_tokens": "3"}, "min_tokens"),
}
HI = [{"role": "user", "content": "hi"}]

CHAT_CASES = {
    "messages-empty": ({"messages": []}, "messages"),
    "messages-string": ({"messages": "hi"}, "messages"),
    "role-unknown": ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
    "image-part": (
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        "messages",
    ),
    "template-kwargs-tokenize": (
        {"messages": HI, "chat_template_kwargs": {"tokenize": True}},
        "chat_template_kwargs",
    ),
    "template-kwargs-tools": (
        {"messages": HI, "chat_template_kwargs": {"tools": [{}]}},
        "chat_template_kwargs",
    ),
    "continue-final-message-with-generation-prompt": (
        {"messages": HI, "continue_final_message": True},
        "continue_final_message",
    ),
    "continue-final-message-with-generation-prompt-in-kwargs": (
        {
            "messages": HI,
            "continue_final_message": True,
            "add_generation_prompt": False,
            "chat_template_kwargs": {"add_generation_prompt": True},
        },
        "continue_final_message",
    ),
    "top-logprobs-without-logprobs": (
        {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2},
        None,
    ),
    "top-logprobs-beyond-20": ({"messages": HI, "logprobs": True, "top_logprobs": 25}, "top_logprobs"),
    "max-completion-tokens-negative": (
        {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": -3},
        "max_completion_tokens",
    ),
    "max-completion-tokens-zero": (
        {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0},
        "max_completion_tokens",
    ),
    "max-completion-tokens-beyond-context": (
        {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 10**6},
        "max_completion_tokens",
    ),
    "response-format-unknown": ({"messages": HI, "response_format": {"type": "yaml"}}, "response_format"),
    "tools-unusable-schema": (
        {
            "messages": HI,
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 3}}}],
        },
        "tools",
    ),
    "tool-choice-required-without-tools": ({"messages": HI, "tool_choice": "required"}, "tool_choice"),
    "functions": ({"messages": HI, "functions": [{"name": "f"}]}, "functions"),
}


@pytest.mark.parametrize("case", sorted(COMPLETION_CASES))
def test_bad_completion_parameters_are_400_naming_them(base_url, engine, case):
    fields, param = COMPLETION_CASES[case]
    response = httpx.post(f"{base_url}/v1/completions", json={"model": engine.model_name, **fields})
    error = assert_openai_error(response, 400, param)
    assert error["type"] == "invalid_request_error"


# A batch of prompts is checked whole before any of it starts; errors name the prompt by its position.
BATCH_CASES = {  # id: (body fields besides the model, param the error must name, text its message holds)
    "one-empty-string": ({"prompt": ["a", ""]}, "prompt", "prompt[1] is empty"),
    "one-empty-token-list": ({"prompt": [[1], []]}, "prompt", "prompt[1] is empty"),
    "token-out-of-vocab-in-second": ({"prompt": [[1, 2], [1, 10**9]]}, "prompt", "prompt[1] has token ids"),
    # echo decodes the prompt's ids: only once the engine has found them in its vocabulary
    "echoed-token-beyond-any-vocab": (
        {"prompt": [[1], [2**40]], "echo": True},
        "prompt",
        "prompt[1] has token ids",
    ),
    "second-beyond-context": ({"prompt": [[1], [1] * (MAX_MODEL_LEN + 5)]}, "prompt", "prompt[1] is"),
    "second-plus-max-tokens-beyond-context": (
        {"prompt": [[1] * 10, [1] * 200], "max_tokens": 100},
        "max_tokens",
        "prompt[1] (200 tokens)",
    ),
    "strings-and-token-lists-mixed": ({"prompt": ["a", [1]]}, "prompt", None),
    "too-many-prompts": ({"prompt": ["a"] * (MAX_CHOICES + 1)}, "prompt", f"at most {MAX_CHOICES}"),
    "too-many-prompts-times-n": (
        {"prompt": ["a"] * (MAX_CHOICES // 2 + 1), "n": 2},
        "prompt",
        f"at most {MAX_CHOICES}",
    ),
}


@pytest.mark.parametrize("case", sorted(BATCH_CASES))
def test_bad_prompt_batches_are_400_before_any_engine_work(base_url, engine, case):
    fields, param, message = BATCH_CASES[case]
    body = {"model": engine.model_name, "max_tokens": 5, **fields}
    error = assert_openai_error(httpx.post(f"{base_url}/v1/completions", json=body), 400, param)
    assert message is None or message in error["message"], error
    assert not engine.engine.requests  # not even its good prompts started


TOKENIZER_CASES = {  # id: (route, body fields besides the model, param the error must name)
    "tokenize-prompt-wrong-type": ("/tokenize", {"prompt": 5}, "prompt"),
    "tokenize-prompt-token-ids": ("/tokenize", {"prompt": [1, 2]}, "prompt"),  # vLLM's takes text only
    "tokenize-neither-prompt-nor-messages": ("/tokenize", {}, "prompt"),
    "tokenize-prompt-and-messages": ("/tokenize", {"prompt": "x", "messages": HI}, "prompt"),
    "tokenize-messages-empty": ("/tokenize", {"messages": []}, "messages"),
    "tokenize-role-unknown": ("/tokenize", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
    "tokenize-add-special-tokens-string": (
        "/tokenize",
        {"prompt": "x", "add_special_tokens": "yes"},
        "add_special_tokens",
    ),
    "tokenize-add-generation-prompt-int": (
        "/tokenize",
        {"messages": HI, "add_generation_prompt": 1},
        "add_generation_prompt",
    ),
    "tokenize-template-source-in-kwargs": (
        "/tokenize",
        {"messages": HI, "chat_template_kwargs": {"chat_template": "{{ 'x' }}"}},
        "chat_template_kwargs",
    ),
    "tokenize-template-kwargs-not-an-object": (
        "/tokenize",
        {"messages": HI, "chat_template_kwargs": ["enable_thinking"]},
        "chat_template_kwargs",
    ),
    "detokenize-tokens-missing": ("/detokenize", {}, "tokens"),
    "detokenize-tokens-not-a-list": ("/detokenize", {"tokens": 5}, "tokens"),
    "detokenize-token-out-of-vocab": ("/detokenize", {"tokens": [1, 10**9]}, "tokens"),
    "detokenize-token-huge": ("/detokenize", {"tokens": [10**30]}, "tokens"),
    "detokenize-token-negative": ("/detokenize", {"tokens": [-1]}, "tokens"),
    "detokenize-token-string": ("/detokenize", {"tokens": ["5"]}, "tokens"),
    "detokenize-token-bool": ("/detokenize", {"tokens": [True]}, "tokens"),
}


@pytest.mark.parametrize("case", sorted(TOKENIZER_CASES))
def test_bad_tokenizer_requests_are_400_naming_the_parameter(base_url, engine, case):
    route, fields, param = TOKENIZER_CASES[case]
    response = httpx.post(f"{base_url}{route}", json={"model": engine.model_name, **fields})
    assert assert_openai_error(response, 400, param)["type"] == "invalid_request_error"


@pytest.mark.parametrize("case", sorted(CHAT_CASES))
def test_bad_chat_parameters_are_400(base_url, engine, case):
    fields, param = CHAT_CASES[case]
    response = httpx.post(f"{base_url}/v1/chat/completions", json={"model": engine.model_name, **fields})
    assert_openai_error(response, 400, param or "top_logprobs")


RAW_BODIES = {  # id: (bytes, content type, status)
    "malformed-json": (b'{"prompt": "x",', "application/json", 400),
    "not-an-object": (b"[1, 2, 3]", "application/json", 400),
    "invalid-utf8": (b'{"prompt": "\xff\xfe\xfd"}', "application/json", 400),
    "nan": (b'{"prompt": "x", "temperature": NaN}', "application/json", 400),
    "deep-nesting": (b'{"prompt": ' + b"[" * 30000 + b"]" * 30000 + b"}", "application/json", 400),
    "empty-body": (b"", "application/json", 400),
    "text-plain": (b'{"prompt": "x"}', "text/plain", 400),
    "oversized": (b'{"prompt": "' + b"a" * (100 * 1024) + b'"}', "application/json", 413),
}


@pytest.mark.parametrize("case", sorted(RAW_BODIES))
def test_unparsable_bodies_are_4xx_in_openai_shape(base_url, case):
    body, content_type, status = RAW_BODIES[case]
    response = httpx.post(f"{base_url}/v1/completions", content=body, headers={"content-type": content_type})
    assert_openai_error(response, status)


def test_unknown_model_and_routes(base_url):
    for path, body in (
        ("/v1/completions", {"prompt": "x"}),
        ("/tokenize", {"prompt": "x"}),
        ("/detokenize", {"tokens": [1]}),
    ):
        response = httpx.post(f"{base_url}{path}", json={"model": "gpt-9", **body})
        assert assert_openai_error(response, 404, "model")["code"] == "model_not_found"
    assert_openai_error(httpx.get(f"{base_url}/v1/nothing-here"), 404)
    assert httpx.get(f"{base_url}/v1/completions").status_code == 405


def test_abuse_leaves_other_requests_unaffected(base_url, engine):
    client = openai_client(base_url)
    bad = [json.dumps({"model": engine.model_name, **fields}) for fields, _ in COMPLETION_CASES.values()]
    bad += [body.decode("latin-1") for body, _, _ in RAW_BODIES.values()][:4]

    def good():
        stream = client.completions.create(
            model=engine.model_name,
            prompt="Hello there",
            max_tokens=40,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        return sum(1 for chunk in stream for _ in chunk.choices)

    with ThreadPoolExecutor(4) as pool:
        good_futures = [pool.submit(good) for _ in range(2)]
        statuses = list(
            pool.map(
                lambda b: httpx.post(f"{base_url}/v1/completions", content=b.encode("latin-1")).status_code,
                bad,
            )
        )
        assert [f.result() for f in good_futures] == [40, 40]
    assert all(400 <= s < 500 for s in statuses), statuses
    assert httpx.get(f"{base_url}/health").status_code == 200


@pytest.mark.parametrize("stream", [False, True])
def test_echo_without_logprobs_is_the_prompt_text_alone(base_url, engine, stream):
    """Echo asks for no scores without logprobs: each choice (n = 2 of each prompt) is its prompt's
    text, with no logprobs; nothing generated, no KV block left behind."""
    body = {"model": engine.model_name, "prompt": ["Hello there", "x"], "n": 2, "echo": True, "max_tokens": 0}
    client = openai_client(base_url)
    if stream:
        chunks = [c.choices[0] for c in client.completions.create(**body, stream=True)]
    else:
        response = client.completions.create(**body)
        chunks = response.choices
        assert response.usage.completion_tokens == 0
    assert sorted((c.index, c.text, c.logprobs, c.finish_reason) for c in chunks) == [
        (i, ["Hello there", "x"][i // 2], None, "length") for i in range(4)
    ]
    assert wait_until(lambda: _kv_freed(base_url, engine), timeout=5)


def _kv_freed(base_url: str, engine) -> bool:
    stats = engine.stats()
    return (
        stats.num_running == stats.num_waiting == 0
        and metric_value(base_url, "leanserve_kv_cache_usage_ratio") == 0
    )


@pytest.mark.parametrize("batch", [False, True], ids=["one-prompt", "batch-n2"])
@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_aborts_and_frees_kv_blocks(base_url, engine, stream, batch):
    aborted = {"finished_reason": "abort"}
    before = metric_value(base_url, "leanserve_request_success_total", aborted)
    body = {
        "model": engine.model_name,
        "prompt": ["Tell me a long story", "Once upon a time"] if batch else "Tell me a long story",
        "n": 2 if batch else 1,
        "max_tokens": 200,
        "ignore_eos": True,
    }
    started = time.monotonic()
    if stream:
        with httpx.stream("POST", f"{base_url}/v1/completions", json={**body, "stream": True}) as response:
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data: {"))
            assert engine.stats().kv_usage > 0
    else:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{base_url}/v1/completions", json=body, timeout=httpx.Timeout(5, read=0.3))
    assert wait_until(lambda: _kv_freed(base_url, engine), timeout=5)
    assert metric_value(base_url, "leanserve_request_success_total", aborted) == before + 1  # once a request
    # Aborted, not run to the end: 200 tokens take longer than this on CPU.
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("stream", [True, False])
def test_a_failing_prompt_fails_its_batch_and_aborts_the_others(base_url, engine, monkeypatch, stream):
    llm_engine, doomed = engine.engine, [5, 6, 7]
    original = llm_engine.add_request

    def add_request(request_id, prompt, *args):
        if prompt == doomed:
            raise RuntimeError("injected failure")
        return original(request_id, prompt, *args)

    monkeypatch.setattr(llm_engine, "add_request", add_request)
    generated = metric_value(base_url, "leanserve_generation_tokens_total")
    body = {"model": engine.model_name, "prompt": [[1] * 20, doomed], "max_tokens": 200, "ignore_eos": True}
    if stream:
        with httpx.stream("POST", f"{base_url}/v1/completions", json={**body, "stream": True}) as response:
            events = [line for line in response.iter_lines() if line]
        assert events[-1] == "data: [DONE]"
        error = json.loads(events[-2].removeprefix("data: "))["error"]
    else:
        error = assert_openai_error(httpx.post(f"{base_url}/v1/completions", json=body), 500)
    assert error["code"] == "engine_error" and "injected failure" in error["message"]
    assert wait_until(lambda: _kv_freed(base_url, engine), timeout=5)
    # The good prompt was aborted, not run to its 200 tokens.
    assert metric_value(base_url, "leanserve_generation_tokens_total") - generated < 200


def test_full_queue_answers_429_with_retry_after(tiny_model_path):
    with real_engine(tiny_model_path, max_num_seqs=1) as engine, serve(engine, max_queued_requests=1) as url:
        long = {
            "model": engine.model_name,
            "prompt": "a",
            "max_tokens": 1500,
            "ignore_eos": True,
            "stream": True,
        }
        with httpx.stream("POST", f"{url}/v1/completions", json=long, timeout=60) as running:
            events = running.iter_lines()  # kept referenced: a collected iterator closes the connection
            assert next(line for line in events if line.startswith("data: {"))  # A is generating
            with ThreadPoolExecutor(1) as pool:
                short = {"model": engine.model_name, "prompt": "b", "max_tokens": 2}
                waiting = pool.submit(httpx.post, f"{url}/v1/completions", json=short, timeout=60)
                assert wait_until(lambda: engine.stats().num_waiting == 1)  # B waits behind A
                rejected = httpx.post(f"{url}/v1/completions", json=short)
                error = assert_openai_error(rejected, 429)
                assert error["type"] == "rate_limit_error" and int(rejected.headers["retry-after"]) >= 1
                running.close()  # A goes away: B runs
                assert waiting.result().status_code == 200
        assert httpx.post(f"{url}/v1/completions", json=short).status_code == 200


def test_api_key_guards_model_routes_only(engine):
    with serve(engine, api_key="s3cret") as url:
        body = {"model": engine.model_name, "prompt": "x", "max_tokens": 1}
        assert_openai_error(httpx.post(f"{url}/v1/completions", json=body), 401)
        wrong = httpx.post(f"{url}/v1/completions", json=body, headers={"Authorization": "Bearer nope"})
        assert assert_openai_error(wrong, 401)["code"] == "invalid_api_key"
        assert_openai_error(httpx.post(f"{url}/v1/completions", content=b"{oops"), 401)  # key before body
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0)
        assert client.completions.create(model=engine.model_name, prompt="x", max_tokens=1).choices
        key = {"Authorization": "Bearer s3cret"}
        for path, tokenizer_body in (("/tokenize", {"prompt": "x"}), ("/detokenize", {"tokens": [1]})):
            assert_openai_error(httpx.post(f"{url}{path}", json=tokenizer_body), 401)
            assert httpx.post(f"{url}{path}", json=tokenizer_body, headers=key).status_code == 200
        assert httpx.get(f"{url}/health").status_code == 200
        assert httpx.get(f"{url}/metrics").status_code == 200


@pytest.mark.parametrize("stream", [True, False])
def test_failing_step_fails_its_request_and_the_server_goes_on(base_url, engine, monkeypatch, stream):
    runner = engine.engine.runner
    original, calls = runner.execute, []

    def fail_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected step failure")
        return original(*args, **kwargs)

    monkeypatch.setattr(runner, "execute", fail_once)
    client = openai_client(base_url)
    with pytest.raises(openai.APIError, match="injected step failure"):
        result = client.completions.create(
            model=engine.model_name, prompt="boom", max_tokens=5, stream=stream
        )
        list(result) if stream else None
    ok = client.completions.create(
        model=engine.model_name, prompt="fine", max_tokens=3, extra_body={"ignore_eos": True}
    )
    assert ok.usage.completion_tokens == 3
    assert httpx.get(f"{base_url}/health").status_code == 200


class _DeadLoopEngine:
    """What the real engine cannot be made to do from outside: a loop thread that has died."""

    model_name, max_model_len = "dead", 64

    def stats(self) -> EngineStats:
        return EngineStats(
            0, 0, 0.0, 0, 0, 0, 0, 0, 0, 0, loop_alive=False, last_error="RuntimeError: loop crashed"
        )


def test_dead_engine_loop_shows_in_health():
    with serve(_DeadLoopEngine()) as url:
        health = httpx.get(f"{url}/health")
        assert "loop crashed" in assert_openai_error(health, 503)["message"]
        assert_openai_error(httpx.post(f"{url}/v1/completions", json={"model": "dead", "prompt": "x"}), 503)
        assert_openai_error(httpx.post(f"{url}/tokenize", json={"prompt": "x"}), 503)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_drains_in_flight_requests_and_exits_0(tiny_model_path, tmp_path):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "leanserve.server", "--model", str(tiny_model_path), "--host", "127.0.0.1"]
    argv += ["--port", str(port), "--device", "cpu", "--dtype", "float32", "--shutdown-grace-seconds", "1"]
    root = Path(__file__).resolve().parents[1]
    log = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen(argv, cwd=root, env=os.environ | {"LEANSERVE_LOG_FORMAT": "json"}, stderr=log)
    try:
        assert wait_until(lambda: _status(f"{url}/health") == 200, timeout=120), "server did not become ready"
        body = {
            "model": tiny_model_path.name,
            "prompt": "a",
            "max_tokens": 1900,
            "ignore_eos": True,
            "stream": True,
        }
        events: list[str] = []
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            events.append(next(line for line in lines if line.startswith("data: {")))
            proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            reader = threading.Thread(target=lambda: events.extend(line for line in lines if line))
            reader.start()
            assert wait_until(lambda: _status(f"{url}/health") != 200, timeout=5)  # 503 or refused
            reader.join(timeout=15)
        assert proc.wait(timeout=15) == 0
        assert time.monotonic() - signalled < 1 + 8
        assert events[-1] == "data: [DONE]"
        assert (
            json.loads(events[-2].removeprefix("data: "))["error"]["code"] == "aborted"
        )  # 1900 tokens take > 1 s
        log.close()
        text = (tmp_path / "server.log").read_text()
        log_lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
        assert any(entry.get("path") == "/v1/completions" for entry in log_lines)
        assert "nanobind" not in text  # Triton's objects were not left frozen at exit (issue 26)
    finally:
        if proc.poll() is None:
            proc.kill()


def _status(url: str) -> int:
    try:
        return httpx.get(url, timeout=1).status_code
    except httpx.HTTPError:
        return 0
