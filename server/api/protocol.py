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
    stream: bool = False
    stream_options: StreamOptions | None = None
    # vLLM's extras (docs/api.md says what each does).
    include_stop_str_in_output: bool = False  # the matched stop string stays at the end of the text
    skip_special_tokens: bool = True  # False: special tokens (e.g. <|im_end|>) stay in the text
    allowed_token_ids: list[int] | None = None  # only these tokens may be sampled
    bad_words: list[str] | None = None  # never generated (their last token is banned after the others)
    truncate_prompt_tokens: int | None = None  # keep the prompt's last k tokens (-1: the context's)
    prompt_logprobs: int | None = None  # each prompt token's logprob and k alternatives (not streamed)
    return_tokens_as_token_ids: bool = False  # logprob tokens as "token_id:{id}"
    # Structured outputs (server/api/structured.py): OpenAI's response_format, vLLM's structured_outputs
    # and its older guided_* fields.
    response_format: dict | None = None
    structured_outputs: dict | None = None
    guided_json: str | dict | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    # Accepted only with their default ("off") value: asking for the feature is a 400 naming it
    # (request_inputs._UNSUPPORTED says why each is not supported).
    use_beam_search: bool = False
    length_penalty: float = 1.0
    priority: int = 0
    spaces_between_special_tokens: bool = True
    logits_processors: list | None = None
    guided_decoding_backend: str | None = None
    guided_whitespace_pattern: str | None = None
    structural_tag: str | dict | None = None
    request_id: str | None = None
    cache_salt: str | None = None
    return_token_ids: bool = False
    kv_transfer_params: dict | None = None
    vllm_xargs: dict | None = None
    # Accepted and without effect here (docs/api.md, "Accepted without effect").
    user: str | None = None
    metadata: dict | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None


class CompletionRequest(_SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = None  # default 16, as OpenAI
    logprobs: int | None = None
    echo: bool = False  # the prompt (with its logprobs) before each choice's text; max_tokens may be 0
    suffix: str | None = None
    best_of: int | None = None
    add_special_tokens: bool = True  # the tokenizer's BOS etc. before a text prompt (vLLM's)
    prompt_embeds: str | list | None = None  # not supported


class TextPart(_Request):
    type: Literal["text"]
    text: str


class FunctionCall(_Request):
    name: str
    arguments: str | dict[str, Any]  # a JSON object: OpenAI's clients send it as a string


class MessageToolCall(_Request):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None  # passed to the chat template, which may show it
    tool_call_id: str | None = None  # a tool result's call (passed to the chat template)
    tool_calls: list[MessageToolCall] | None = None  # an assistant turn's calls (server/api/tools.py)

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


class FunctionDefinition(_Request):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments object
    strict: bool | None = None  # required and named calls always hold to the schema


class Tool(_Request):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: NamedFunction


class ChatRequest(_SamplingFields, ChatTemplateFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None  # deprecated OpenAI name of max_completion_tokens
    max_completion_tokens: int | None = None  # default: the rest of the context
    logprobs: bool = False
    top_logprobs: int | None = None
    echo: bool = False  # vLLM's: the answer starts with the last message's content when it has its role
    add_special_tokens: bool = False  # vLLM's: the tokenizer's BOS etc. on top of what the template writes
    # Tool calling (server/api/tools.py). The deprecated functions / function_call are accepted only where
    # they ask for nothing: ignoring a request for them would return what the client did not ask.
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # None: True, as OpenAI
    functions: list | None = None
    function_call: str | dict | None = None
    # Accepted only with their default value (400 otherwise, naming them).
    modalities: list[str] | None = None  # ["text"] only
    audio: dict | None = None
    prediction: dict | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    web_search_options: dict | None = None
    documents: list | None = None
    chat_template: str | None = None
    mm_processor_kwargs: dict | None = None


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


class PromptLogprob(BaseModel):
    """vLLM's shape of one token of `prompt_logprobs`; rank is null outside the top alternatives."""

    logprob: float
    rank: int | None = None
    decoded_token: str


# vLLM's prompt_logprobs: per prompt token (null for the first), its id and its top alternatives' ids
# (JSON keys, so strings) -> PromptLogprob.
PromptLogprobs = list[dict[str, PromptLogprob] | None]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    prompt_logprobs: PromptLogprobs | None = None


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


class ToolCallFunction(BaseModel):
    name: str
    arguments: str  # JSON text


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCallOut] = Field(default_factory=list)


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
    prompt_logprobs: PromptLogprobs | None = None


class FunctionDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(BaseModel):
    """OpenAI's streamed call: id, type and name in a call's first delta, then arguments fragments."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionDelta


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


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
