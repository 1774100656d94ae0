"""Structured outputs from a request: OpenAI's `response_format` (json_object, json_schema), vLLM's
`structured_outputs` and its older `guided_json` / `guided_regex` / `guided_choice` / `guided_grammar`,
on both endpoints, and a chat request's `required` or named tool_choice (server/api/tools.py). At most
one of them may constrain a request; its grammar is compiled (and checked: a bad one is a 400 naming
its field) off the event loop, into the matcher the engine's sequences copy."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from leanserve.server.api.errors import bad_request, parameter_error
from leanserve.server.api.protocol import ChatRequest, CompletionRequest
from leanserve.server.api.tools import tool_constraint
from leanserve.server.engine.sampling_params import InvalidParameter

if TYPE_CHECKING:
    from leanserve.server.engine.async_engine import AsyncEngine

# vLLM's structured_outputs keys -> grammar kinds; its other keys are accepted only when off.
_STRUCTURED_KINDS = {"json": "json_schema", "regex": "regex", "choice": "choice", "grammar": "grammar"}
_GUIDED = {
    "json_schema": "guided_json",
    "regex": "guided_regex",
    "choice": "guided_choice",
    "grammar": "guided_grammar",
}
_STRUCTURED_OFF = {
    "json_object": (None, False),
    "disable_fallback": (None, False, True),
    "disable_any_whitespace": (None, False, True),  # JSON is always compact here
    "disable_additional_properties": (None, False),
    "whitespace_pattern": (None,),
    "structural_tag": (None,),
    "backend": (None, "auto", "guidance"),
}


def constraint_of(body: CompletionRequest | ChatRequest) -> tuple[str, Any, str] | None:
    """(grammar kind, its spec, the field it came from) of the request's one constraint, or None."""
    found: list[tuple[str, Any, str]] = []
    if body.response_format is not None:
        found += _response_format(body.response_format)
    if body.structured_outputs is not None:
        found += _structured_outputs(body.structured_outputs)
    for kind, name in (
        ("json_schema", "guided_json"),
        ("regex", "guided_regex"),
        ("choice", "guided_choice"),
    ):
        if (spec := getattr(body, name)) is not None:
            found.append((kind, spec, name))
    if body.guided_grammar is not None:
        found.append(("grammar", body.guided_grammar, "guided_grammar"))
    if isinstance(body, ChatRequest):
        found += tool_constraint(body)
    if len(found) > 1:
        names = ", ".join(name for _, _, name in found)
        raise bad_request(f"only one output constraint per request, got {names}", found[1][2])
    if (
        found
        and found[0][0] == "choice"
        and not (found[0][1] and all(isinstance(c, str) for c in found[0][1]))
    ):
        raise bad_request("a choice must be a non-empty list of strings", found[0][2])
    return found[0] if found else None


def _response_format(fmt: dict) -> list[tuple[str, Any, str]]:
    kind = fmt.get("type")
    if kind == "text":
        return []
    if kind == "json_object":
        return [("json_schema", {"type": "object"}, "response_format")]
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict):
            raise bad_request("response_format json_schema needs a json_schema object", "response_format")
        schema = spec.get("schema", {"type": "object"})
        if not isinstance(schema, dict | bool):
            raise bad_request("response_format json_schema.schema must be an object", "response_format")
        return [("json_schema", schema, "response_format")]
    raise bad_request(
        f"response_format type {kind!r} is not supported (text, json_object, json_schema)", "response_format"
    )


def _structured_outputs(spec: dict) -> list[tuple[str, Any, str]]:
    found = [
        (kind, spec[key], "structured_outputs") for key, kind in _STRUCTURED_KINDS.items() if spec.get(key)
    ]
    if spec.get("json_object"):
        found.append(("json_schema", {"type": "object"}, "structured_outputs"))
    for key, value in spec.items():
        if key in _STRUCTURED_KINDS or (key in _STRUCTURED_OFF and value in _STRUCTURED_OFF[key]):
            continue
        if key == "json_object":
            continue
        raise bad_request(f"structured_outputs.{key} is not supported", "structured_outputs")
    if not found:
        raise bad_request("structured_outputs names no json, regex, choice or grammar", "structured_outputs")
    return found


async def compile_constraint(body: CompletionRequest | ChatRequest, engine: AsyncEngine):
    """The request's matcher (an llguidance LLMatcher at its start), or None for free text."""
    constraint = constraint_of(body)
    if constraint is None:
        return None
    kind, spec, param = constraint
    try:
        return await asyncio.to_thread(engine.grammar.compile, kind, spec, param)
    except InvalidParameter as e:
        raise parameter_error(e) from e
