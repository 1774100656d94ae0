"""Structured outputs through the official openai client and a real uvicorn on the embedded SmolLM2:
OpenAI's response_format and vLLM's structured_outputs / guided_* constrain every sample (n > 1,
streaming or not, sampled or greedy) to the schema, regex, choice or grammar; bad grammars are a 400."""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import llguidance
import llguidance.numpy
import numpy as np
import pytest
from http_server import openai_client, real_engine, serve
from transformers import AutoTokenizer

from leanserve.server.engine.config import EngineConfig
from leanserve.server.engine.grammar import GrammarCompiler
from leanserve.server.engine.llm_engine import LLMEngine
from leanserve.server.engine.sampling_params import SamplingParams

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 18, "maximum": 99},
        "color": {"enum": ["red", "green", "blue"]},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 10},
                "zip": {"type": "integer", "minimum": 10000, "maximum": 99999},
            },
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "minItems": 1, "maxItems": 3},
    },
    "required": ["name", "age", "color", "address", "tags"],
    "additionalProperties": False,
}
MESSAGES = [{"role": "user", "content": "Describe a person as JSON with name, age, color, address, tags."}]


@pytest.fixture(scope="module")
def engine(default_model_path):
    with real_engine(default_model_path, max_model_len=1024) as engine:
        yield engine


def _texts(response, n: int, stream: bool, chat: bool = True) -> list[str]:
    if not stream:
        return [c.message.content if chat else c.text for c in response.choices]
    texts = [""] * n
    for chunk in response:
        for c in chunk.choices:
            texts[c.index] += (c.delta.content or "") if chat else c.text
    return texts


@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_always_validates(client, engine, stream):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
    response = client.chat.completions.create(
        model=engine.model_name, messages=MESSAGES, n=4, temperature=1.0, seed=7, max_tokens=150,
        response_format=fmt, stream=stream,
    )  # fmt: skip
    for text in _texts(response, 4, stream):
        jsonschema.validate(json.loads(text), SCHEMA)


def test_json_object_and_vllm_guided_json_on_completions(client, engine):
    out = client.completions.create(
        model=engine.model_name, prompt="A JSON object:", max_tokens=120, n=2, temperature=0.8, seed=1,
        extra_body={"response_format": {"type": "json_object"}},
    )  # fmt: skip
    for c in out.choices:  # any object: a long string may run into max_tokens, cut but well begun
        assert c.text.startswith("{")
        if c.finish_reason == "stop":
            assert isinstance(json.loads(c.text), dict)
    guided = client.completions.create(
        model=engine.model_name, prompt="A person:", max_tokens=150, temperature=0.7, seed=2,
        extra_body={"guided_json": SCHEMA, "stop": ["\n\n"]},
    )  # fmt: skip
    jsonschema.validate(json.loads(guided.choices[0].text), SCHEMA)
    assert guided.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("stream", [False, True])
def test_regex_and_choice_hold(client, engine, stream):
    regex = r"[A-Z][a-z]{2,6}-\d{3}"
    out = client.chat.completions.create(
        model=engine.model_name, messages=MESSAGES, n=3, temperature=1.0, seed=3, max_tokens=20,
        stream=stream, extra_body={"structured_outputs": {"regex": regex}},
    )  # fmt: skip
    for text in _texts(out, 3, stream):
        assert re.fullmatch(regex, text), text
    choices = ["yes", "no", "maybe not"]
    out = client.completions.create(
        model=engine.model_name, prompt="Is the sky green?", n=4, temperature=1.5, seed=4, max_tokens=10,
        stream=stream, extra_body={"guided_choice": choices},
    )  # fmt: skip
    assert all(text in choices for text in _texts(out, 4, stream, chat=False))


