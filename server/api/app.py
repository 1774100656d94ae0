"""The FastAPI app: OpenAI routes over an `AsyncEngine`, vLLM's /tokenize and /detokenize, /health,
/metrics. `create_app(settings, engine)` may get the engine later (`ServerState.engine`): until then the
model's routes and /health answer 503. Request bodies become prompts and SamplingParams in
server/request_inputs.py; server/serving.py turns the engine's outputs into answers."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.types import Receive, Scope, Send

from leanserve.server.api import metrics
from leanserve.server.api.errors import APIError, bad_request, install_error_handlers, parameter_error
from leanserve.server.api.middleware import STATUS_CLIENT_GONE, RequestMiddleware
from leanserve.server.api.protocol import (
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
from leanserve.server.api.renderers import Answer, ChatRenderer, CompletionRenderer, Renderer
from leanserve.server.api.request_inputs import (
    chat_echo,
    chat_prompt,
    check_choices,
    check_token_ids,
    completion_prompts,
    echo_texts,
    reject_unsupported,
    sampling_params,
    truncate_prompts,
)
from leanserve.server.api.serving import Admission, Job, RequestTracker, collect_response, stream_events
from leanserve.server.api.settings import Settings
from leanserve.server.api.structured import compile_constraint
from leanserve.server.api.tool_parsers import ToolParser
from leanserve.server.api.tools import ToolMode, choose_parser, special_marker, tool_mode
from leanserve.server.engine.sampling_params import InvalidParameter, SamplingParams

if TYPE_CHECKING:
    from leanserve.server.engine.async_engine import AsyncEngine


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
        if self.engine is not None:
            self.attach(self.engine)

    def attach(self, engine: AsyncEngine) -> None:
        """Serve `engine` (loaded) and publish its metrics."""
        self.engine = engine
        metrics.publish(engine)

    @cached_property
    def tool_parser(self) -> ToolParser:
        """The tool-call parser of the served model's chat template (chosen at its first use)."""
        assert self.engine is not None
        return choose_parser(self.settings.tool_call_parser, self.engine.tokenizer.chat_template)

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
    params_named: dict[str, str] | None = None,
    echo: Callable[[], list[str]] | None = None,
    tools: ToolMode | None = None,
) -> Response:
    """Admit, start one engine request per prompt and answer them as one (stream or whole body). A
    batch of prompts takes one place in the admission queue, as one prompt with n choices does.
    `params_named`: what the client calls the engine's parameters ("prompt", "max_tokens") when it names
    them otherwise. `echo`: the text of each prompt, which its choices start with, made once the engine
    has checked the prompts (decoding token ids it would refuse can fail). `tools`: how a chat answer's
    tool calls are read."""
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
        if isinstance(e, InvalidParameter):  # the engine's message for the client
            raise parameter_error(e, params_named) from e
        if isinstance(e, ValueError):
            raise bad_request(str(e)) from e
        if state.draining or not engine.stats().loop_alive:  # the engine stopped admitting meanwhile
            raise APIError(503, str(e), code="unavailable") from e
        raise
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    answer = Answer(
        request_id,
        engine.model_name,
        params.n,
        echo() if echo is not None else None,
        tokens_as_ids=body.return_tokens_as_token_ids,
        with_prompt_logprobs=body.prompt_logprobs is not None,
        tools=tools,
    )
    job = Job(engine, list(by_engine_id), answer, outputs, tracker, include_usage)
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
    reject_unsupported(body)
    max_tokens = 16 if body.max_tokens is None else body.max_tokens
    params = sampling_params(body, max_tokens, body.logprobs, engine.tokenizer, echo=body.echo)
    max_choices = _state(request).settings.max_choices_per_request
    prompts = completion_prompts(body.prompt, params.n, engine, max_choices, body.add_special_tokens)
    params.grammar = await compile_constraint(body, engine)
    if body.truncate_prompt_tokens is not None:
        prompts = truncate_prompts(prompts, body.truncate_prompt_tokens, engine.max_model_len)
        echo = lambda: engine.tokenizer.batch_decode(prompts)
    else:
        echo = lambda: echo_texts(body.prompt, prompts, engine)
    renderer = CompletionRenderer()
    return await _serve(request, engine, body, prompts, params, renderer, echo=echo if body.echo else None)


@router.post("/v1/chat/completions", response_model=None, responses=_responses(ChatResponse))
async def chat_completions(request: Request, body: ChatRequest):
    engine = _ready_engine(request, body.model)
    reject_unsupported(body)
    if body.top_logprobs is not None and not body.logprobs:
        raise bad_request("top_logprobs needs logprobs=true", "top_logprobs")
    parser = _state(request).tool_parser
    tools = tool_mode(body, parser)
    prompt_ids = chat_prompt(body.messages, engine, body, parser, body.add_special_tokens, body.tools)
    (prompt_ids,) = truncate_prompts([prompt_ids], body.truncate_prompt_tokens, engine.max_model_len)
    name = "max_tokens" if body.max_completion_tokens is None else "max_completion_tokens"
    max_tokens = body.max_tokens if body.max_completion_tokens is None else body.max_completion_tokens
    if max_tokens is None:  # OpenAI's default for chat: up to the end of the context
        max_tokens = max(1, engine.max_model_len - len(prompt_ids))
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    params_named = {"prompt": "messages", "max_tokens": name, "logprobs": "top_logprobs"}
    params = sampling_params(body, max_tokens, logprobs, engine.tokenizer, params_named)
    if special_marker(tools, engine.tokenizer):
        params.skip_special_tokens = False
    check_choices(1, params.n, _state(request).settings.max_choices_per_request)
    params.grammar = await compile_constraint(body, engine)
    echo = chat_echo(body)
    return await _serve(
        request,
        engine,
        body,
        [prompt_ids],
        params,
        ChatRenderer(),
        params_named,
        (lambda: [echo]) if echo else None,
        tools,
    )


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
        tokens = chat_prompt(body.messages, engine, body, _state(request).tool_parser, special)
    else:
        tokens = engine.tokenizer(body.prompt, add_special_tokens=special).input_ids
    return TokenizeResponse(count=len(tokens), max_model_len=engine.max_model_len, tokens=tokens)


@router.post("/detokenize", responses=_error_responses(400, 401, 404, 413, 500, 503))
async def detokenize(request: Request, body: DetokenizeRequest) -> DetokenizeResponse:
    engine = _ready_engine(request, body.model)
    check_token_ids(body.tokens, len(engine.tokenizer), "tokens")
    return DetokenizeResponse(prompt=engine.tokenizer.decode(body.tokens))


@router.get("/v1/models")
async def models(request: Request) -> ModelList:
    engine = _ready_engine(request, None)
    card = ModelCard(
        id=engine.model_name, created=_state(request).started, max_model_len=engine.max_model_len
    )
    return ModelList(data=[card])


@router.get("/health")
@router.head("/health", include_in_schema=False)  # health checkers often send HEAD
async def health(request: Request) -> dict:
    if (reason := _state(request).unavailable()) is not None:
        raise APIError(503, reason, code="unavailable")
    return {"status": "ok"}


@router.get("/metrics")
@router.head("/metrics", include_in_schema=False)
async def prometheus_metrics(request: Request) -> Response:
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
