"""No request parameter is silently ignored: every field of the request schemas is implemented (and a test
shows it working), rejected with a 400 naming it unless it asks for the default, or documented in
docs/api.md as accepted without effect. `HANDLING` says which for each field; a field added to a schema
without an entry fails `test_every_request_field_is_handled`. The tests of vLLM's extras that we
implement follow, through the official openai client and a real uvicorn on the tiny model."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import openai
import pytest
from http_server import real_engine

from leanserve.server.api.protocol import (
    ChatMessage,
    ChatRequest,
    CompletionRequest,
    FunctionCall,
    FunctionDefinition,
    MessageToolCall,
    NamedFunction,
    NamedToolChoice,
    StreamOptions,
    TextPart,
    Tool,
)
from leanserve.server.api.request_inputs import bad_words_token_ids
from leanserve.server.api.tool_parsers import PARSERS
from leanserve.server.api.tools import template_inputs

TESTS = Path(__file__).parent
DOCS = TESTS.parent / "docs" / "api.md"
PROMPT = "The quick brown fox jumps over"
IGNORE_EOS = {"ignore_eos": True}


def impl(test: str) -> tuple[str, str]:
    """Implemented, and `test` ("file.py::name") shows it working."""
    return ("impl", test)


def rejected(value) -> tuple[str, object]:
    """A 400 naming the field when it is sent with `value` (not its default)."""
    return ("rejected", value)


NO_OP = ("no-op", None)  # listed under "Accepted without effect" in docs/api.md

_SHARED = {
    "model": impl("test_api.py::test_models_and_health"),
    "temperature": impl("test_api.py::test_seed_makes_sampling_reproducible"),
    "top_p": impl("test_sampler.py::test_truncation_never_picks_excluded_tokens"),
    "top_k": impl("test_sampler.py::test_truncation_never_picks_excluded_tokens"),
    "min_p": impl("test_sampler.py::test_truncation_never_picks_excluded_tokens"),
    "seed": impl("test_api.py::test_seed_makes_sampling_reproducible"),
    "stop": impl("test_api.py::test_stop_string_ends_the_text_before_it"),
    "stop_token_ids": impl("test_api.py::test_min_tokens_defers_a_stop_token"),
    "n": impl("test_api.py::test_chat_stream_with_n_choices"),
    "presence_penalty": impl("test_sampler.py::test_penalties_match_hand_computed"),
    "frequency_penalty": impl("test_sampler.py::test_penalties_match_hand_computed"),
    "repetition_penalty": impl("test_sampler.py::test_penalties_match_hand_computed"),
    "ignore_eos": impl("test_api.py::test_min_tokens_defers_a_stop_token"),
    "min_tokens": impl("test_api.py::test_min_tokens_defers_a_stop_token"),
    "logit_bias": impl("test_api.py::test_logit_bias_forces_and_bans_tokens"),
    "stream": impl("test_api.py::test_stream_equals_non_stream_and_usage_has_attention"),
    "stream_options": impl("test_api.py::test_stream_equals_non_stream_and_usage_has_attention"),
    "include_stop_str_in_output": impl("test_request_fields.py::test_include_stop_str_in_output"),
    "skip_special_tokens": impl("test_request_fields.py::test_skip_special_tokens_false_keeps_them"),
    "allowed_token_ids": impl("test_request_fields.py::test_allowed_token_ids_and_tokens_as_ids"),
    "bad_words": impl("test_request_fields.py::test_bad_words_are_never_generated"),
    "truncate_prompt_tokens": impl("test_request_fields.py::test_truncate_prompt_tokens"),
    "prompt_logprobs": impl("test_request_fields.py::test_prompt_logprobs"),
    "return_tokens_as_token_ids": impl("test_request_fields.py::test_allowed_token_ids_and_tokens_as_ids"),
    "response_format": impl("test_structured_outputs.py::test_json_schema_always_validates"),
    "structured_outputs": impl("test_structured_outputs.py::test_regex_and_choice_hold"),
    "guided_json": impl("test_structured_outputs.py::test_json_object_and_vllm_guided_json_on_completions"),
    "guided_regex": impl("test_structured_outputs.py::test_bad_constraints_are_400_naming_them"),
    "guided_choice": impl("test_structured_outputs.py::test_regex_and_choice_hold"),
    "guided_grammar": impl("test_structured_outputs.py::test_lark_grammar_and_allowed_tokens_together"),
    "use_beam_search": rejected(True),
    "length_penalty": rejected(0.5),
    "priority": rejected(1),
    "spaces_between_special_tokens": rejected(False),
    "logits_processors": rejected(["x"]),
    "guided_decoding_backend": rejected("xgrammar"),
    "guided_whitespace_pattern": rejected(" *"),
    "structural_tag": rejected("{}"),
    "request_id": rejected("abc"),
    "cache_salt": rejected("salt"),
    "return_token_ids": rejected(True),
    "kv_transfer_params": rejected({"a": 1}),
    "vllm_xargs": rejected({"a": 1}),
    "user": NO_OP,
    "metadata": NO_OP,
    "store": NO_OP,
    "service_tier": NO_OP,
    "prompt_cache_key": NO_OP,
    "safety_identifier": NO_OP,
}

HANDLING = {
    CompletionRequest: _SHARED
    | {
        "prompt": impl("test_api.py::test_prompt_as_token_ids"),
        "max_tokens": impl("test_api.py::test_echo_with_max_tokens_0_scores_the_prompt"),
        "logprobs": impl("test_api.py::test_n_samples_with_completion_logprobs"),
        "echo": impl("test_api.py::test_echo_puts_the_prompt_before_the_generated_text"),
        "suffix": rejected("x"),
        "best_of": rejected(3),
        "add_special_tokens": impl("test_request_fields.py::test_add_special_tokens"),
        "prompt_embeds": rejected("AAAA"),
    },
    ChatRequest: _SHARED
    | {
        "messages": impl("test_api.py::test_chat_stream_opens_with_the_assistant_role"),
        "add_generation_prompt": impl("test_api.py::test_chat_template_kwargs_reach_the_template"),
        "continue_final_message": impl("test_api.py::test_continue_final_message_ends_the_prompt_inside_it"),
        "chat_template_kwargs": impl("test_api.py::test_chat_template_kwargs_reach_the_template"),
        "max_tokens": impl("test_api.py::test_chat_stream_with_n_choices"),
        "max_completion_tokens": impl("test_api_abuse.py::test_bad_chat_parameters_are_400"),
        "logprobs": impl("test_api.py::test_chat_logprobs_and_top_logprobs"),
        "top_logprobs": impl("test_api.py::test_chat_logprobs_and_top_logprobs"),
        "echo": impl("test_request_fields.py::test_chat_echo_repeats_the_continued_message"),
        "add_special_tokens": impl("test_request_fields.py::test_add_special_tokens"),
        "tools": impl("test_tool_calling.py::test_required_calls_validate_against_their_schemas"),
        "tool_choice": impl("test_tool_calling.py::test_named_function_streams_its_arguments"),
        "parallel_tool_calls": impl("test_tool_calling.py::test_parallel_tool_calls_false_gives_one_call"),
        "functions": rejected([{"name": "f"}]),
        "function_call": rejected({"name": "f"}),
        "modalities": rejected(["audio"]),
        "audio": rejected({"voice": "x"}),
        "prediction": rejected({"type": "content", "content": "x"}),
        "reasoning_effort": rejected("high"),
        "verbosity": rejected("low"),
        "web_search_options": rejected({"a": 1}),
        "documents": rejected([{"title": "x"}]),
        "chat_template": rejected("{{ messages }}"),
        "mm_processor_kwargs": rejected({"a": 1}),
    },
    ChatMessage: {
        "role": impl("test_api.py::test_continue_final_message_ends_the_prompt_inside_it"),
        "content": impl("test_api.py::test_continue_final_message_ends_the_prompt_inside_it"),
        "name": impl("test_request_fields.py::test_message_name_and_tool_call_id_reach_the_template"),
        "tool_call_id": impl("test_request_fields.py::test_message_name_and_tool_call_id_reach_the_template"),
        "tool_calls": impl(
            "test_tool_calling.py::test_conversation_with_calls_and_results_reaches_the_template"
        ),
    },
    MessageToolCall: {
        "id": impl("test_tool_calling.py::test_template_that_knows_tools_gets_them_and_argument_objects"),
        "type": impl("test_tool_calling.py::test_template_that_knows_tools_gets_them_and_argument_objects"),
        "function": impl(
            "test_tool_calling.py::test_template_that_knows_tools_gets_them_and_argument_objects"
        ),
    },
    FunctionCall: {
        "name": impl("test_tool_calling.py::test_template_that_knows_tools_gets_them_and_argument_objects"),
        "arguments": impl(
            "test_tool_calling.py::test_template_that_knows_tools_gets_them_and_argument_objects"
        ),
    },
    Tool: {
        "type": impl("test_tool_calling.py::test_bad_tools_are_400_naming_them"),
        "function": impl("test_tool_calling.py::test_required_calls_validate_against_their_schemas"),
    },
    FunctionDefinition: {
        "name": impl("test_tool_calling.py::test_required_calls_validate_against_their_schemas"),
        "description": impl(
            "test_tool_calling.py::test_conversation_with_calls_and_results_reaches_the_template"
        ),
        "parameters": impl("test_tool_calling.py::test_required_calls_validate_against_their_schemas"),
        "strict": NO_OP,
    },
    NamedToolChoice: {
        "type": impl("test_tool_calling.py::test_named_function_streams_its_arguments"),
        "function": impl("test_tool_calling.py::test_named_function_streams_its_arguments"),
    },
    NamedFunction: {"name": impl("test_tool_calling.py::test_named_function_streams_its_arguments")},
    StreamOptions: {
        "include_usage": impl("test_api.py::test_stream_equals_non_stream_and_usage_has_attention")
    },
    TextPart: {
        "type": impl("test_api_abuse.py::test_bad_chat_parameters_are_400"),
        "text": impl("test_api_abuse.py::test_bad_chat_parameters_are_400"),
    },
}


@pytest.mark.parametrize("schema", list(HANDLING), ids=lambda s: s.__name__)
def test_every_request_field_is_handled(schema):
    """Each field has an entry; an implemented one names a test that exists, a no-op one is documented."""
    table = HANDLING[schema]
    assert sorted(schema.model_fields) == sorted(table), "a field without handling, or a stale entry"
    docs = DOCS.read_text()
    no_op_section = docs[docs.index("#### Accepted without effect") :]
    for name, (kind, what) in table.items():
        if kind == "impl":
            file, test = what.split("::")
            assert re.search(rf"^def {test}\(", (TESTS / file).read_text(), re.M), f"{name}: {what} missing"
        elif kind == "no-op":
            assert f"`{name}`" in no_op_section.split("\n\n")[1], f"{name} is not documented as a no-op"


@pytest.fixture(scope="module")
def engine(tiny_model_path):
    with real_engine(tiny_model_path, max_model_len=512) as engine:
        yield engine


def _rejections() -> list[tuple[str, str, object]]:
    cases = []
    for schema, route in ((CompletionRequest, "completions"), (ChatRequest, "chat")):
        cases += [
            (route, name, what) for name, (kind, what) in HANDLING[schema].items() if kind == "rejected"
        ]
    return cases


@pytest.mark.parametrize(
    ("route", "name", "value"), _rejections(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_unsupported_fields_are_400_naming_them(base_url, engine, route, name, value):
    if route == "completions":
        body, path = {"prompt": PROMPT, name: value}, "/v1/completions"
    else:
        body, path = {"messages": [{"role": "user", "content": "hi"}], name: value}, "/v1/chat/completions"
    response = httpx.post(f"{base_url}{path}", json={"model": engine.model_name, "max_tokens": 2, **body})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == name


def test_no_op_fields_are_accepted(client, engine):
    extra = {"metadata": {"a": "b"}, "store": False, "service_tier": "auto", "prompt_cache_key": "k"}
    extra |= {"safety_identifier": "s", "user": "u"}
    extra["tools"] = [{"type": "function", "function": {"name": "f", "strict": True}}]
    chat = client.chat.completions.create(
        model=engine.model_name, messages=[{"role": "user", "content": "hi"}], max_tokens=2, extra_body=extra
    )
    assert chat.choices[0].message.content is not None


def _greedy_ids(client, engine, n: int, **extra) -> list[int]:
    out = client.completions.create(
        model=engine.model_name, prompt=PROMPT, max_tokens=n, temperature=0, logprobs=0,
        extra_body={**IGNORE_EOS, "return_tokens_as_token_ids": True, **extra},
    )  # fmt: skip
    return [int(t.removeprefix("token_id:")) for t in out.choices[0].logprobs.tokens]


def test_include_stop_str_in_output(client, engine):
    ids = _greedy_ids(client, engine, 8)
    text = engine.tokenizer.decode(ids)
    stop = text[len(engine.tokenizer.decode(ids[:3])) :][:3]
    assert stop.strip()
    kw = {"model": engine.model_name, "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "stop": [stop]}
    cut = client.completions.create(**kw, extra_body=IGNORE_EOS).choices[0]
    kept = client.completions.create(**kw, extra_body={**IGNORE_EOS, "include_stop_str_in_output": True})
    assert cut.finish_reason == "stop" and kept.choices[0].stop_reason == stop
    assert kept.choices[0].text == cut.text + stop


def test_skip_special_tokens_false_keeps_them(client, engine):
    special = engine.tokenizer.convert_tokens_to_ids("<|im_start|>")
    kw = {"model": engine.model_name, "prompt": PROMPT, "max_tokens": 2, "logit_bias": {str(special): 100}}
    dropped = client.completions.create(**kw, extra_body=IGNORE_EOS).choices[0].text
    kept = client.completions.create(**kw, extra_body={**IGNORE_EOS, "skip_special_tokens": False})
    assert dropped == "" and kept.choices[0].text == "<|im_start|>" * 2


def test_allowed_token_ids_and_tokens_as_ids(client, engine):
    greedy = _greedy_ids(client, engine, 6)
    allowed = [t for t in range(100, 110) if t not in greedy]
    got = _greedy_ids(client, engine, 6, allowed_token_ids=allowed)
    assert got and set(got) <= set(allowed)
    sampled = _greedy_ids(client, engine, 6, allowed_token_ids=allowed, temperature=1.0, seed=3)
    assert set(sampled) <= set(allowed)
    chat = client.chat.completions.create(
        model=engine.model_name, messages=[{"role": "user", "content": "hi"}], max_tokens=3, logprobs=True,
        top_logprobs=2, extra_body={"return_tokens_as_token_ids": True, "allowed_token_ids": allowed},
    )  # fmt: skip
    for entry in chat.choices[0].logprobs.content:
        assert int(entry.token.removeprefix("token_id:")) in allowed
        assert all(top.token.startswith("token_id:") for top in entry.top_logprobs)


def test_bad_words_are_never_generated(client, engine):
    greedy = _greedy_ids(client, engine, 8)
    # A word of two tokens of the greedy text, and one of a single token: neither may appear.
    two = engine.tokenizer.decode(greedy[2:4]).strip()
    one = engine.tokenizer.decode(greedy[:1]).strip()
    words = [w for w in (one, two) if w]
    got = _greedy_ids(client, engine, 8, bad_words=words)
    assert got != greedy
    for ids in bad_words_token_ids(words, engine.tokenizer):
        assert all(got[i : i + len(ids)] != ids for i in range(len(got))), (ids, got)


def test_truncate_prompt_tokens(client, engine):
    out = client.completions.create(
        model=engine.model_name, prompt=PROMPT, max_tokens=1, echo=True,
        extra_body={"truncate_prompt_tokens": 3},
    )  # fmt: skip
    assert out.usage.prompt_tokens == 3
    ids = engine.tokenizer(PROMPT).input_ids[-3:]
    assert out.choices[0].text.startswith(engine.tokenizer.decode(ids))
    chat = client.chat.completions.create(
        model=engine.model_name, messages=[{"role": "user", "content": PROMPT}], max_tokens=1,
        extra_body={"truncate_prompt_tokens": 4},
    )  # fmt: skip
    assert chat.usage.prompt_tokens == 4


def test_prompt_logprobs(client, engine):
    out = client.completions.create(
        model=engine.model_name, prompt=PROMPT, max_tokens=1, extra_body={"prompt_logprobs": 2}
    )
    scores = out.choices[0].model_extra["prompt_logprobs"]
    ids = engine.tokenizer(PROMPT).input_ids
    assert len(scores) == len(ids) and scores[0] is None
    for token_id, entry in zip(ids[1:], scores[1:], strict=True):
        assert str(token_id) in entry and 2 <= len(entry) <= 3
        ranks = sorted(e["rank"] for e in entry.values() if e["rank"] is not None)
        assert ranks == [1, 2] and all(e["logprob"] <= 0 for e in entry.values())
    chat = client.chat.completions.create(
        model=engine.model_name, messages=[{"role": "user", "content": PROMPT}], max_tokens=1,
        extra_body={"prompt_logprobs": 0},
    )  # fmt: skip
    assert len(chat.model_extra["prompt_logprobs"]) == chat.usage.prompt_tokens
    with pytest.raises(openai.BadRequestError, match="prompt_logprobs"):
        client.completions.create(
            model=engine.model_name,
            prompt=PROMPT,
            max_tokens=1,
            stream=True,
            extra_body={"prompt_logprobs": 1},
        )


@pytest.mark.parametrize("stream", [False, True])
def test_chat_echo_repeats_the_continued_message(client, engine, stream):
    begun = "The capital of France is"
    messages = [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": begun}]
    extra = {"add_generation_prompt": False, "continue_final_message": True, "echo": True}
    kw = {"model": engine.model_name, "messages": messages, "max_tokens": 3, "n": 2, "extra_body": extra}
    if stream:
        texts = ["", ""]
        for chunk in client.chat.completions.create(**kw, stream=True):
            for choice in chunk.choices:
                texts[choice.index] += choice.delta.content or ""
    else:
        texts = [c.message.content for c in client.chat.completions.create(**kw).choices]
    assert all(t.startswith(begun) and len(t) > len(begun) for t in texts)
    plain = client.chat.completions.create(
        model=engine.model_name, messages=messages[:1], max_tokens=3, extra_body={"echo": True}
    )
    assert not plain.choices[0].message.content.startswith(PROMPT)  # another role's turn: nothing echoed


def test_add_special_tokens(base_url, client, engine):
    for special in (False, True):
        out = client.completions.create(
            model=engine.model_name, prompt=PROMPT, max_tokens=1, extra_body={"add_special_tokens": special}
        )
        assert out.usage.prompt_tokens == len(engine.tokenizer(PROMPT, add_special_tokens=special).input_ids)
    messages = [{"role": "user", "content": PROMPT}]
    counted = httpx.post(f"{base_url}/tokenize", json={"messages": messages, "add_special_tokens": True})
    chat = client.chat.completions.create(
        model=engine.model_name, messages=messages, max_tokens=1, extra_body={"add_special_tokens": True}
    )
    assert chat.usage.prompt_tokens == counted.json()["count"]


def test_message_name_and_tool_call_id_reach_the_template():
    messages = [ChatMessage(role="tool", content="42", name="calc", tool_call_id="call_1")]
    messages.append(ChatMessage(role="user", content="hi"))
    turns, _ = template_inputs(messages, None, PARSERS["hermes"], "{{ messages }}")
    assert turns[0] == {"role": "tool", "content": "42", "name": "calc", "tool_call_id": "call_1"}
    assert turns[1] == {"role": "user", "content": "hi"}
