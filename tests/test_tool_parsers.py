"""Tool-call parsers on plain text (no model): each family's format with one and several calls, text
around them, the round trip through format_calls, streaming's safe prefix, the parser chosen from a chat
template's source, and malformed output that stays content."""

from __future__ import annotations

import json

import pytest

from leanserve.server.api.tool_parsers import (
    PARSERS,
    HermesParser,
    Llama3JsonParser,
    MistralParser,
    ToolCall,
    parse_call_list,
    parser_for_template,
)

WEATHER = ToolCall("get_weather", json.dumps({"city": "Paris", "unit": "celsius"}))
TIME = ToolCall("get_time", json.dumps({"zone": "CET", "nested": {"a": [1, 2]}}))


def _calls(parsed) -> list[tuple[str, dict]]:
    return [(c.name, json.loads(c.arguments)) for c in parsed.calls]


def test_hermes_calls_and_content_around_them():
    text = (
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": '
        '{"city": "Paris", "unit": "celsius"}}\n</tool_call>\n<tool_call>'
        '{"name": "get_time", "arguments": {"zone": "CET", "nested": {"a": [1, 2]}}}'
    )  # the last block is not closed: generation ended at EOS
    parsed = HermesParser().parse(text)
    assert _calls(parsed) == _calls_of(WEATHER, TIME)
    assert parsed.content.strip() == "Let me check."


def test_llama3_json_with_python_tag_and_semicolons():
    parser = Llama3JsonParser()
    one = parser.parse(
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}'
    )
    assert _calls(one) == _calls_of(WEATHER) and one.content == ""
    two = parser.parse(
        ' {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}; '
        '{"name": "get_time", "parameters": {"zone": "CET", "nested": {"a": [1, 2]}}}'
    )
    assert _calls(two) == _calls_of(WEATHER, TIME)


def test_mistral_list_and_args_formats():
    parser = MistralParser()
    listed = parser.parse(
        'Sure. [TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}, '
        '{"name": "get_time", "arguments": {"zone": "CET", "nested": {"a": [1, 2]}}}]'
    )
    assert _calls(listed) == _calls_of(WEATHER, TIME) and listed.content == "Sure. "
    newer = parser.parse(
        '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "unit": "celsius"}'
        '[TOOL_CALLS]get_time[ARGS]{"zone": "CET", "nested": {"a": [1, 2]}}'
    )
    assert _calls(newer) == _calls_of(WEATHER, TIME)
    ids = {parser.new_id() for _ in range(20)}
    assert len(ids) == 20 and all(len(i) == 9 and i.isalnum() for i in ids)


@pytest.mark.parametrize("name", list(PARSERS))
def test_format_calls_parses_back(name):
    parser = PARSERS[name]
    parsed = parser.parse(parser.format_calls([WEATHER, TIME]))
    assert parsed is not None and _calls(parsed) == _calls_of(WEATHER, TIME)
    assert parser.new_id() != parser.new_id()


MALFORMED = {
    "hermes": [
        "no calls here",
        "<tool_call>{not json}</tool_call>",
        '<tool_call>{"arguments": {}}</tool_call>',
        '<tool_call>{"name": "f", "arguments": [1]}</tool_call>',
        '<tool_call>{"name": "f", "arguments": {}}{"x": 1}</tool_call>',
        '<tool_call>{"name": "f", "arguments": {"a": 1',
    ],
    "llama3_json": [
        "The weather is fine.",
        '{"name": "f", "parameters": {"a": 1}} and then words',
        '{"city": "Paris"}',
        '{"name": "f", "parameters": {"a": ',
        "[1, 2]",
    ],
    "mistral": [
        "plain text",
        "[TOOL_CALLS]",
        "[TOOL_CALLS]not json",
        '[TOOL_CALLS][{"name": "f"}, 3]',
        '[TOOL_CALLS]f[ARGS]{"a": ',
    ],
}


@pytest.mark.parametrize(("name", "text"), [(n, t) for n, texts in MALFORMED.items() for t in texts])
def test_malformed_output_is_not_calls(name, text):
    assert PARSERS[name].parse(text) is None


def test_arguments_given_as_a_json_string_are_an_object():
    parsed = HermesParser().parse('<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>')
    assert _calls(parsed) == [("f", {"a": 1})]


def test_call_list_of_the_required_grammar():
    parsed = parse_call_list('[{"name":"get_weather","arguments":{"city":"Paris","unit":"celsius"}}]')
    assert _calls(parsed) == _calls_of(WEATHER)
    for text in ('[{"name":"f","arguments":{"a":', "[]", '{"name":"f","arguments":{}}', '[{"name":"f"}]x'):
        assert parse_call_list(text) is None


@pytest.mark.parametrize(
    ("name", "text", "safe"),
    [
        ("hermes", "Hello", 5),
        ("hermes", "Hello <tool", 6),  # "<tool" may grow into the marker: held back
        ("hermes", "Hello <b>", 9),
        ("hermes", "Hi <tool_call>{", 3),
        ("llama3_json", "  ", 0),
        ("llama3_json", ' {"na', 0),
        ("llama3_json", "<|python", 0),
        ("llama3_json", "Sunny", 5),
        ("mistral", "ok [TOOL", 3),
        ("mistral", "ok [TOOL_CALLS][", 3),
    ],
)
def test_safe_prefix_holds_back_what_may_be_a_call(name, text, safe):
    assert PARSERS[name].safe_prefix(text) == safe


@pytest.mark.parametrize(
    ("source", "name"),
    [
        (
            "{% for tool_call in message.tool_calls %}<tool_call>\n{{ tool_call | tojson }}</tool_call>",
            "hermes",
        ),
        ('{{- "<|python_tag|>" }}{{- \'"parameters": \' }}', "llama3_json"),
        ("{{ '[TOOL_CALLS]' }}{{ tools | tojson }}", "mistral"),
        ("{{ message['content'] }}", "hermes"),  # no tool markers: the fallback format
        (None, "hermes"),
        ({"default": "x", "tool_use": "[TOOL_CALLS]"}, "mistral"),
    ],
)
def test_parser_chosen_from_the_template_source(source, name):
    assert parser_for_template(source).name == name


def _calls_of(*calls: ToolCall) -> list[tuple[str, dict]]:
    return [(c.name, json.loads(c.arguments)) for c in calls]
