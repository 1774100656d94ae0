"""Tool calling through the official openai client and a real uvicorn on the embedded SmolLM2: required
and named calls hold to their functions' schemas (n > 1, streamed or not), parallel_tool_calls false
gives one call, tool_choice none gives none, auto reads the model's own format out of its text, a
conversation with calls and tool results reaches the template, and bad tools are 400s naming them."""

from __future__ import annotations

import json
from types import SimpleNamespace

import httpx
import jsonschema
import pytest
from http_server import real_engine

from leanserve.server.api.protocol import ChatMessage, Tool
from leanserve.server.api.tool_parsers import PARSERS
from leanserve.server.api.tools import ToolMode, special_marker, template_inputs

WEATHER_ARGS = {
    "type": "object",
    "properties": {
        "location": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 12},
                "country": {"enum": ["FR", "DE", "US"]},
            },
            "required": ["city", "country"],
            "additionalProperties": False,
        },
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "fields": {
            "type": "array",
            "items": {"enum": ["temp", "wind", "rain"]},
            "minItems": 1,
            "maxItems": 3,
        },
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["location", "days", "fields", "unit"],
    "additionalProperties": False,
}
TIME_ARGS = {
    "type": "object",
    "properties": {"zone": {"type": "string", "maxLength": 8}},
    "required": ["zone"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather forecast", "parameters": WEATHER_ARGS},
    },
    {
        "type": "function",
        "function": {"name": "get_time", "description": "Time in a zone", "parameters": TIME_ARGS},
    },
]
SCHEMAS = {"get_weather": WEATHER_ARGS, "get_time": TIME_ARGS}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris for the next 3 days?"}]


@pytest.fixture(scope="module")
def engine(default_model_path):
    with real_engine(default_model_path, max_model_len=1024) as engine:
        yield engine


def _choices(response, n: int, stream: bool) -> list[dict]:
    """Per choice: content, calls [(id, name, arguments)], finish_reason; a stream's deltas joined, its
    shape checked on the way (id, type and name in each call's first delta only)."""
    if not stream:
        return [
            {
                "content": c.message.content,
                "calls": [(t.id, t.function.name, t.function.arguments) for t in c.message.tool_calls or []],
                "finish_reason": c.finish_reason,
            }
            for c in response.choices
        ]
    out = [{"content": None, "calls": [], "finish_reason": None} for _ in range(n)]
    for chunk in response:
        for c in chunk.choices:
            choice = out[c.index]
            if c.delta.content:
                choice["content"] = (choice["content"] or "") + c.delta.content
            for delta in c.delta.tool_calls or []:
                if delta.index == len(choice["calls"]):
                    assert delta.id and delta.type == "function" and delta.function.name
                    choice["calls"].append([delta.id, delta.function.name, ""])
                else:
                    assert delta.id is None and delta.function.name is None
                choice["calls"][delta.index][2] += delta.function.arguments or ""
            if c.finish_reason:
                choice["finish_reason"] = c.finish_reason
    return [{**c, "calls": [tuple(call) for call in c["calls"]]} for c in out]


def _validate(calls: list[tuple]) -> None:
    for call_id, name, arguments in calls:
        assert call_id.startswith("call_")
        jsonschema.validate(json.loads(arguments), SCHEMAS[name])


@pytest.mark.parametrize("stream", [False, True])
def test_required_calls_validate_against_their_schemas(client, engine, stream):
    response = client.chat.completions.create(
        model=engine.model_name, messages=MESSAGES, tools=TOOLS, tool_choice="required", n=2,
        temperature=0.8, seed=3, max_tokens=200, stream=stream, logprobs=not stream,
        stream_options={"include_usage": True} if stream else None,
    )  # fmt: skip
    choices = _choices(response, 2, stream)
    for choice in choices:
        assert choice["finish_reason"] == "tool_calls" and choice["content"] is None
        assert choice["calls"]
        _validate(choice["calls"])
    if not stream:
        assert response.usage.completion_tokens > 0
        for c in response.choices:  # logprobs still cover every generated token
            assert c.logprobs.content and all(lp.logprob <= 0 for lp in c.logprobs.content)


@pytest.mark.parametrize("stream", [False, True])
def test_named_function_streams_its_arguments(client, engine, stream):
    named = {"type": "function", "function": {"name": "get_weather"}}
    response = client.chat.completions.create(
        model=engine.model_name, messages=MESSAGES, tools=TOOLS, tool_choice=named, temperature=0.7,
        seed=5, max_tokens=150, stream=stream,
    )  # fmt: skip
    if stream:
        chunks = list(response)
        fragments = [d for ch in chunks for c in ch.choices for d in c.delta.tool_calls or []]
        assert len(fragments) > 3  # the arguments arrive as they are generated, not in one piece
        response = iter(chunks)
    (choice,) = _choices(response, 1, stream)
    assert choice["finish_reason"] == "tool_calls" and [c[1] for c in choice["calls"]] == ["get_weather"]
    _validate(choice["calls"])


def test_parallel_tool_calls_false_gives_one_call(client, engine):
    response = client.chat.completions.create(
        model=engine.model_name, messages=MESSAGES, tools=TOOLS, tool_choice="required", n=3,
        temperature=1.0, seed=8, max_tokens=200, parallel_tool_calls=False,
    )  # fmt: skip
    for choice in _choices(response, 3, False):
        assert len(choice["calls"]) == 1
        _validate(choice["calls"])


