"""From an OpenAI request body to what the engine takes: the token ids of its prompts (a completion's
prompt or batch, chat messages through the model's chat template) and its SamplingParams; every input
that cannot be turned into them is a 400 naming its parameter here. Whether the prompts fit the model and
its cache is the engine's to say (`LLMEngine.validate`, through `AsyncEngine.add_requests`), also before
any engine work."""

from __future__ import annotations

from typing import TYPE_CHECKING

from leanserve.server.api.errors import bad_request, parameter_error
from leanserve.server.api.protocol import (
    ChatMessage,
    ChatRequest,
    ChatTemplateFields,
    CompletionRequest,
    Tool,
)
from leanserve.server.api.tool_parsers import ToolParser
from leanserve.server.api.tools import template_inputs
from leanserve.server.engine.sampling_params import InvalidParameter, SamplingParams

if TYPE_CHECKING:
    from leanserve.server.engine.async_engine import AsyncEngine

# Most characters of a request's stop strings together (SamplingParams caps their count at 16): each one
# is matched against every sequence's new text on the engine thread. OpenAI allows 4 stop sequences.
MAX_STOP_CHARS = 4096


def sampling_params(
    request: CompletionRequest | ChatRequest,
    max_tokens: int,
    logprobs: int | None,
    tokenizer,
    names: dict[str, str] | None = None,
    echo: bool = False,
) -> SamplingParams:
    """SamplingParams from the request; its InvalidParameter names the parameter, which we pass on under
    the name the client used (`names`: the client's name of an engine parameter where they differ, e.g.
    chat's max_completion_tokens and top_logprobs). With `echo` the prompt is scored too (when `logprobs`
    asks) and max_tokens may be 0: the answer is then the prompt alone."""
    names = names or {}
    max_tokens_name = names.get("max_tokens", "max_tokens")
    vocab = len(tokenizer)
    # The engine takes 0 (the request ends after its prefill), but only echo has something to return then.
    if max_tokens == 0 and not echo:
        hint = " (0 only with echo)" if isinstance(request, CompletionRequest) else ""
        raise bad_request(f"{max_tokens_name} must be at least 1{hint}", max_tokens_name)
    given = {
        name: getattr(request, name)
        for name in ("temperature", "top_p", "min_p", "seed", "presence_penalty", "frequency_penalty")
        if getattr(request, name) is not None
    }
    if request.repetition_penalty is not None:
        given["repetition_penalty"] = request.repetition_penalty
    if request.top_k is not None:
        given["top_k"] = min(request.top_k, vocab)  # k >= vocab keeps everything, as k = 0 does
    stop = [request.stop] if isinstance(request.stop, str) else request.stop or []
    if sum(map(len, stop)) > MAX_STOP_CHARS:
        raise bad_request(f"stop strings longer than {MAX_STOP_CHARS} characters together", "stop")
    stop_ids = request.stop_token_ids or []
    check_token_ids(stop_ids, vocab, "stop_token_ids")
    logit_bias = _logit_bias(request.logit_bias or {}, vocab)
    allowed = request.allowed_token_ids
    if allowed is not None:
        if not allowed:
            raise bad_request("allowed_token_ids must not be empty", "allowed_token_ids")
        check_token_ids(allowed, vocab, "allowed_token_ids")
    prompt_logprobs = logprobs if echo else None
    if request.prompt_logprobs is not None:
        if request.stream:
            raise bad_request("prompt_logprobs are not streamed: use stream=false", "prompt_logprobs")
        if prompt_logprobs not in (None, request.prompt_logprobs):
            raise bad_request("prompt_logprobs must equal logprobs with echo", "prompt_logprobs")
        prompt_logprobs = request.prompt_logprobs
    try:
        return SamplingParams(
            n=request.n,
            max_tokens=max_tokens,
            stop=stop,
            stop_token_ids=stop_ids,
            ignore_eos=request.ignore_eos,
            min_tokens=request.min_tokens,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            logit_bias=logit_bias,
            include_stop_str_in_output=request.include_stop_str_in_output,
            skip_special_tokens=request.skip_special_tokens,
            allowed_token_ids=allowed,
            bad_words_token_ids=bad_words_token_ids(request.bad_words or [], tokenizer),
            **given,
        )
    except InvalidParameter as e:
        raise parameter_error(e, names) from e


