"""The OpenAI API against a real uvicorn server and the real engine on the tiny model, driven by the
official `openai` client: both endpoints streaming and not, usage with attention_ms, n, logprobs, echo
with prompt logprobs (lm-eval-harness's loglikelihood requests), seeds, stop strings, request ids,
heartbeats, the log line, vLLM's /tokenize and /detokenize, and the settings (CLI > env > default)."""

from __future__ import annotations

import json
import logging
from itertools import accumulate
from pathlib import Path

import httpx
import pytest
from http_server import openai_client, real_engine, serve, wait_until

from leanserve.server.api.cli import JsonLogFormatter, main
from leanserve.server.api.settings import Settings, parse_settings
from leanserve.server.engine.config import EngineConfig

PROMPT = "The quick brown fox jumps over"
PROMPTS = [PROMPT, "Once upon a time"]
IGNORE_EOS = {"ignore_eos": True}


@pytest.fixture(scope="module")
def engine(tiny_model_path):
    with real_engine(tiny_model_path, max_model_len=512) as engine:
        yield engine


@pytest.fixture(scope="module")
def model(engine):
    return engine.model_name


def _create(client, model, endpoint: str, **kwargs):
    if endpoint == "completions":
        return client.completions.create(model=model, prompt=PROMPT, **kwargs)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPT}]
    return client.chat.completions.create(model=model, messages=messages, **kwargs)


def _text(choice) -> str:
    return choice.text if hasattr(choice, "text") else choice.message.content


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_stream_equals_non_stream_and_usage_has_attention(client, model, endpoint):
    whole = _create(client, model, endpoint, max_tokens=12, temperature=0, extra_body=IGNORE_EOS)
    assert whole.choices[0].finish_reason == "length"
    assert (whole.usage.completion_tokens, whole.usage.prompt_tokens > 3) == (12, True)
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + 12
    assert whole.usage.attention_ms > 0

    chunks = list(
        _create(
            client,
            model,
            endpoint,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=IGNORE_EOS,
        )
    )
    pieces = [
        c.choices[0].text if endpoint == "completions" else c.choices[0].delta.content for c in chunks[:-1]
    ]
    assert "".join(p or "" for p in pieces) == _text(whole.choices[0])
    assert [c.choices[0].finish_reason for c in chunks[:-1]][-1] == "length"
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == 12
    assert usage_chunk.usage.attention_ms > 0
    assert len({c.id for c in chunks}) == 1