@pytest.mark.parametrize("stream", [False, True])
def test_tool_choice_none_answers_text(client, engine, stream):
    response = client.chat.completions.create(
        model=engine.model_name, messages=MESSAGES, tools=TOOLS, tool_choice="none", max_tokens=12,
        temperature=0, stream=stream,
    )  # fmt: skip
    (choice,) = _choices(response, 1, stream)
    assert choice["content"] and not choice["calls"] and choice["finish_reason"] != "tool_calls"


@pytest.mark.parametrize("stream", [False, True])
def test_auto_reads_calls_out_of_the_text(client, engine, stream):
    """The model writes the Hermes format (the fallback parser for SmolLM2's template), here held to it by
    a regex; the calls come back as tool_calls, the text before them as content."""
    regex = r'Checking\. <tool_call>\{"name": "get_time", "arguments": \{"zone": "CET"\}\}</tool_call>'
    response = client.chat.completions.create(
        model=engine.model_name, messages=MESSAGES, tools=TOOLS, n=2, max_tokens=60, stream=stream,
        extra_body={"structured_outputs": {"regex": regex}},
    )  # fmt: skip
    for choice in _choices(response, 2, stream):
        assert choice["content"].strip() == "Checking."
        assert [(name, json.loads(args)) for _, name, args in choice["calls"]] == [
            ("get_time", {"zone": "CET"})
        ]
        assert choice["finish_reason"] == "tool_calls"


def test_auto_without_calls_is_plain_content(client, engine):
    out = client.chat.completions.create(
        model=engine.model_name, messages=MESSAGES, tools=TOOLS, max_tokens=8, temperature=0,
        extra_body={"structured_outputs": {"regex": r"Sunny <tool_call>\{oops"}},
    )  # fmt: skip
    assert out.choices[0].message.content.startswith("Sunny <tool_call>")
    assert not out.choices[0].message.tool_calls and out.choices[0].finish_reason != "tool_calls"


CONVERSATION = [
    *MESSAGES,
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_time", "arguments": '{"zone": "CET"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "14:05"},
]


def test_conversation_with_calls_and_results_reaches_the_template(client, engine):
    messages = [ChatMessage.model_validate(m) for m in CONVERSATION]
    tools = [Tool.model_validate(t) for t in TOOLS]
    turns, specs = template_inputs(messages, tools, PARSERS["hermes"], engine.tokenizer.chat_template)
    text = engine.tokenizer.apply_chat_template(
        turns, tools=specs, tokenize=False, add_generation_prompt=True
    )
    # SmolLM2's template renders neither tools nor calls: both are written in the Hermes format.
    assert (
        '"name": "get_weather"' in text
        and '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}' in text
    )
    assert (
        "Weather forecast" in text
        and "14:05" in text
        and text.index('get_time", "arguments') < text.index("14:05")
    )
    without = client.chat.completions.create(model=engine.model_name, messages=MESSAGES, max_tokens=1)
    out = client.chat.completions.create(
        model=engine.model_name, messages=CONVERSATION, tools=TOOLS, max_tokens=4
    )
    assert out.usage.prompt_tokens == len(engine.tokenizer(text).input_ids) > without.usage.prompt_tokens


def test_template_that_knows_tools_gets_them_and_argument_objects():
    source = "{% for m in messages %}{{ m.tool_calls | tojson }}{% endfor %}{{ tools | tojson }}"
    messages = [ChatMessage.model_validate(m) for m in CONVERSATION]
    turns, specs = template_inputs(
        messages, [Tool.model_validate(t) for t in TOOLS], PARSERS["hermes"], source
    )
    assert turns[1]["content"] == "" and turns[1]["tool_calls"][0]["function"]["arguments"] == {"zone": "CET"}
    assert turns[2] == {"role": "tool", "content": "14:05", "tool_call_id": "call_1"}
    assert [s["function"]["name"] for s in specs] == ["get_weather", "get_time"]


BAD = [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": None, "tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]}, "tools"),
    ({"tools": [TOOLS[0], TOOLS[0]]}, "tools"),
    ({"tools": [{"type": "retrieval", "function": {"name": "f"}}]}, "tools"),
    ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
    (
        {"messages": [{"role": "user", "content": "x", "tool_calls": CONVERSATION[1]["tool_calls"]}]},
        "messages[0]",
    ),
    (
        {
            "messages": [
                {
                    "role": "assistant",
                    "tool_calls": [
                        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{oops"}}
                    ],
                }
            ]
        },
        "messages[0]",
    ),
]


@pytest.mark.parametrize(("extra", "param"), BAD)
def test_bad_tools_are_400_naming_them(base_url, engine, extra, param):
    body = {"model": engine.model_name, "messages": MESSAGES, "tools": TOOLS, "max_tokens": 4} | extra
    response = httpx.post(
        f"{base_url}/v1/chat/completions", json={k: v for k, v in body.items() if v is not None}
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_auto_keeps_special_tokens_only_when_the_marker_is_one(engine):
    """Mistral's [TOOL_CALLS] and Llama's <|python_tag|> are special tokens, which the text would lose."""
    special = ToolMode("auto", SimpleNamespace(markers=("<|im_start|>",)))
    assert special_marker(special, engine.tokenizer)
    assert not special_marker(ToolMode("auto", PARSERS["hermes"]), engine.tokenizer)  # not a token here
    assert not special_marker(ToolMode("required", special.parser), engine.tokenizer)
    assert not special_marker(None, engine.tokenizer)