def check_token_ids(ids: list[int], vocab: int, param: str) -> None:
    """Token ids from the client that the tokenizer must know (stop tokens, /detokenize): outside its
    vocabulary is a 400."""
    if any(not 0 <= t < vocab for t in ids):
        raise bad_request(f"{param} has token ids outside [0, {vocab})", param)


def _logit_bias(bias: dict[str, float], vocab: int) -> dict[int, float]:
    """OpenAI's logit_bias keys are token ids written as JSON strings."""
    parsed = {}
    for key, value in bias.items():
        # (the length check first: int() of a digit string thousands long raises, it does not answer)
        if not (key.isascii() and key.isdigit() and len(key) <= 12 and int(key) < vocab):
            raise bad_request(f"logit_bias keys must be token ids in [0, {vocab}), got {key!r}", "logit_bias")
        parsed[int(key)] = value
    return parsed


# Fields accepted only with their default ("off") value, and why asking for them is a 400.
_UNSUPPORTED = {
    "use_beam_search": "beam search is not supported",
    "length_penalty": "length_penalty applies to beam search, which is not supported",
    "priority": "priority scheduling is not supported (admission is first come, first served)",
    "spaces_between_special_tokens": "special tokens are always decoded as the tokenizer joins them",
    "logits_processors": "custom logits processors are not supported",
    "guided_decoding_backend": "the one grammar engine is llguidance",
    "guided_whitespace_pattern": "the JSON whitespace pattern is fixed",
    "structural_tag": "structural tags are not supported",
    "request_id": "send the X-Request-Id header instead",
    "cache_salt": "prefix cache isolation is not supported",
    "return_token_ids": "token ids are not returned (use logprobs with return_tokens_as_token_ids)",
    "kv_transfer_params": "disaggregated prefill is not supported",
    "vllm_xargs": "vLLM's extension arguments are not supported",
    "prompt_embeds": "prompt embeddings are not supported",
    "suffix": "suffix (insertion) is not supported",
    "functions": "functions is deprecated: send tools",
    "audio": "audio output is not supported",
    "prediction": "predicted outputs are not supported",
    "reasoning_effort": "the served model has no reasoning-effort control",
    "verbosity": "the served model has no verbosity control",
    "web_search_options": "web search is not supported",
    "documents": "documents (RAG templates) are not supported",
    "chat_template": "the model's own chat template is always used",
    "mm_processor_kwargs": "the served model takes text only",
}


def reject_unsupported(body: CompletionRequest | ChatRequest) -> None:
    """Every option the server does not implement is a 400 naming it unless it asks for the default
    (or is an empty list or object): nothing a client asks for is silently ignored."""
    fields = type(body).model_fields
    for name, why in _UNSUPPORTED.items():
        value = getattr(body, name, None)
        if name in fields and value != fields[name].default and value not in ([], {}):
            raise bad_request(f"{name} is not supported: {why}", name)
    if isinstance(body, CompletionRequest):
        if body.best_of not in (None, body.n):
            raise bad_request("best_of is not supported (only best_of equal to n)", "best_of")
        return
    if body.modalities not in (None, ["text"]):
        raise bad_request("modalities is not supported (only ['text'])", "modalities")
    if body.function_call not in (None, "none", "auto"):
        raise bad_request("function_call is deprecated: send tools and tool_choice", "function_call")


def check_choices(num_prompts: int, n: int, max_choices: int) -> None:
    """Each choice (prompts x n) takes a sequence slot and KV blocks: `max_choices` (the setting
    max_choices_per_request, below --max-num-seqs) keeps one request from taking the whole batch."""
    if num_prompts * n > max_choices:
        what = f"{num_prompts} prompts x n={n}" if num_prompts > 1 else f"n={n}"
        raise bad_request(
            f"{what} choices: at most {max_choices} choices a request", "prompt" if num_prompts > 1 else "n"
        )


def truncate_prompts(prompts: list[list[int]], keep: int | None, max_model_len: int) -> list[list[int]]:
    """vLLM's truncate_prompt_tokens: each prompt's last `keep` tokens (-1: as many as the context
    holds)."""
    if keep is None:
        return prompts
    if keep == -1:
        keep = max_model_len
    if keep < 1:
        raise bad_request("truncate_prompt_tokens must be at least 1 (or -1)", "truncate_prompt_tokens")
    return [prompt[-keep:] for prompt in prompts]