def test_chat_stream_opens_with_the_assistant_role(client, model):
    chunks = list(_create(client, model, "chat", max_tokens=3, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.usage is None for c in chunks)  # no usage chunk unless asked


def _greedy(client, model, prompt, **kwargs):
    return client.completions.create(
        model=model, prompt=prompt, max_tokens=6, temperature=0, extra_body=IGNORE_EOS, **kwargs
    )


def test_prompt_as_token_ids(client, model, engine):
    ids = engine.tokenizer(PROMPT).input_ids
    by_ids, by_text, one_of_list = (_greedy(client, model, prompt) for prompt in (ids, PROMPT, [PROMPT]))
    assert by_ids.choices[0].text == by_text.choices[0].text == one_of_list.choices[0].text
    assert by_ids.usage.prompt_tokens == len(ids)


@pytest.mark.parametrize(("as_ids", "n"), [(False, 1), (True, 1), (False, 2)], ids=["text", "ids", "text-n2"])
def test_batched_prompts_answer_each_prompt_as_alone(client, model, engine, as_ids, n):
    """Choice i * n + j is sample j of prompt i; greedy, every sample of a prompt is that prompt's answer
    alone. Usage counts each prompt once (as for one prompt with n > 1) and every choice's tokens."""
    alone = [_greedy(client, model, prompt) for prompt in PROMPTS]
    assert alone[0].choices[0].text != alone[1].choices[0].text  # else the order goes unchecked
    batch = [engine.tokenizer(prompt).input_ids for prompt in PROMPTS] if as_ids else PROMPTS
    r = _greedy(client, model, batch, n=n)
    assert [c.index for c in r.choices] == list(range(2 * n))
    assert [c.text for c in r.choices] == [a.choices[0].text for a in alone for _ in range(n)]
    assert {c.finish_reason for c in r.choices} == {"length"}
    prompt_tokens = sum(a.usage.prompt_tokens for a in alone)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (prompt_tokens, 6 * 2 * n)
    assert r.usage.total_tokens == prompt_tokens + 6 * 2 * n
    assert r.usage.attention_ms > 0


def test_batched_stream_interleaves_choices_and_ends_with_usage(client, model):
    whole = _greedy(client, model, PROMPTS, n=2)
    chunks = list(_greedy(client, model, PROMPTS, n=2, stream=True, stream_options={"include_usage": True}))
    *deltas, usage = chunks
    order = [c.choices[0].index for c in deltas]  # one choice a chunk
    texts = {i: "".join(c.choices[0].text for c in deltas if c.choices[0].index == i) for i in set(order)}
    assert texts == {c.index: c.text for c in whole.choices}
    finished = {c.choices[0].index: c.choices[0].finish_reason for c in deltas if c.choices[0].finish_reason}
    assert finished == {i: "length" for i in range(4)}
    assert order.index(3) < len(order) - 1 - order[::-1].index(0)  # the prompts ran side by side
    assert usage.choices == [] and usage.usage.completion_tokens == 24
    assert usage.usage.prompt_tokens == whole.usage.prompt_tokens and usage.usage.attention_ms > 0
    assert len({c.id for c in chunks}) == 1


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_logit_bias_forces_and_bans_tokens(client, model, engine, endpoint):
    forced = engine.tokenizer(" banana", add_special_tokens=False).input_ids[0]
    greedy = _create(client, model, endpoint, max_tokens=4, temperature=0, extra_body=IGNORE_EOS)
    always = _create(
        client, model, endpoint, max_tokens=4, temperature=0.7, seed=1,
        logit_bias={str(forced): 100}, extra_body=IGNORE_EOS,
    )  # fmt: skip
    assert _text(always.choices[0]) == engine.tokenizer.decode([forced] * 4)
    first = engine.tokenizer(_text(greedy.choices[0]), add_special_tokens=False).input_ids[0]
    banned = _create(
        client, model, endpoint, max_tokens=4, temperature=0, logit_bias={str(first): -100},
        extra_body=IGNORE_EOS,
    )  # fmt: skip
    assert not _text(banned.choices[0]).startswith(engine.tokenizer.decode([first]))


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_min_tokens_defers_a_stop_token(client, model, engine, endpoint):
    greedy = _create(client, model, endpoint, max_tokens=4, temperature=0, extra_body=IGNORE_EOS)
    first = engine.tokenizer(_text(greedy.choices[0]), add_special_tokens=False).input_ids[0]
    stops = {"stop_token_ids": [first], **IGNORE_EOS}
    stopped = _create(client, model, endpoint, max_tokens=6, temperature=0, extra_body=stops)
    assert stopped.usage.completion_tokens == 1 and stopped.choices[0].finish_reason == "stop"
    held = _create(
        client, model, endpoint, max_tokens=6, temperature=0, extra_body={**stops, "min_tokens": 3}
    )
    assert held.usage.completion_tokens >= 3


def test_chat_template_kwargs_reach_the_template(base_url, client, model):
    """The default model's template reads add_generation_prompt: the kwargs override it, in /tokenize and
    in chat completions alike (Qwen3's enable_thinking travels the same way)."""
    messages = [{"role": "user", "content": PROMPT}]
    off = {"chat_template_kwargs": {"add_generation_prompt": False}}
    plain = httpx.post(f"{base_url}/tokenize", json={"messages": messages, "add_generation_prompt": False})
    counted = httpx.post(f"{base_url}/tokenize", json={"messages": messages, **off}).json()
    assert counted["tokens"] == plain.json()["tokens"]
    chat = client.chat.completions.create(model=model, messages=messages, max_tokens=1, extra_body=off)
    assert chat.usage.prompt_tokens == counted["count"]


def test_continue_final_message_ends_the_prompt_inside_it(base_url, client, model, engine):
    """An assistant turn the client began is continued, not closed and answered (vLLM's option)."""
    begun = "The capital of France is"
    messages = [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": begun}]
    body = {"messages": messages, "add_generation_prompt": False, "continue_final_message": True}
    tokens = httpx.post(f"{base_url}/tokenize", json=body).json()["tokens"]
    assert engine.tokenizer.decode(tokens).endswith(begun)
    closed = httpx.post(f"{base_url}/tokenize", json={**body, "continue_final_message": False}).json()
    assert closed["tokens"][: len(tokens)] == tokens and closed["count"] > len(tokens)  # + end of turn
    extra = {"add_generation_prompt": False, "continue_final_message": True}
    chat = client.chat.completions.create(model=model, messages=messages, max_tokens=3, extra_body=extra)
    assert chat.usage.prompt_tokens == len(tokens) and chat.choices[0].message.content is not None


def test_default_valued_options_we_do_not_implement_are_accepted(client, model):
    """Clients often send these with their 'off' value; only asking for the feature is a 400."""
    chat = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": PROMPT}], max_tokens=2,
        response_format={"type": "text"}, tools=[], tool_choice="none",
    )  # fmt: skip
    assert chat.choices[0].message.content is not None
    completion = client.completions.create(model=model, prompt=PROMPT, max_tokens=2, best_of=1, n=1)
    assert completion.choices[0].text is not None


def test_chat_stream_with_n_choices(client, model):
    chunks = list(
        _create(client, model, "chat", n=2, max_tokens=5, stream=True, seed=1, extra_body=IGNORE_EOS)
    )
    finished = {c.choices[0].index: c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason}
    assert finished == {0: "length", 1: "length"}
    roles = [c.choices[0].index for c in chunks if c.choices[0].delta.role == "assistant"]
    assert sorted(roles) == [0, 1]


def test_n_samples_with_completion_logprobs(client, model):
    r = client.completions.create(
        model=model, prompt=PROMPT, n=3, max_tokens=5, logprobs=2, seed=5, extra_body=IGNORE_EOS
    )
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert r.usage.completion_tokens == 15
    for choice in r.choices:
        lp = choice.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
        assert all(v <= 0 for v in lp.token_logprobs)
        assert all(1 <= len(top) <= 2 for top in lp.top_logprobs)
        assert lp.text_offset == sorted(lp.text_offset)


def _assert_echoed(choice, prompt_text: str, prompt_len: int, generated: int, k: int) -> None:
    """A completions choice under echo with logprobs=k: the prompt's text first, an entry per prompt
    token and then per generated token, the first one unscored, offsets running over both."""
    assert choice.text.startswith(prompt_text)
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == prompt_len + generated
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v <= 0 for v in lp.token_logprobs[1:])
    tops = zip(lp.top_logprobs[1:], lp.token_logprobs[1:], strict=True)
    assert all(1 <= len(top) <= k and max(top.values()) >= v for top, v in tops)  # texts of ids may repeat
    assert "".join(lp.tokens) == choice.text
    assert lp.text_offset == list(accumulate([0] + [len(t) for t in lp.tokens[:-1]]))


