"""The FastAPI app: OpenAI routes over an `AsyncEngine`, vLLM's /tokenize and /detokenize, /health,
/metrics. `create_app(settings, engine)` may get the engine later (`ServerState.engine`): until then the
model's routes and /health answer 503. Requests are validated and tokenized here; server/serving.py turns
the engine's outputs into answers."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.types import Receive, Scope, Send

from server import metrics
from server.errors import APIError, bad_request, install_error_handlers
from server.middleware import STATUS_CLIENT_GONE, RequestMiddleware
from server.protocol import (
    ChatMessage,
    ChatRequest,
    ChatResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from server.renderers import ChatRenderer, CompletionRenderer, Renderer
from server.sampling_params import SamplingParams
from server.serving import Admission, Job, RequestTracker, collect_response, stream_events
from server.settings import Settings

if TYPE_CHECKING:
    from server.engine import AsyncEngine

_PARAM_IN_MESSAGE = re.compile(r"'(\w+)'")
# Most choices (prompts x n) of one completion request: its prompts are tokenized and checked on the event
# loop before any engine work, and each choice takes a sequence slot and KV blocks. 256, the default
# --max-num-seqs, lets one request fill a batch but not flood the queue.
MAX_CHOICES = 256


@dataclass
class ServerState:
    settings: Settings
    engine: AsyncEngine | None = None  # None while the model loads
    load_error: str | None = None
    draining: bool = False  # SIGTERM received: no new requests
    started: int = field(default_factory=lambda: int(time.time()))
    admission: Admission = field(init=False)

    def __post_init__(self) -> None:
        self.admission = Admission(self.settings.max_queued_requests)

    def unavailable(self) -> str | None:
        """Why the server cannot take requests now (None when it can)."""
        if self.load_error:
            return f"the model failed to load: {self.load_error}"
        if self.engine is None:
            return "the model is still loading"
        if self.draining:
            return "the server is shutting down"
        stats = self.engine.stats()
        if not stats.loop_alive:
            return f"the engine loop died: {stats.last_error}"
        return None


def _state(request: Request) -> ServerState:
    return request.app.state.server


def _ready_engine(request: Request, model: str | None) -> AsyncEngine:
    state = _state(request)
    if (reason := state.unavailable()) is not None:
        raise APIError(503, reason, code="unavailable", headers={"Retry-After": "5"})
    assert state.engine is not None
    if model is not None and model != state.engine.model_name:
        raise APIError(404, f"model '{model}' does not exist", param="model", code="model_not_found")
    return state.engine


def _sampling_params(
    request: CompletionRequest | ChatRequest,
    max_tokens: int,
    logprobs: int | None,
    vocab: int,
    max_tokens_name: str = "max_tokens",
    echo: bool = False,
) -> SamplingParams:
    """SamplingParams from the request; its ValueError names the parameter, which we pass on (under
    the name the client used for max_tokens). With `echo` the prompt is scored too (when `logprobs`
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
    stop_ids = request.stop_token_ids or []
    _check_token_ids(stop_ids, vocab, "stop_token_ids")
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
    except ValueError as e:
        match = _PARAM_IN_MESSAGE.search(str(e))
        param = match.group(1) if match else None
        raise bad_request(str(e), max_tokens_name if param == "max_tokens" else param) from e


def _check_token_ids(ids: list[int], vocab: int, param: str, which: str | None = None) -> None:
    """Token ids from the client index the embedding and the tokenizer's vocabulary: outside it is a 400
    (`which` names them in the message, by default `param`)."""
    if any(not 0 <= t < vocab for t in ids):
        raise bad_request(f"{which or param} has token ids outside [0, {vocab})", param)


def _logit_bias(bias: dict[str, float], vocab: int) -> dict[int, float]:
    """OpenAI's logit_bias keys are token ids written as JSON strings."""
    parsed = {}
    for key, value in bias.items():
        # (the length check first: int() of a digit string thousands long raises, it does not answer)
        if not (key.isascii() and key.isdigit() and len(key) <= 12 and int(key) < vocab):
            raise bad_request(f"logit_bias keys must be token ids in [0, {vocab}), got {key!r}", "logit_bias")
        parsed[int(key)] = value
    return parsed


def _reject_unsupported(body: CompletionRequest | ChatRequest) -> None:
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


def _check_context(
    prompt_len: int,
    max_tokens: int,
    max_model_len: int,
    prompt_param: str,
    max_tokens_name: str = "max_tokens",
    which: str = "the prompt",
) -> None:
    if prompt_len >= max_model_len:
        raise bad_request(
            f"{which} is {prompt_len} tokens; the context holds {max_model_len} with the output",
            prompt_param,
        )
    if prompt_len + max_tokens > max_model_len:
        raise bad_request(
            f"{which} ({prompt_len} tokens) + {max_tokens_name} ({max_tokens}) > context ({max_model_len})",
            max_tokens_name,
        )


def _completion_prompts(prompt: str | list, n: int, engine: AsyncEngine) -> list[list[int]]:
    """The token ids of each prompt: OpenAI's `prompt` is one string or token-id list, or a list of
    them (a batch, answered with `n` choices per prompt)."""
    batch = prompt if prompt and isinstance(prompt, list) and isinstance(prompt[0], str | list) else [prompt]
    if len(batch) * n > MAX_CHOICES:
        raise bad_request(
            f"{len(batch)} prompts x n={n} choices: at most {MAX_CHOICES} choices a request", "prompt"
        )
    vocab = len(engine.tokenizer)
    for i, one in enumerate(batch):
        if not one:
            raise bad_request(f"{_prompt_name(i, len(batch))} is empty", "prompt")
        if isinstance(one, list):
            _check_token_ids(one, vocab, "prompt", _prompt_name(i, len(batch)))
    if isinstance(batch[0], str):  # the schema allows no mix of strings and token lists
        return engine.tokenizer(batch).input_ids
    return [list(one) for one in batch]


def _echo_texts(prompt: str | list, prompts: list[list[int]], engine: AsyncEngine) -> list[str]:
    """What `echo` repeats of each prompt: its text as sent, or its token ids decoded."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt[0], str):
        return prompt
    return engine.tokenizer.batch_decode(prompts)


def _prompt_name(index: int, count: int) -> str:
    """How errors name a prompt: by its position when the request has several."""
    return "the prompt" if count == 1 else f"prompt[{index}]"


# apply_chat_template's parameters other than add_generation_prompt: not template variables.
_RESERVED_TEMPLATE_OPTIONS = frozenset(
    {
        "conversation", "tools", "documents", "chat_template", "continue_final_message", "tokenize",
        "padding", "truncation", "max_length", "return_tensors", "return_dict",
        "return_assistant_tokens_mask", "tokenizer_kwargs",
    }
)  # fmt: skip


def _chat_prompt(
    messages: list[ChatMessage],
    engine: AsyncEngine,
    add_generation_prompt: bool = True,
    add_special_tokens: bool = False,
    template_kwargs: dict[str, Any] | None = None,
) -> list[int]:
    """The token ids of chat messages rendered by the model's chat template, by default with the
    assistant turn opened (what chat completions generate from) and no special tokens beyond those the
    template writes. `template_kwargs` (the request's chat_template_kwargs) are the template's own
    variables; apply_chat_template's options are not among them (a request's template source or tools
    would bypass what this server checks)."""
    template_kwargs = template_kwargs or {}
    if reserved := sorted(template_kwargs.keys() & _RESERVED_TEMPLATE_OPTIONS):
        raise bad_request(f"chat_template_kwargs may not set {', '.join(reserved)}", "chat_template_kwargs")
    turns = [{"role": m.role, "content": m.text()} for m in messages]
    try:
        text = engine.tokenizer.apply_chat_template(
            turns, **{"add_generation_prompt": add_generation_prompt, **template_kwargs}, tokenize=False
        )
    except Exception as e:  # the template is the model's Jinja code: any error is about these messages
        raise bad_request(f"the chat template rejected these messages: {e}", "messages") from e
    return engine.tokenizer(text, add_special_tokens=add_special_tokens).input_ids


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _serve(
    request: Request,
    engine: AsyncEngine,
    body: CompletionRequest | ChatRequest,
    prompts: list[list[int]],
    params: SamplingParams,
    renderer: Renderer,
    echo: list[str] | None = None,
) -> Response:
    """Admit, start one engine request per prompt and answer them as one (stream or whole body). A
    batch of prompts takes one place in the admission queue, as one prompt with n choices does.
    `echo`: the text of each prompt, which its choices start with."""
    state = _state(request)
    if not state.admission.try_enter():
        raise APIError(
            429, "too many queued requests, retry later", code="queue_full", headers={"Retry-After": "1"}
        )
    request_id, arrival = request.state.request_id, request.state.arrival
    tracker = RequestTracker(arrival, state.admission, request.state.log_fields)
    prefix = f"{request_id}-{uuid.uuid4().hex[:8]}"
    by_engine_id = {f"{prefix}-{i}": prompt_ids for i, prompt_ids in enumerate(prompts)}
    try:
        outputs = engine.add_requests(by_engine_id, params, arrival_time=arrival)
    except Exception as e:
        tracker.discard()  # it never started
        if isinstance(e, ValueError):  # the engine's message for the client
            raise bad_request(str(e)) from e
        if state.draining or not engine.stats().loop_alive:  # the engine stopped admitting meanwhile
            raise APIError(503, str(e), code="unavailable") from e
        raise
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    job = Job(
        engine, list(by_engine_id), request_id, engine.model_name, params.n, outputs, tracker, include_usage,
        echo,
    )  # fmt: skip
    if body.stream:
        events = stream_events(job, renderer, state.settings.sse_heartbeat_seconds)
        return _SSEResponse(job, events)
    try:
        answer = await collect_response(job, renderer, _wait_disconnect(request))
    finally:
        job.abort()  # no-op if it finished; else the client went away or we failed: free their blocks
    if answer is None:
        return Response(status_code=STATUS_CLIENT_GONE)
    return Response(answer.model_dump_json(), media_type="application/json")


class _SSEResponse(StreamingResponse):
    """However the stream ends (done, client gone, error), closes the event generator at once and
    aborts the request if it has not finished, also when the generator never started."""

    def __init__(self, job: Job, events: AsyncIterator[str]) -> None:
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.job = job

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()
            self.job.abort()


router = APIRouter()


def _error_responses(*statuses: int) -> dict:
    """The errors /docs shows for a route, all in OpenAI's shape."""
    return {status: {"model": ErrorResponse} for status in statuses}


def _responses(body: type) -> dict:
    """What /docs shows for a generation route: the JSON body, the SSE alternative, the errors."""
    sse = {"text/event-stream": {"schema": {"type": "string", "description": "SSE chunks, then [DONE]"}}}
    return {200: {"model": body, "content": sse}, **_error_responses(400, 401, 404, 413, 429, 500, 503)}


def _openapi_without_422(app: FastAPI):
    """FastAPI documents a 422 for every body; ours answer 400 (ErrorResponse) instead."""

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = FastAPI.openapi(app)
            for path in schema["paths"].values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
            for unused in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(unused, None)
            app.openapi_schema = schema
        return app.openapi_schema

    return openapi


@router.post("/v1/completions", response_model=None, responses=_responses(CompletionResponse))
async def completions(request: Request, body: CompletionRequest):
    engine = _ready_engine(request, body.model)
    _reject_unsupported(body)
    max_tokens = 16 if body.max_tokens is None else body.max_tokens
    params = _sampling_params(body, max_tokens, body.logprobs, len(engine.tokenizer), echo=body.echo)
    prompts = _completion_prompts(body.prompt, params.n, engine)
    for i, prompt_ids in enumerate(prompts):
        which = _prompt_name(i, len(prompts))
        _check_context(len(prompt_ids), max_tokens, engine.max_model_len, "prompt", which=which)
    echo = _echo_texts(body.prompt, prompts, engine) if body.echo else None
    return await _serve(request, engine, body, prompts, params, CompletionRenderer(), echo)


@router.post("/v1/chat/completions", response_model=None, responses=_responses(ChatResponse))
async def chat_completions(request: Request, body: ChatRequest):
    engine = _ready_engine(request, body.model)
    _reject_unsupported(body)
    if body.top_logprobs is not None and not body.logprobs:
        raise bad_request("top_logprobs needs logprobs=true", "top_logprobs")
    prompt_ids = _chat_prompt(body.messages, engine, template_kwargs=body.chat_template_kwargs)
    name = "max_tokens" if body.max_completion_tokens is None else "max_completion_tokens"
    max_tokens = body.max_tokens if body.max_completion_tokens is None else body.max_completion_tokens
    if max_tokens is None:  # OpenAI's default for chat: up to the end of the context
        max_tokens = max(1, engine.max_model_len - len(prompt_ids))
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    params = _sampling_params(body, max_tokens, logprobs, len(engine.tokenizer), name)
    _check_context(len(prompt_ids), max_tokens, engine.max_model_len, "messages", name)
    return await _serve(request, engine, body, [prompt_ids], params, ChatRenderer())


# vLLM's routes for clients that check a prompt against the context before they send it. No engine work:
# the tokenizer runs on the event loop, as it does for the generation routes, and its input is bounded the
# same way, by --max-request-body-bytes (1 MiB, the default, tokenizes in under a second on one CPU core).
@router.post("/tokenize", responses=_error_responses(400, 401, 404, 413, 500, 503))
async def tokenize(request: Request, body: TokenizeRequest) -> TokenizeResponse:
    engine = _ready_engine(request, body.model)
    if (body.prompt is None) == (body.messages is None):
        raise bad_request("send either prompt or messages", "prompt")
    # vLLM's defaults: a prompt gets the special tokens /v1/completions adds to it; messages only those
    # their chat template writes, as /v1/chat/completions renders them.
    special = body.messages is None if body.add_special_tokens is None else body.add_special_tokens
    if body.messages is not None:
        tokens = _chat_prompt(
            body.messages, engine, body.add_generation_prompt, special, body.chat_template_kwargs
        )
    else:
        tokens = engine.tokenizer(body.prompt, add_special_tokens=special).input_ids
    return TokenizeResponse(count=len(tokens), max_model_len=engine.max_model_len, tokens=tokens)


@router.post("/detokenize", responses=_error_responses(400, 401, 404, 413, 500, 503))
async def detokenize(request: Request, body: DetokenizeRequest) -> DetokenizeResponse:
    engine = _ready_engine(request, body.model)
    _check_token_ids(body.tokens, len(engine.tokenizer), "tokens")
    return DetokenizeResponse(prompt=engine.tokenizer.decode(body.tokens))


@router.get("/v1/models")
async def models(request: Request) -> ModelList:
    engine = _ready_engine(request, None)
    card = ModelCard(
        id=engine.model_name, created=_state(request).started, max_model_len=engine.max_model_len
    )
    return ModelList(data=[card])


@router.get("/health")
async def health(request: Request) -> dict:
    if (reason := _state(request).unavailable()) is not None:
        raise APIError(503, reason, code="unavailable")
    return {"status": "ok"}


@router.get("/metrics")
async def prometheus_metrics(request: Request) -> Response:
    engine = _state(request).engine
    if engine is not None:  # gauges as of now, also when the engine loop is idle
        stats = engine.stats()
        metrics.num_requests_running.set(stats.num_running)
        metrics.num_requests_waiting.set(stats.num_waiting)
        metrics.kv_cache_usage.set(stats.kv_usage)
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


def create_app(settings: Settings, engine: AsyncEngine | None = None) -> FastAPI:
    """The app; `app.state.server` (ServerState) holds the engine, which may be set later."""
    app = FastAPI(title="leanserve", version="0.1.0")
    app.state.server = ServerState(settings, engine)
    app.include_router(router)
    install_error_handlers(app)
    app.openapi = _openapi_without_422(app)
    app.add_middleware(
        RequestMiddleware, api_key=settings.api_key, max_body_bytes=settings.max_request_body_bytes
    )
    return app
