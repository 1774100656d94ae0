"""Tool calling for chat completions: `tools` and `tool_choice` checked (a bad one is a 400 naming it),
tools and an assistant's past calls rendered for the chat template, the grammar that makes `required`
and named calls hold to their functions' schemas, and the calls read back from each choice's text,
whole or as OpenAI's streamed deltas. The text formats of the model families are in tool_parsers.py."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal

import llguidance

from leanserve.server.api.errors import bad_request
from leanserve.server.api.protocol import (
    ChatMessage,
    ChatRequest,
    FunctionDelta,
    Tool,
    ToolCallDelta,
    ToolCallFunction,
    ToolCallOut,
)
from leanserve.server.api.tool_parsers import (
    PARSERS,
    ParsedOutput,
    ToolCall,
    ToolParser,
    parse_call_list,
    parser_for_template,
)

_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")  # OpenAI's function names (with vLLM's `.`)
_ANY_OBJECT: dict[str, Any] = {"type": "object"}


def choose_parser(setting: str, template: str | dict | None) -> ToolParser:
    """The --tool-call-parser setting, or under "auto" the one the chat template's source points to."""
    return parser_for_template(template) if setting == "auto" else PARSERS[setting]


@dataclass
class ToolMode:
    """How a request's choices are read: `auto` parses the text with the model family's parser;
    `required` and `named` texts are what the grammar made them (a JSON list of calls, or the named
    function's arguments)."""

    choice: Literal["auto", "required", "named"]
    parser: ToolParser
    function: str | None = None  # the named function

    def calls_of(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """A whole choice's content (None when it has none) and calls."""
        if self.choice == "named":
            assert self.function is not None
            return None, [ToolCall(self.function, text)]
        parsed = self.parse(text)
        if parsed is None:  # not calls (or cut short): the text stays content
            return text, []
        return parsed.content.strip() or None, parsed.calls

    def parse(self, text: str) -> ParsedOutput | None:
        """The calls of an `auto` or `required` choice's whole text (None: it is not calls)."""
        return parse_call_list(text) if self.choice == "required" else self.parser.parse(text)

    def outputs(self, calls: list[ToolCall]) -> list[ToolCallOut]:
        return [
            ToolCallOut(
                id=self.parser.new_id(), function=ToolCallFunction(name=c.name, arguments=c.arguments)
            )
            for c in calls
        ]


def tool_mode(body: ChatRequest, parser: ToolParser) -> ToolMode | None:
    """The request's ToolMode, None when its text is plain content (no tools, or tool_choice none).
    Checks the tools (names, parameter schemas) and tool_choice."""
    tools = body.tools or []
    choice = body.tool_choice if body.tool_choice is not None else ("auto" if tools else "none")
    if choice != "none" and not tools:
        raise bad_request("tool_choice needs tools", "tool_choice")
    names = set()
    for i, tool in enumerate(tools):
        name = tool.function.name
        if not _NAME.match(name):
            raise bad_request(
                f"tools[{i}].function.name must be 1 to 64 letters, digits, '_', '-' or '.'", "tools"
            )
        if name in names:
            raise bad_request(f"tools[{i}].function.name {name!r} is not unique", "tools")
        names.add(name)
        _check_schema(tool, i)
    if choice == "none":
        return None
    if choice in ("auto", "required"):
        return ToolMode(choice, parser)
    if choice.function.name not in names:
        raise bad_request(
            f"tool_choice names {choice.function.name!r}, which is not among tools", "tool_choice"
        )
    return ToolMode("named", parser, choice.function.name)


def _check_schema(tool: Tool, index: int) -> None:
    """Arguments are a JSON object (OpenAI's rule); a parameters schema llguidance cannot compile is a
    400 whatever tool_choice is (cheap: no tokenizer is needed to validate it)."""
    schema = tool.function.parameters or _ANY_OBJECT
    if schema.get("type", "object") != "object":
        raise bad_request(f"tools[{index}].function.parameters must describe an object", "tools")
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema))
        error = llguidance.LLMatcher.validate_grammar(grammar)
    except (ValueError, TypeError) as e:
        error = str(e)
    if error:
        raise bad_request(
            f"tools[{index}].function.parameters is not a usable JSON schema: {error}"[:2000], "tools"
        )