def test_lark_grammar_and_allowed_tokens_together(client, engine):
    grammar = 'start: "The answer is " NUMBER "."\nNUMBER: /[0-9]{1,3}/'
    out = client.chat.completions.create(
        model=engine.model_name, messages=MESSAGES, max_tokens=20, temperature=0.9, seed=5, n=2,
        extra_body={"guided_grammar": grammar},
    )  # fmt: skip
    for c in out.choices:
        assert re.fullmatch(r"The answer is [0-9]{1,3}\.", c.message.content), c.message.content
        assert c.finish_reason == "stop"


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": 3}}},
            "response_format",
        ),
        ({"response_format": {"type": "yaml"}}, "response_format"),
        ({"guided_regex": "[a-"}, "guided_regex"),
        ({"guided_grammar": "start: nothing_defined"}, "guided_grammar"),
        ({"guided_choice": []}, "guided_choice"),
        ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
        ({"structured_outputs": {"regex": "a", "structural_tag": "x"}}, "structured_outputs"),
        ({"structured_outputs": {}}, "structured_outputs"),
    ],
)
def test_bad_constraints_are_400_naming_them(base_url, engine, extra, param):
    body = {"model": engine.model_name, "messages": MESSAGES, "max_tokens": 4, **extra}
    response = httpx.post(f"{base_url}/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_preempted_constrained_sequences_keep_their_state(default_model_path, async_scheduling):
    """A cache too small for the batch preempts sequences mid-JSON: recomputed, their output still
    validates (the matcher is not reset and their tokens are not sampled again), with the async
    scheduler running ahead of them too (n = 4 siblings, streamed)."""
    small_cache = {"max_model_len": 512, "kv_cache_tokens": 256, "block_size": 16}
    with (
        real_engine(default_model_path, async_scheduling=async_scheduling, **small_cache) as engine,
        serve(engine) as url,
    ):
        client = openai_client(url)
        fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
        stream = client.chat.completions.create(
            model=engine.model_name, messages=MESSAGES, n=4, temperature=1.0, seed=11, max_tokens=100,
            response_format=fmt, stream=True,
        )  # fmt: skip
        texts, finish = [""] * 4, [None] * 4
        for chunk in stream:
            for c in chunk.choices:
                texts[c.index] += c.delta.content or ""
                finish[c.index] = c.finish_reason or finish[c.index]
        for text, reason in zip(texts, finish, strict=True):
            assert reason in ("stop", "length")
            if reason == "stop":
                jsonschema.validate(json.loads(text), SCHEMA)
        assert "stop" in finish and engine.stats().num_preemptions > 0


def test_eos_ids_past_the_tokenizer_are_left_to_the_mask(default_model_path):
    """A model config whose EOS id lies past its tokenizer's vocabulary (Llama-3-8B's config with
    SmolLM2's tokenizer, as the GPU benchmarks run) still compiles grammars, and their masks allow no id
    past the tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(default_model_path)
    compiler = GrammarCompiler(tokenizer, 128256, frozenset({128001, tokenizer.eos_token_id}))
    matcher = compiler.compile("regex", "ab?", "response_format")
    mask = llguidance.numpy.allocate_token_bitmask(1, 128256)
    llguidance.numpy.fill_next_token_bitmask(matcher, mask, 0)
    allowed = np.unpackbits(mask.view(np.uint8), bitorder="little")[:128256].nonzero()[0]
    assert len(allowed) > 0 and allowed.max() < len(tokenizer)


def _generate(engine: LLMEngine, prompt: list[int]) -> tuple[dict[str, list[int]], int]:
    """Two constrained and two free requests (seeded, sampled) run to the end: their tokens by id, and
    the steps after which a step was left in flight with a constrained sequence decoding."""
    for i in range(4):
        params = SamplingParams(max_tokens=40, temperature=1.0, seed=i)
        if i < 2:
            params.grammar = engine.grammar.compile("json_schema", SCHEMA, "response_format")
        engine.add_request(f"r{i}", list(prompt), params)
    tokens: dict[str, list[int]] = {}
    ran_ahead = 0
    while engine.has_work:
        for out in engine.step():
            for sample in out.samples:
                tokens.setdefault(out.request_id, []).extend(sample.token_ids)
        flight = engine.pipeline.in_flight
        ran_ahead += flight is not None and any(seq.grammar is not None for seq in flight.row_seqs)
    return tokens, ran_ahead


def test_async_scheduling_runs_ahead_of_constrained_sequences(default_model_path):
    """With the async scheduler a constrained sequence's next step is launched before its token is read
    (the previous step is settled while the forward pass is queued, before sampling): the outputs are
    the synchronous engine's, token for token, and still validate."""
    results = {}
    for async_scheduling in (False, True):
        engine = LLMEngine.from_config(
            EngineConfig(
                model=str(default_model_path), dtype="float32", device="cpu", kv_cache_tokens=2048,
                max_model_len=512, async_scheduling=async_scheduling,
            )
        )  # fmt: skip
        chat = engine.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
        prompt = engine.tokenizer(chat, add_special_tokens=False).input_ids
        results[async_scheduling] = _generate(engine, prompt)
        assert engine.block_manager.num_free_blocks == engine.block_manager.pool.num_blocks
    (sync_tokens, sync_ahead), (async_tokens, async_ahead) = results[False], results[True]
    assert sync_ahead == 0 and async_ahead >= 20
    assert async_tokens == sync_tokens
    tokenizer = AutoTokenizer.from_pretrained(default_model_path)
    for request_id in ("r0", "r1"):
        text = tokenizer.decode(async_tokens[request_id], skip_special_tokens=True)
        if len(async_tokens[request_id]) < 40:  # complete: it must validate
            jsonschema.validate(json.loads(text), SCHEMA)
        else:
            assert re.match(r'^\{"name":', text), text
