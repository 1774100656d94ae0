"""OpenAI request/response schemas (completions, chat completions, models) and vLLM's /tokenize and
/detokenize. Requests ignore unknown fields and are strict about types; value ranges are checked by
`SamplingParams` so that one place names the bad parameter. `usage.attention_ms` is our extension: the
request's attention time."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

_INT64_MIN, _UINT64_END = -(1 << 63), 1 << 64


_SURROGATE = re.compile("[\ud800-\udfff]")
_SCALARS = frozenset({int, float, bool, type(None)})


def _has_surrogate(value: Any) -> bool:
    """Whether a JSON value holds a lone UTF-16 surrogate (json.loads accepts "\\ud800" and the raw bytes
    ED A0 80) anywhere: in a string, a key, or nested lists and objects. Iterative, whatever the depth;
    token-id lists cost little."""
    stack = [value]
    while stack:
        item = stack.pop()
        if type(item) is str:
            if not item.isascii() and _SURROGATE.search(item):
                return True
        elif type(item) is list:
            if not _SCALARS.issuperset(map(type, item)):  # (a token-id list is skipped at C speed)
                stack.extend(item)
        elif type(item) is dict:
            stack.extend(item.keys())
            stack.extend(item.values())
    return False


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_lone_surrogates(cls, value: Any) -> Any:
        """Text that is not Unicode scalar values cannot be tokenized, templated or written back as
        UTF-8: a 400 naming the field, before anything uses it."""
        if _has_surrogate(value):
            raise ValueError("text must be valid Unicode: it holds a lone surrogate (\\ud800-\\udfff)")
        return value


class StreamOptions(_Request):
    include_usage: bool = False


class _SamplingFields(_Request):
    """Parameters both endpoints share; None means the SamplingParams default."""

    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = Field(None, ge=_INT64_MIN, lt=_UINT64_END)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    n: int = 1
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = 0  # vLLM's: no EOS, stop_token_ids or stop strings before this many tokens
    logit_bias: dict[str, float] | None = None  # token id (a JSON key, so a string) -> bias
    user: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None


class CompletionRequest(_SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = None  # default 16, as OpenAI
    logprobs: int | None = None
    echo: bool = False  # the prompt (with its logprobs) before each choice's text; max_tokens may be 0
    suffix: str | None = None
    best_of: int | None = None


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatTemplateFields(_Request):
    """How chat messages become a prompt (vLLM's fields; chat completions and /tokenize)."""

    add_generation_prompt: bool = True  # open the assistant turn, which the model then writes
    # End the prompt inside the last message (an assistant turn the client began): the model continues it.
    continue_final_message: bool = False
    # Extra variables for the chat template (e.g. Qwen3's enable_thinking); they override
    # add_generation_prompt, and may not name apply_chat_template's own options.
    chat_template_kwargs: dict[str, Any] | None = None


class ChatRequest(_SamplingFields, ChatTemplateFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None  # deprecated OpenAI name of max_completion_tokens
    max_completion_tokens: int | None = None  # default: the rest of the context
    logprobs: bool = False
    top_logprobs: int | None = None
    # Accepted only where they ask for nothing (plain text, no tools): the server has no constrained
    # decoding or tool calling, and ignoring a request for them would return what the client did not ask.
    response_format: dict | None = None
    tools: list | None = None
    tool_choice: str | dict | None = None
    functions: list | None = None
    function_call: str | dict | None = None


class TokenizeRequest(ChatTemplateFields):
    """vLLM's /tokenize: exactly one of `prompt` (tokenized as /v1/completions does) or `messages`
    (rendered by the chat template as /v1/chat/completions does); the route checks which was sent."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    # None: True for a prompt, False for messages (their template writes the special tokens), as vLLM.
    add_special_tokens: bool | None = None


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int]


# Responses (serialised by us; never validated against client input).


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    attention_ms: float = Field(description="attention time attributed to this request, milliseconds")
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)  # None: an echoed prompt's first token
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatChoiceLogprobs(BaseModel):
    content: list[ChatTokenLogprob] = Field(default_factory=list)


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class ChatResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatStreamChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class ChatStreamResponse(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: Usage | None = None


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "leanserve"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str