def _kv_free(engine) -> bool:
    stats = engine.stats()
    return stats.num_running == stats.num_waiting == 0 and stats.kv_usage == 0


@pytest.mark.parametrize("as_ids", [False, True], ids=["string", "token-id-batch"])
def test_echo_with_max_tokens_0_scores_the_prompt(client, model, engine, as_ids):
    """lm-eval-harness's loglikelihood request: the prompt back with a logprob for each of its tokens."""
    ids = [engine.tokenizer(p).input_ids for p in PROMPTS]
    texts = PROMPTS if as_ids else [PROMPT]
    r = client.completions.create(
        model=model, prompt=ids if as_ids else PROMPT, echo=True, max_tokens=0, logprobs=1
    )
    assert [c.index for c in r.choices] == list(range(len(texts)))
    for choice, text, prompt_ids in zip(r.choices, texts, ids, strict=False):
        assert choice.text == text and choice.finish_reason == "length"
        _assert_echoed(choice, text, len(prompt_ids), 0, 1)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (sum(len(i) for i in ids[: len(texts)]), 0)
    assert wait_until(lambda: _kv_free(engine))


def test_echo_puts_the_prompt_before_the_generated_text(client, model, engine):
    """Echo with tokens: the prompt's text and scores (those of the prompt alone) come before what the
    request without echo generates, with its logprobs."""
    n_prompt = len(engine.tokenizer(PROMPT).input_ids)
    plain = _greedy(client, model, PROMPT, logprobs=2).choices[0]
    alone = client.completions.create(model=model, prompt=PROMPT, echo=True, max_tokens=0, logprobs=2)
    echoed = _greedy(client, model, PROMPT, logprobs=2, echo=True).choices[0]
    assert echoed.text == PROMPT + plain.text and echoed.finish_reason == "length"
    _assert_echoed(echoed, PROMPT, n_prompt, 6, 2)
    prompt_part = alone.choices[0].logprobs
    assert echoed.logprobs.token_logprobs == prompt_part.token_logprobs + plain.logprobs.token_logprobs
    assert echoed.logprobs.top_logprobs == prompt_part.top_logprobs + plain.logprobs.top_logprobs
    text_only = _greedy(client, model, PROMPT, echo=True).choices[0]
    assert text_only.text == echoed.text and text_only.logprobs is None
    no_top = _greedy(client, model, PROMPT, logprobs=0, echo=True).choices[0].logprobs
    assert no_top.token_logprobs == echoed.logprobs.token_logprobs
    assert no_top.top_logprobs == [None] + [{}] * (n_prompt + 5)


