"""OpenAI bodies from engine outputs: a completion or chat renderer builds the stream chunk of one
sample's delta and the whole response from the accumulated samples, logprobs and usage included, and
for completions with echo puts each prompt (with its logprobs) before its choices' first text."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

from pydantic import BaseModel

from leanserve.server.api.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChoiceLogprobs,
    ChatDelta,
    ChatResponse,
    ChatStreamChoice,
    ChatStreamResponse,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    PromptTokensDetails,
    TopLogprob,
    Usage,
)
from leanserve.server.engine.outputs import RequestOutput, SampleDelta, TokenLogprob


def usage_of(out: RequestOutput) -> Usage:
    return Usage(
        prompt_tokens=out.prompt_tokens,
        completion_tokens=out.completion_tokens,
        total_tokens=out.prompt_tokens + out.completion_tokens,
        attention_ms=out.attention_seconds * 1e3,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=out.cached_prompt_tokens),
    )


@dataclass
class SampleTotal:
    """One choice of a non-streaming answer, accumulated over the engine's deltas."""

    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None

    def add(self, delta: SampleDelta) -> None:
        self.text.append(delta.text)
        if delta.logprobs is not None:
            self.logprobs = self.logprobs or []
            self.logprobs.extend(delta.logprobs)
        if delta.finish_reason is not None:
            self.finish_reason, self.stop_reason = delta.finish_reason, delta.stop_reason


def has_news(delta: SampleDelta) -> bool:
    """Whether a sample's delta is worth a stream chunk (text held back by the detokenizer still
    counts: the token arrived)."""
    return bool(delta.text or delta.token_ids or delta.finish_reason)


@dataclass
class Answer:
    """What the renderers know of the answer they build: its header, and the state that carries from one
    chunk to the next (echoed prompts, logprob text offsets). Choice `i * n + j` is sample j of prompt i."""

    response_id: str
    model: str
    n: int
    echo: list[str] | None = None  # completions with echo: the text of each prompt
    created: int = field(default_factory=lambda: int(time.time()))
    prompt_logprobs: dict[int, list[TokenLogprob]] = field(default_factory=dict)  # by prompt position
    text_offsets: dict[int, int] = field(default_factory=dict)  # completions logprobs, per choice
    echoed: set[int] = field(default_factory=set)  # choices whose prompt has been put before their text


class Renderer(Protocol):
    def opening(self, answer: Answer) -> list[BaseModel]: ...
    def chunk(self, answer: Answer, delta: SampleDelta) -> BaseModel: ...
    def usage_chunk(self, answer: Answer, usage: Usage) -> BaseModel: ...
    def response(self, answer: Answer, totals: dict[int, SampleTotal], usage: Usage) -> BaseModel: ...


def _with_echo(
    answer: Answer, index: int, text: str, logprobs: list[TokenLogprob] | None
) -> tuple[str, list[TokenLogprob] | None]:
    """A choice's first text and logprobs under echo get its prompt's text and logprobs in front (as
    vLLM streams it: the first chunk of each choice carries the prompt); anything else is unchanged."""
    if answer.echo is None or index in answer.echoed:
        return text, logprobs
    answer.echoed.add(index)
    prompt = index // answer.n
    if logprobs is not None:
        logprobs = answer.prompt_logprobs[prompt] + logprobs
    return answer.echo[prompt] + text, logprobs


def _completion_logprobs(
    answer: Answer, index: int, logprobs: list[TokenLogprob] | None
) -> CompletionLogprobs | None:
    if logprobs is None:
        return None
    result = CompletionLogprobs()
    offset = answer.text_offsets.get(index, 0)
    for lp in logprobs:
        result.tokens.append(lp.token)
        result.token_logprobs.append(lp.logprob)
        # The prompt's first token has no logprob and no alternatives: null, as OpenAI and vLLM send.
        result.top_logprobs.append(None if lp.logprob is None else {text: value for _, text, value in lp.top})
        result.text_offset.append(offset)
        offset += len(lp.token)
    answer.text_offsets[index] = offset
    return result


class CompletionRenderer:
    def opening(self, answer: Answer) -> list[BaseModel]:
        return []

    def chunk(self, answer: Answer, delta: SampleDelta) -> BaseModel:
        text, logprobs = _with_echo(answer, delta.index, delta.text, delta.logprobs)
        choice = CompletionChoice(
            index=delta.index,
            text=text,
            logprobs=_completion_logprobs(answer, delta.index, logprobs),
            finish_reason=delta.finish_reason,
            stop_reason=delta.stop_reason,
        )
        return CompletionResponse(
            id=answer.response_id, created=answer.created, model=answer.model, choices=[choice]
        )

    def usage_chunk(self, answer: Answer, usage: Usage) -> BaseModel:
        return CompletionResponse(
            id=answer.response_id, created=answer.created, model=answer.model, choices=[], usage=usage
        )

    def response(self, answer: Answer, totals: dict[int, SampleTotal], usage: Usage) -> BaseModel:
        choices = []
        for i, t in sorted(totals.items()):
            text, logprobs = _with_echo(answer, i, "".join(t.text), t.logprobs)
            choices.append(
                CompletionChoice(
                    index=i,
                    text=text,
                    logprobs=_completion_logprobs(answer, i, logprobs),
                    finish_reason=t.finish_reason,
                    stop_reason=t.stop_reason,
                )
            )
        return CompletionResponse(
            id=answer.response_id, created=answer.created, model=answer.model, choices=choices, usage=usage
        )


def _chat_logprobs(logprobs: list[TokenLogprob] | None) -> ChatChoiceLogprobs | None:
    if logprobs is None:
        return None
    return ChatChoiceLogprobs(
        content=[
            ChatTokenLogprob(
                token=lp.token,
                logprob=lp.logprob,
                bytes=list(lp.token.encode()),
                top_logprobs=[TopLogprob(token=t, logprob=v, bytes=list(t.encode())) for _, t, v in lp.top],
            )
            for lp in logprobs
        ]
    )


class ChatRenderer:
    def _chunk(
        self, answer: Answer, choices: list[ChatStreamChoice], usage: Usage | None = None
    ) -> BaseModel:
        return ChatStreamResponse(
            id=answer.response_id, created=answer.created, model=answer.model, choices=choices, usage=usage
        )

    def opening(self, answer: Answer) -> list[BaseModel]:
        return [
            self._chunk(answer, [ChatStreamChoice(index=i, delta=ChatDelta(role="assistant", content=""))])
            for i in range(answer.n)
        ]

    def chunk(self, answer: Answer, delta: SampleDelta) -> BaseModel:
        choice = ChatStreamChoice(
            index=delta.index,
            delta=ChatDelta(content=delta.text if delta.text or not delta.finish_reason else None),
            logprobs=_chat_logprobs(delta.logprobs),
            finish_reason=delta.finish_reason,
            stop_reason=delta.stop_reason,
        )
        return self._chunk(answer, [choice])

    def usage_chunk(self, answer: Answer, usage: Usage) -> BaseModel:
        return self._chunk(answer, [], usage)

    def response(self, answer: Answer, totals: dict[int, SampleTotal], usage: Usage) -> BaseModel:
        choices = [
            ChatChoice(
                index=i,
                message=AssistantMessage(content="".join(t.text)),
                logprobs=_chat_logprobs(t.logprobs),
                finish_reason=t.finish_reason,
                stop_reason=t.stop_reason,
            )
            for i, t in sorted(totals.items())
        ]
        return ChatResponse(
            id=answer.response_id, created=answer.created, model=answer.model, choices=choices, usage=usage
        )