def bad_words_token_ids(words: list[str], tokenizer) -> list[list[int]]:
    """vLLM's bad_words: the tokens of each word, alone and after a space (a word inside the text), the
    second only when the space makes other tokens of the same count."""
    banned = []
    for word in words:
        alone = tokenizer.encode(word.lstrip(), add_special_tokens=False)
        spaced = tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
        if not alone:
            raise bad_request(f"bad_words has a word without tokens: {word!r}", "bad_words")
        banned.append(alone)
        if spaced and spaced[0] != alone[0] and len(spaced) == len(alone):
            banned.append(spaced)
    return banned


def completion_prompts(
    prompt: str | list, n: int, engine: AsyncEngine, max_choices: int, add_special_tokens: bool = True
) -> list[list[int]]:
    """The token ids of each prompt: OpenAI's `prompt` is one string or token-id list, or a list of
    them (a batch, answered with `n` choices per prompt); at most `max_choices` choices in all."""
    batch = prompt if prompt and isinstance(prompt, list) and isinstance(prompt[0], str | list) else [prompt]
    check_choices(len(batch), n, max_choices)
    if isinstance(batch[0], str):  # the schema allows no mix of strings and token lists
        return engine.tokenizer(batch, add_special_tokens=add_special_tokens).input_ids
    return [list(one) for one in batch]


def echo_texts(prompt: str | list, prompts: list[list[int]], engine: AsyncEngine) -> list[str]:
    """What `echo` repeats of each prompt: its text as sent, or its token ids decoded."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt[0], str):
        return prompt
    return engine.tokenizer.batch_decode(prompts)


# apply_chat_template's parameters other than add_generation_prompt: not template variables.
_RESERVED_TEMPLATE_OPTIONS = frozenset(
    {
        "conversation", "tools", "documents", "chat_template", "continue_final_message", "tokenize",
        "padding", "truncation", "max_length", "return_tensors", "return_dict",
        "return_assistant_tokens_mask", "tokenizer_kwargs",
    }
)  # fmt: skip


def chat_prompt(
    messages: list[ChatMessage],
    engine: AsyncEngine,
    template: ChatTemplateFields,
    parser: ToolParser,
    add_special_tokens: bool = False,
    tools: list[Tool] | None = None,
) -> list[int]:
    """The token ids of chat messages (and tools) rendered by the model's chat template as the request's
    template fields say (by default with the assistant turn opened: what chat completions generate
    from), with no special tokens beyond those the template writes. chat_template_kwargs are the
    template's own variables; apply_chat_template's options are not among them (a request's template
    source or tools would bypass what this server checks). `parser` writes tool calls and tools for a
    template that cannot (server/api/tools.py)."""
    kwargs = template.chat_template_kwargs or {}
    if reserved := sorted(kwargs.keys() & _RESERVED_TEMPLATE_OPTIONS):
        raise bad_request(f"chat_template_kwargs may not set {', '.join(reserved)}", "chat_template_kwargs")
    options = {"add_generation_prompt": template.add_generation_prompt, **kwargs}
    if template.continue_final_message and options["add_generation_prompt"]:
        raise bad_request(
            "continue_final_message continues the last message: set add_generation_prompt to false",
            "continue_final_message",
        )
    turns, tool_specs = template_inputs(messages, tools, parser, engine.tokenizer.chat_template)
    if tool_specs:
        options["tools"] = tool_specs
    try:
        text = engine.tokenizer.apply_chat_template(
            turns, **options, continue_final_message=template.continue_final_message, tokenize=False
        )
    except Exception as e:  # the template is the model's Jinja code: any error is about these messages
        raise bad_request(f"the chat template rejected these messages: {e}", "messages") from e
    return engine.tokenizer(text, add_special_tokens=add_special_tokens).input_ids


def chat_echo(body: ChatRequest) -> str | None:
    """vLLM's chat echo: the last message's content, when the answer continues a turn of its role (the
    assistant's with add_generation_prompt, else the last message's own): the answer starts with it."""
    if not body.echo:
        return None
    last = body.messages[-1]
    return last.text() if not body.add_generation_prompt or last.role == "assistant" else ""