@pytest.mark.parametrize("max_tokens", [0, 3])
def test_streamed_echo_comes_with_each_choices_first_chunk(client, model, engine, max_tokens):
    """As vLLM streams it: the first chunk of every choice (n = 2 of each of two prompts) carries its
    prompt and the prompt's logprobs; the chunks add up to the answer without streaming."""
    kwargs = dict(n=2, echo=True, logprobs=1, max_tokens=max_tokens, temperature=0, extra_body=IGNORE_EOS)
    whole = client.completions.create(model=model, prompt=PROMPTS, **kwargs)
    chunks = list(client.completions.create(model=model, prompt=PROMPTS, stream=True, **kwargs))
    for c in whole.choices:
        mine = [chunk.choices[0] for chunk in chunks if chunk.choices[0].index == c.index]
        prompt = PROMPTS[c.index // 2]
        assert mine[0].text.startswith(prompt) and not any(m.text.startswith(prompt) for m in mine[1:])
        assert "".join(m.text for m in mine) == c.text and c.text.startswith(prompt)
        for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            assert [x for m in mine for x in getattr(m.logprobs, name)] == getattr(c.logprobs, name)
        _assert_echoed(c, prompt, len(engine.tokenizer(prompt).input_ids), max_tokens, 1)
        assert mine[-1].finish_reason == c.finish_reason == "length"
    assert whole.usage.completion_tokens == 4 * max_tokens
    assert wait_until(lambda: _kv_free(engine))


def test_chat_logprobs_and_top_logprobs(client, model):
    r = _create(client, model, "chat", max_tokens=4, logprobs=True, top_logprobs=3, extra_body=IGNORE_EOS)
    content = r.choices[0].logprobs.content
    assert len(content) == 4
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob
        assert bytes(entry.bytes).decode() == entry.token


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_seed_makes_sampling_reproducible(client, model, endpoint):
    texts = {
        _text(_create(client, model, endpoint, max_tokens=10, temperature=1.0, seed=123).choices[0])
        for _ in range(2)
    }
    assert len(texts) == 1


def test_stop_string_ends_the_text_before_it(client, model):
    greedy = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=24, temperature=0, extra_body=IGNORE_EOS
    )
    text = greedy.choices[0].text
    middle = len(text) // 2
    stop = text[middle : middle + 3]
    assert stop.strip(), f"greedy text too short to pick a stop string: {text!r}"
    stopped = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop], extra_body=IGNORE_EOS
    )
    assert stopped.choices[0].text == text[: text.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].model_extra["stop_reason"] == stop


