"""langchain-openai's ChatOpenAI against a real uvicorn on the embedded SmolLM2: with_structured_output
(json_schema and function calling) returns the pydantic model, bind_tools with a named or required
tool_choice returns calls whose arguments validate, and a conversation carrying the calls and their
results goes back to the server. No token counting (it would fetch tiktoken's files)."""

from __future__ import annotations

from typing import Literal

import pytest
from http_server import real_engine, serve
from langchain_core.messages import HumanMessage, ToolMessage
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field


class City(BaseModel):
    """A city and its country."""

    name: str = Field(max_length=12)
    country: Literal["FR", "DE", "US"]
    population_millions: int = Field(ge=0, le=40)


class GetWeather(BaseModel):
    """Weather forecast for a city."""

    city: str = Field(max_length=12)
    days: int = Field(ge=1, le=7)
    unit: Literal["celsius", "fahrenheit"]


class GetTime(BaseModel):
    """Local time in a time zone."""

    zone: str = Field(max_length=8)


QUESTION = "What is the weather in Paris for the next 3 days?"


@pytest.fixture(scope="module")
def engine(default_model_path):
    with real_engine(default_model_path, max_model_len=1024) as engine:
        yield engine


@pytest.fixture(scope="module")
def llm(engine):
    with serve(engine) as url:
        yield ChatOpenAI(
            model=engine.model_name, base_url=f"{url}/v1", api_key="unused", temperature=0, max_tokens=120,
            max_retries=0, timeout=120, use_responses_api=False,
        )  # fmt: skip


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_with_structured_output_returns_the_model(llm, method):
    city = llm.with_structured_output(City, method=method, strict=True).invoke("Name a large city as JSON.")
    assert isinstance(city, City) and city.country in ("FR", "DE", "US")


@pytest.mark.parametrize("tool_choice", ["GetWeather", "any"])
def test_bind_tools_with_tool_choice(llm, tool_choice):
    # strict: langchain then closes the schemas (additionalProperties false), as OpenAI's strict mode
    message = llm.bind_tools([GetWeather, GetTime], tool_choice=tool_choice, strict=True).invoke(QUESTION)
    assert message.tool_calls and not message.invalid_tool_calls
    for call in message.tool_calls:
        tool = {"GetWeather": GetWeather, "GetTime": GetTime}[call["name"]]
        tool.model_validate(call["args"])
        assert call["id"].startswith("call_")
    if tool_choice == "GetWeather":
        assert [c["name"] for c in message.tool_calls] == ["GetWeather"]


def test_tool_results_go_back_to_the_server(llm):
    bound = llm.bind_tools([GetWeather], tool_choice="GetWeather", strict=True)
    question = HumanMessage(QUESTION)
    call = bound.invoke([question])
    result = ToolMessage("Sunny, 22 degrees", tool_call_id=call.tool_calls[0]["id"])
    answer = llm.invoke([question, call, result], max_tokens=8)
    assert isinstance(answer.content, str) and answer.content
    assert answer.usage_metadata["input_tokens"] > 0
