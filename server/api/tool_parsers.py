"""Tool calls in a model's text, in the formats its chat template teaches it: Hermes / Qwen
`<tool_call>{json}</tool_call>`, Llama 3.x JSON (`{"name": ..., "parameters": ...}`, optionally after
`<|python_tag|>`, several separated by `;`) and Mistral `[TOOL_CALLS]` (a JSON list, or the newer
`name[ARGS]{json}`). Pure functions on text: `parse` finds the calls (None when the text is not calls,
so that it stays plain content), `format_calls` writes calls back (for templates that cannot render an
assistant's calls), `safe_prefix` says how much of a growing text is content for sure (streaming)."""

from __future__ import annotations

import json
import secrets
import string
import uuid
from dataclasses import dataclass
from typing import Any, Protocol

_decoder = json.JSONDecoder()


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # a JSON object, as OpenAI sends it


@dataclass(frozen=True)
class ParsedOutput:
    content: str  # the text outside the calls, unstripped (a stream has sent its beginning already)
    calls: list[ToolCall]


def _call(value: Any, args_keys: tuple[str, ...] = ("arguments",)) -> ToolCall | None:
    """A call from a decoded JSON object with a string `name` and an object under one of `args_keys`
    (none: no arguments)."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not value["name"]:
        return None
    args = next((value[k] for k in args_keys if k in value), {})
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(value["name"], json.dumps(args, ensure_ascii=False))


def _json_values(text: str, separators: str) -> list[Any] | None:
    """The JSON values of `text` one after another, with only whitespace and `separators` between
    them; None if anything else is there."""
    values, i = [], 0
    while True:
        while i < len(text) and (text[i].isspace() or text[i] in separators):
            i += 1
        if i == len(text):
            return values
        try:
            value, i = _decoder.raw_decode(text, i)
        except ValueError:
            return None
        values.append(value)


def _held_back(text: str, marker: str) -> int:
    """Length of the longest end of `text` that begins `marker` (it may grow into the marker)."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:size]):
            return size
    return 0


class ToolParser(Protocol):
    name: str
    markers: tuple[str, ...]  # what the template source of a model of this family contains

    def parse(self, text: str) -> ParsedOutput | None: ...
    def format_calls(self, calls: list[ToolCall]) -> str: ...
    def safe_prefix(self, text: str) -> int: ...
    def new_id(self) -> str: ...


class _OpenAIIds:
    def new_id(self) -> str:
        return f"call_{uuid.uuid4().hex[:24]}"


class HermesParser(_OpenAIIds):
    """`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one block per call; the last block's
    closing tag may be missing (generation ended at EOS)."""

    name = "hermes"
    markers = ("<tool_call>",)
    _open, _close = "<tool_call>", "</tool_call>"

    def parse(self, text: str) -> ParsedOutput | None:
        start = text.find(self._open)
        if start < 0:
            return None
        calls, outside, i = [], [text[:start]], start
        while i >= 0 and i < len(text):
            end = text.find(self._close, i)
            body = text[i + len(self._open) : end if end >= 0 else len(text)]
            call = _call(_single(body))
            if call is None:
                return None
            calls.append(call)
            if end < 0:
                break
            i = text.find(self._open, end)
            outside.append(text[end + len(self._close) : i if i >= 0 else len(text)])
        return ParsedOutput("".join(outside), calls)

    def format_calls(self, calls: list[ToolCall]) -> str:
        return "\n".join(
            f'{self._open}\n{{"name": {json.dumps(c.name)}, "arguments": {c.arguments}}}\n{self._close}'
            for c in calls
        )

    def safe_prefix(self, text: str) -> int:
        start = text.find(self._open)
        return start if start >= 0 else len(text) - _held_back(text, self._open)


class Llama3JsonParser(_OpenAIIds):
    """The whole output is the calls: JSON objects `{"name": ..., "parameters": {...}}` (or
    "arguments"), separated by `;`, optionally after `<|python_tag|>` (a special token, so usually
    gone from the text)."""

    name = "llama3_json"
    markers = ("<|python_tag|>", '"parameters": ')
    _tag = "<|python_tag|>"

    def parse(self, text: str) -> ParsedOutput | None:
        body = text.strip().removeprefix(self._tag)
        if not body.lstrip().startswith("{"):
            return None
        values = _json_values(body, ";")
        calls = [_call(v, ("parameters", "arguments")) for v in values or []]
        if not calls or None in calls:
            return None
        return ParsedOutput("", calls)

    def format_calls(self, calls: list[ToolCall]) -> str:
        return "; ".join(f'{{"name": {json.dumps(c.name)}, "parameters": {c.arguments}}}' for c in calls)

    def safe_prefix(self, text: str) -> int:
        body = text.lstrip()
        if not body or body.startswith(("{", self._tag)) or self._tag.startswith(body):
            return 0
        return len(text)


class MistralParser:
    """`[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`, or the newer
    `[TOOL_CALLS]name[ARGS]{...}` once per call; text before the first marker is content. Mistral's
    templates want call ids of 9 letters and digits."""

    name = "mistral"
    markers = ("[TOOL_CALLS]",)
    _open, _args = "[TOOL_CALLS]", "[ARGS]"

    def parse(self, text: str) -> ParsedOutput | None:
        start = text.find(self._open)
        if start < 0:
            return None
        rest = text[start + len(self._open) :]
        if self._args in rest:
            calls = []
            for part in rest.split(self._open):
                name, sep, args = part.partition(self._args)
                calls.append(_call({"name": name.strip(), "arguments": _single(args)}) if sep else None)
        else:
            values = _json_values(rest, "")
            items = values[0] if values and len(values) == 1 else values
            items = items if isinstance(items, list) else [items]
            calls = [_call(v) for v in items]
        if not calls or None in calls:
            return None
        return ParsedOutput(text[:start], calls)

    def format_calls(self, calls: list[ToolCall]) -> str:
        items = ", ".join(f'{{"name": {json.dumps(c.name)}, "arguments": {c.arguments}}}' for c in calls)
        return f"{self._open}[{items}]"

    def safe_prefix(self, text: str) -> int:
        start = text.find(self._open)
        return start if start >= 0 else len(text) - _held_back(text, self._open)

    def new_id(self) -> str:
        return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(9))


def _single(text: str) -> Any:
    """The one JSON value of `text` (None if it is not exactly one)."""
    values = _json_values(text, "")
    return values[0] if values and len(values) == 1 else None


def parse_call_list(text: str) -> ParsedOutput | None:
    """The calls of a JSON list `[{"name": ..., "arguments": {...}}, ...]`: what the grammar of
    tool_choice `required` generates, whatever the model family."""
    items = _single(text)
    calls = [_call(item) for item in items] if isinstance(items, list) else []
    if not calls or None in calls:
        return None
    return ParsedOutput("", calls)


PARSERS: dict[str, ToolParser] = {p.name: p for p in (HermesParser(), Llama3JsonParser(), MistralParser())}
DEFAULT_PARSER = "hermes"


def parser_for_template(template: str | dict | None) -> ToolParser:
    """The parser whose markers the chat template's source contains (Mistral's and Hermes' tags before
    Llama's JSON keys, which other templates may mention); Hermes when none: the format most open
    tool-use fine-tunes share, and the one the fallback prompt teaches (server/api/tools.py)."""
    source = "\n".join(template.values()) if isinstance(template, dict) else template or ""
    for name in ("mistral", "hermes", "llama3_json"):
        if any(marker in source for marker in PARSERS[name].markers):
            return PARSERS[name]
    return PARSERS[DEFAULT_PARSER]
