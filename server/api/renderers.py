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
    PromptLogprob,
    PromptLogprobs,
    PromptTokensDetails,
    TopLogprob,
    Usage,
)
from leanserve.server.api.tools import ToolCallStream, ToolMode
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
    tokens_as_ids: bool = False  # vLLM's return_tokens_as_token_ids: logprob tokens as "token_id:{id}"
    with_prompt_logprobs: bool = False  # vLLM's prompt_logprobs go into the (non-streamed) response
    tools: ToolMode | None = None  # chat with tool calling: how each choice's calls are read
    tool_streams: dict[int, ToolCallStream] = field(default_factory=dict)  # per choice, when streaming

    def token(self, token_id: int, text: str) -> str:
        return f"token_id:{token_id}" if self.tokens_as_ids else text

    def prompt_logprobs_of(self, prompt: int) -> PromptLogprobs | None:
        """vLLM's prompt_logprobs of one prompt: null for its first token, then for each token its own
        entry and its alternatives' (rank: place among them, null when the token is not one)."""
        if not self.with_prompt_logprobs or prompt not in self.prompt_logprobs:
            return None
        result: PromptLogprobs = []
        for lp in self.prompt_logprobs[prompt]:
            if lp.logprob is None:
                result.append(None)
                continue
            entry = {
                str(t): PromptLogprob(logprob=v, rank=rank, decoded_token=self.token(t, text))
                for rank, (t, text, v) in enumerate(lp.top, start=1)
            }
            if str(lp.token_id) not in entry:
                entry = {
                    str(lp.token_id): PromptLogprob(
                        logprob=lp.logprob, decoded_token=self.token(lp.token_id, lp.token)
                    ),
                    **entry,
                }
            result.append(entry)
        return result


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
        result.tokens.append(answer.token(lp.token_id, lp.token))
        result.token_logprobs.append(lp.logprob)
        # The prompt's first token has no logprob and no alternatives: null, as OpenAI and vLLM send.
        top = None if lp.logprob is None else {answer.token(t, text): value for t, text, value in lp.top}
        result.top_logprobs.append(top)
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
                    prompt_logprobs=answer.prompt_logprobs_of(i // answer.n),
                )
            )
        return CompletionResponse(
            id=answer.response_id, created=answer.created, model=answer.model, choices=choices, usage=usage
        )


def _chat_logprobs(answer: Answer, logprobs: list[TokenLogprob] | None) -> ChatChoiceLogprobs | None:
    if logprobs is None:
        return None

    def top(token_id: int, text: str, value: float) -> TopLogprob:
        token = answer.token(token_id, text)
        return TopLogprob(token=token, logprob=value, bytes=list(token.encode()))

    return ChatChoiceLogprobs(
        content=[
            ChatTokenLogprob(
                **top(lp.token_id, lp.token, lp.logprob).model_dump(),
                top_logprobs=[top(*entry) for entry in lp.top],
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
            self._chunk(answer, [ChatStreamChoice(index=i, delta=ChatDelta(role="assistant", content=echo))])
            for i, echo in enumerate(_chat_echo(answer))
        ]

    def chunk(self, answer: Answer, delta: SampleDelta) -> BaseModel:
        content = delta.text if delta.text or not delta.finish_reason else None
        finish_reason, calls = delta.finish_reason, None
        if answer.tools is not None:
            stream = answer.tool_streams.setdefault(delta.index, ToolCallStream(answer.tools))
            content, calls = stream.feed(delta.text, delta.finish_reason is not None)
            finish_reason = _tool_finish(finish_reason, stream.has_calls)
        choice = ChatStreamChoice(
            index=delta.index,
            delta=ChatDelta(content=content, tool_calls=calls or None),
            logprobs=_chat_logprobs(answer, delta.logprobs),
            finish_reason=finish_reason,
            stop_reason=delta.stop_reason,
        )
        return self._chunk(answer, [choice])

    def usage_chunk(self, answer: Answer, usage: Usage) -> BaseModel:
        return self._chunk(answer, [], usage)

    def response(self, answer: Answer, totals: dict[int, SampleTotal], usage: Usage) -> BaseModel:
        echo = _chat_echo(answer)
        choices = []
        for i, t in sorted(totals.items()):
            message = AssistantMessage(content=echo[i] + "".join(t.text))
            if answer.tools is not None:
                content, calls = answer.tools.calls_of(message.content)
                message = AssistantMessage(content=content, tool_calls=answer.tools.outputs(calls))
            choices.append(
                ChatChoice(
                    index=i,
                    message=message,
                    logprobs=_chat_logprobs(answer, t.logprobs),
                    finish_reason=_tool_finish(t.finish_reason, bool(message.tool_calls)),
                    stop_reason=t.stop_reason,
                )
            )
        return ChatResponse(
            id=answer.response_id,
            created=answer.created,
            model=answer.model,
            choices=choices,
            usage=usage,
            prompt_logprobs=answer.prompt_logprobs_of(0),
        )


def _tool_finish(finish_reason: str | None, has_calls: bool) -> str | None:
    """OpenAI's finish_reason of a choice that ended on its tool calls."""
    return "tool_calls" if has_calls and finish_reason == "stop" else finish_reason


def _chat_echo(answer: Answer) -> list[str]:
    """What each choice of a chat answer starts with: vLLM's echo of the last message (one prompt)."""
    return [answer.echo[0] if answer.echo else ""] * answer.n