def tool_constraint(body: ChatRequest) -> list[tuple[str, Any, str]]:
    """The grammar of a `required` or named tool_choice, as structured.py's (kind, spec, field): the
    named function's arguments object, or a JSON list of calls `{"name": <a tool>, "arguments": <its
    schema>}` (exactly one without parallel_tool_calls)."""
    tools, choice = body.tools or [], body.tool_choice
    if not tools or choice in (None, "none", "auto"):
        return []
    if choice == "required":
        calls = [
            {
                "type": "object",
                "properties": {
                    "name": {"const": t.function.name},
                    "arguments": t.function.parameters or _ANY_OBJECT,
                },
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for t in tools
        ]
        schema: dict[str, Any] = {"type": "array", "items": {"anyOf": calls}, "minItems": 1}
        if body.parallel_tool_calls is False:
            schema["maxItems"] = 1
        return [("json_schema", schema, "tool_choice")]
    tool = next(t for t in tools if t.function.name == choice.function.name)
    return [("json_schema", tool.function.parameters or _ANY_OBJECT, "tool_choice")]


def template_inputs(
    messages: list[ChatMessage], tools: list[Tool] | None, parser: ToolParser, template: str | dict | None
) -> tuple[list[dict], list[dict] | None]:
    """The messages as the chat template reads them and the tools it gets. A template that knows
    `tool_calls` gets an assistant's calls with their arguments as objects (the templates of Llama 3,
    Qwen and Mistral write them with `tojson`); one that does not gets them written into the turn's
    content in the parser's format. A template that never mentions `tools` gets them in a system
    message, in the same format, so that every model can see them."""
    source = "\n".join(template.values()) if isinstance(template, dict) else template or ""
    turns = [_turn(m, i, parser, "tool_calls" in source) for i, m in enumerate(messages)]
    specs = [t.model_dump(exclude_none=True) for t in tools] if tools else None
    if specs and "tools" not in source:
        prompt = _tools_prompt(specs, parser)
        if turns[0]["role"] == "system":
            turns[0] = {**turns[0], "content": f"{turns[0]['content']}\n\n{prompt}"}
        else:
            turns.insert(0, {"role": "system", "content": prompt})
        specs = None
    return turns, specs


def _tools_prompt(specs: list[dict], parser: ToolParser) -> str:
    example = parser.format_calls([ToolCall("<function name>", '{"<argument>": "<value>"}')])
    listed = "\n".join(json.dumps(s["function"], ensure_ascii=False) for s in specs)
    return (
        f"You may call these functions (JSON schemas of their arguments):\n{listed}\n"
        f"To call one, answer with:\n{example}"
    )


def _turn(message: ChatMessage, index: int, parser: ToolParser, template_knows_calls: bool) -> dict:
    """A message as the chat template reads it; `name` and `tool_call_id` only when sent (templates
    test whether they are defined)."""
    turn: dict[str, Any] = {"role": message.role, "content": message.text()}
    for key in ("name", "tool_call_id"):
        if (value := getattr(message, key)) is not None:
            turn[key] = value
    if not message.tool_calls:
        return turn
    if message.role != "assistant":
        raise bad_request("only assistant messages have tool_calls", f"messages[{index}]")
    calls = []
    for call in message.tool_calls:
        args = call.function.arguments
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                args = None
        if not isinstance(args, dict):
            raise bad_request("tool_calls arguments must be a JSON object", f"messages[{index}]")
        calls.append(
            {"id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": args}}
        )
    if template_knows_calls:
        turn["tool_calls"] = calls
    else:
        written = parser.format_calls(
            [ToolCall(c["function"]["name"], json.dumps(c["function"]["arguments"])) for c in calls]
        )
        turn["content"] = f"{turn['content']}\n{written}" if turn["content"] else written
    return turn


def special_marker(mode: ToolMode | None, tokenizer) -> bool:
    """Whether the tokenizer writes the parser's opening marker as a special token (Mistral's
    [TOOL_CALLS], Llama's <|python_tag|>): auto mode then keeps special tokens in the text, where the
    parser looks for it."""
    if mode is None or mode.choice != "auto":
        return False
    marker = mode.parser.markers[0]
    token = tokenizer.added_tokens_decoder.get(tokenizer.convert_tokens_to_ids(marker))
    return token is not None and token.content == marker and token.special


@dataclass
class ToolCallStream:
    """One choice's stream: content deltas until its calls begin, then the calls as OpenAI's
    `delta.tool_calls`. Named calls stream their arguments as they are generated; `auto` and
    `required` calls come whole when the choice ends (their text is only known to be calls then)."""

    mode: ToolMode
    text: str = ""
    sent: int = 0  # characters of `text` sent as content
    has_calls: bool = False

    def feed(self, delta: str, finished: bool) -> tuple[str | None, list[ToolCallDelta]]:
        """(content to send, call deltas to send) for the next piece of the choice's text."""
        self.text += delta
        if self.mode.choice == "named":
            return None, self._named(delta)
        if not finished:
            if self.mode.choice == "required":
                return None, []
            return self._content(self.mode.parser.safe_prefix(self.text)), []
        parsed = self.mode.parse(self.text)
        if parsed is None or not parsed.content.startswith(self.text[: self.sent]):
            return self._content(len(self.text)), []
        self.has_calls = True
        content = parsed.content[self.sent :]
        self.sent = len(self.text)
        deltas = [
            ToolCallDelta(
                index=i,
                id=out.id,
                type="function",
                function=FunctionDelta(name=out.function.name, arguments=out.function.arguments),
            )
            for i, out in enumerate(self.mode.outputs(parsed.calls))
        ]
        return content.rstrip() or None, deltas

    def _content(self, upto: int) -> str | None:
        content = self.text[self.sent : upto]
        self.sent = max(self.sent, upto)
        return content or None

    def _named(self, delta: str) -> list[ToolCallDelta]:
        if not self.has_calls:
            self.has_calls = True
            (out,) = self.mode.outputs([ToolCall(self.mode.function or "", "")])
            return [
                ToolCallDelta(
                    index=0,
                    id=out.id,
                    type="function",
                    function=FunctionDelta(name=out.function.name, arguments=delta),
                )
            ]
        return [ToolCallDelta(index=0, function=FunctionDelta(arguments=delta))] if delta else []