def test_request_id_is_honoured_echoed_and_used_as_response_id(client, model):
    raw = client.completions.with_raw_response.create(
        model=model, prompt=PROMPT, max_tokens=2, extra_headers={"X-Request-Id": "client-id-42"}
    )
    assert raw.headers["x-request-id"] == "client-id-42"
    assert raw.parse().id == "client-id-42"
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert raw.parse().id == raw.headers["x-request-id"] and raw.parse().id.startswith("chatcmpl-")


def test_tokenize_a_prompt_as_completions_count_it(base_url, client, model, engine):
    ids = engine.tokenizer(PROMPT).input_ids
    r = httpx.post(f"{base_url}/tokenize", json={"model": model, "prompt": PROMPT})
    assert r.json() == {"count": len(ids), "max_model_len": 512, "tokens": ids}
    assert r.headers["x-request-id"].startswith("req-")
    completion = client.completions.create(model=model, prompt=PROMPT, max_tokens=1)
    assert completion.usage.prompt_tokens == len(ids)
    bare = httpx.post(f"{base_url}/tokenize", json={"prompt": PROMPT, "add_special_tokens": False}).json()
    assert bare["tokens"] == engine.tokenizer(PROMPT, add_special_tokens=False).input_ids


def test_tokenize_messages_as_chat_completions_count_them(base_url, client, model):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPT}]
    counted = httpx.post(f"{base_url}/tokenize", json={"model": model, "messages": messages}).json()
    chat = client.chat.completions.create(model=model, messages=messages, max_tokens=1)
    assert counted["count"] == len(counted["tokens"]) == chat.usage.prompt_tokens
    body = {"messages": messages, "add_generation_prompt": False}
    without_turn = httpx.post(f"{base_url}/tokenize", json=body).json()["tokens"]
    assert 0 < len(without_turn) < counted["count"] and counted["tokens"][: len(without_turn)] == without_turn


def test_detokenize_round_trips_prompts_and_chat_templates(base_url, model, engine):
    def round_trip(body: dict) -> str:
        tokens = httpx.post(f"{base_url}/tokenize", json=body).json()["tokens"]
        r = httpx.post(f"{base_url}/detokenize", json={"model": model, "tokens": tokens})
        return r.json()["prompt"]

    assert round_trip({"prompt": PROMPT}) == PROMPT
    messages = [{"role": "user", "content": PROMPT}]
    template = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert round_trip({"messages": messages}) == template  # special tokens kept, as vLLM
    assert httpx.post(f"{base_url}/detokenize", json={"tokens": []}).json() == {"prompt": ""}


def test_models_and_health(base_url, client, model, engine):
    listed = client.models.list().data
    assert [m.id for m in listed] == [model]
    assert listed[0].model_extra["max_model_len"] == engine.max_model_len == 512
    assert httpx.get(f"{base_url}/health").json() == {"status": "ok"}


