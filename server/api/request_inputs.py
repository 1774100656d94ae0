"""From an OpenAI request body to what the engine takes: the token ids of its prompts (a completion's
prompt or batch, chat messages through the model's chat template) and its SamplingParams; every input
that cannot be turned into them is a 400 naming its parameter here. Whether the prompts fit the model and
its cache is the engine's to say (`LLMEngine.validate`, through `AsyncEngine.add_requests`), also before
any engine work."""

from __future__ import annotations

from typing import TYPE_CHECKING

from leanserve.server.api.errors import bad_request
from leanserve.server.api.protocol import ChatMessage, ChatRequest, ChatTemplateFields, CompletionRequest
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
    vocab: int,
    max_tokens_name: str = "max_tokens",
    echo: bool = False,
) -> SamplingParams:
    """SamplingParams from the request; its InvalidParameter names the parameter, which we pass on
    (under the name the client used for max_tokens). With `echo` the prompt is scored too (when `logprobs`
    asks) and max_tokens may be 0: the answer is then the prompt alone."""
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
    try:
        return SamplingParams(
            n=request.n,
            max_tokens=max_tokens,
            stop=stop,
            stop_token_ids=stop_ids,
            ignore_eos=request.ignore_eos,
            min_tokens=request.min_tokens,
            logprobs=logprobs,
            prompt_logprobs=logprobs if echo else None,
            logit_bias=logit_bias,
            **given,
        )
    except InvalidParameter as e:
        raise bad_request(e.message, max_tokens_name if e.param == "max_tokens" else e.param) from e


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


def reject_unsupported(body: CompletionRequest | ChatRequest) -> None:
    """OpenAI options this server does not implement are a 400 unless they ask for the default."""
    if isinstance(body, CompletionRequest):
        if body.suffix:
            raise bad_request("suffix is not supported", "suffix")
        if body.best_of not in (None, body.n):
            raise bad_request("best_of is not supported (only best_of equal to n)", "best_of")
        return
    if body.response_format is not None and body.response_format.get("type") != "text":
        raise bad_request("response_format is not supported (only {'type': 'text'})", "response_format")
    for name in ("tools", "functions"):
        if getattr(body, name):
            raise bad_request(f"{name} are not supported (no tool calling)", name)
    for name in ("tool_choice", "function_call"):
        if getattr(body, name) not in (None, "none", "auto"):
            raise bad_request(f"{name} is not supported (no tool calling)", name)


def check_choices(num_prompts: int, n: int, max_choices: int) -> None:
    """Each choice (prompts x n) takes a sequence slot and KV blocks: `max_choices` (the setting
    max_choices_per_request, below --max-num-seqs) keeps one request from taking the whole batch."""
    if num_prompts * n > max_choices:
        what = f"{num_prompts} prompts x n={n}" if num_prompts > 1 else f"n={n}"
        raise bad_request(
            f"{what} choices: at most {max_choices} choices a request", "prompt" if num_prompts > 1 else "n"
        )


def completion_prompts(prompt: str | list, n: int, engine: AsyncEngine, max_choices: int) -> list[list[int]]:
    """The token ids of each prompt: OpenAI's `prompt` is one string or token-id list, or a list of
    them (a batch, answered with `n` choices per prompt); at most `max_choices` choices in all."""
    batch = prompt if prompt and isinstance(prompt, list) and isinstance(prompt[0], str | list) else [prompt]
    check_choices(len(batch), n, max_choices)
    if isinstance(batch[0], str):  # the schema allows no mix of strings and token lists
        return engine.tokenizer(batch).input_ids
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
    add_special_tokens: bool = False,
) -> list[int]:
    """The token ids of chat messages rendered by the model's chat template as the request's template
    fields say (by default with the assistant turn opened: what chat completions generate from), with
    no special tokens beyond those the template writes. chat_template_kwargs are the template's own
    variables; apply_chat_template's options are not among them (a request's template source or tools
    would bypass what this server checks)."""
    kwargs = template.chat_template_kwargs or {}
    if reserved := sorted(kwargs.keys() & _RESERVED_TEMPLATE_OPTIONS):
        raise bad_request(f"chat_template_kwargs may not set {', '.join(reserved)}", "chat_template_kwargs")
    options = {"add_generation_prompt": template.add_generation_prompt, **kwargs}
    if template.continue_final_message and options["add_generation_prompt"]:
        raise bad_request(
            "continue_final_message continues the last message: set add_generation_prompt to false",
            "continue_final_message",
        )
    turns = [{"role": m.role, "content": m.text()} for m in messages]
    try:
        text = engine.tokenizer.apply_chat_template(
            turns, **options, continue_final_message=template.continue_final_message, tokenize=False
        )
    except Exception as e:  # the template is the model's Jinja code: any error is about these messages
        raise bad_request(f"the chat template rejected these messages: {e}", "messages") from e
    return engine.tokenizer(text, add_special_tokens=add_special_tokens).input_ids