def test_openapi_schema_documents_our_errors_not_422(base_url):
    schema = httpx.get(f"{base_url}/openapi.json").json()
    for path in ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"):
        responses = schema["paths"][path]["post"]["responses"]
        assert "422" not in responses and {"400", "401", "404", "503"} <= set(responses)
        assert responses["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
        assert ("text/event-stream" in responses["200"]["content"]) == path.startswith("/v1")
    assert "attention_ms" in schema["components"]["schemas"]["Usage"]["properties"]


def test_heartbeats_keep_quiet_streams_alive(engine, model):
    with serve(engine, sse_heartbeat_seconds=0.0002) as url:
        body = {"model": model, "prompt": PROMPT, "max_tokens": 24, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as response:
            lines = [line for line in response.iter_lines() if line]
        assert ": keep-alive" in lines
        assert lines[-1] == "data: [DONE]"
        client = openai_client(url)
        chunks = list(client.completions.create(model=model, prompt=PROMPT, max_tokens=8, stream=True))
        assert chunks and all(c.object == "text_completion" for c in chunks)


def test_one_log_line_per_request_text_and_json(client, model, caplog):
    with caplog.at_level(logging.INFO, logger="leanserve.access"):
        client.completions.create(
            model=model,
            prompt=PROMPT,
            max_tokens=3,
            extra_headers={"X-Request-Id": "log-me"},
            extra_body=IGNORE_EOS,
        )
        # The line is written once the response is sent, so it may come a moment after the client has it.
        logged = lambda: [r for r in caplog.records if getattr(r, "fields", {}).get("request_id") == "log-me"]
        assert wait_until(lambda: len(logged()) == 1)
    records = logged()
    fields_ = records[0].fields
    assert (fields_["status"], fields_["completion_tokens"], fields_["finish_reason"]) == (200, 3, "length")
    assert (
        fields_["ttft_ms"] > 0 and fields_["latency_ms"] >= fields_["ttft_ms"] and fields_["attention_ms"] > 0
    )
    assert "request_id=log-me" in records[0].getMessage()
    assert json.loads(JsonLogFormatter().format(records[0]))["request_id"] == "log-me"


def test_health_and_routes_answer_503_while_loading():
    with serve(None) as url:
        health = httpx.get(f"{url}/health")
        assert health.status_code == 503 and "loading" in health.json()["error"]["message"]
        for path, body in (
            ("/v1/completions", {"model": "m", "prompt": "x"}),
            ("/tokenize", {"prompt": "x"}),
            ("/detokenize", {"tokens": [1]}),
        ):
            r = httpx.post(f"{url}{path}", json=body)
            assert r.status_code == 503 and r.headers["retry-after"], path


# -- settings: command line over LEANSERVE_* environment over defaults --------------------------------


def test_cli_beats_env_beats_default(monkeypatch):
    monkeypatch.setenv("LEANSERVE_PORT", "9001")
    monkeypatch.setenv("LEANSERVE_MAX_NUM_SEQS", "7")
    monkeypatch.setenv("LEANSERVE_ENFORCE_EAGER", "true")
    settings = parse_settings(["--port", "9002", "--no-enable-prefix-caching", "--api-key", "k"])
    assert (settings.port, settings.max_num_seqs, settings.enforce_eager) == (9002, 7, True)
    assert (settings.enable_prefix_caching, settings.api_key, settings.block_size) == (False, "k", 16)
    config = settings.engine_config()
    assert isinstance(config, EngineConfig) and (config.max_num_seqs, config.enable_prefix_caching) == (
        7,
        False,
    )


def test_cli_rejects_bad_engine_settings_before_starting():
    with pytest.raises(SystemExit, match="block_size"):
        main(["--block-size", "3"])


def test_engine_options_are_declared_once_in_engine_config():
    settings, config = Settings(), EngineConfig()
    assert settings.engine_config() == config
    assert set(EngineConfig.model_fields) <= set(Settings.model_fields)
    assert not set(EngineConfig.model_fields) & set(Settings.__annotations__)  # inherited, not redeclared


@pytest.mark.parametrize("name", sorted(Settings.model_fields))
def test_every_option_is_documented(name):
    doc = (Path(__file__).resolve().parents[1] / "docs" / "api.md").read_text()
    assert f"--{name.replace('_', '-')}" in doc and f"LEANSERVE_{name.upper()}" in doc
