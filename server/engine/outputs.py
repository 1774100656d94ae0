"""What the engine streams back for a request: one `RequestOutput` per step that produced something."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length", "abort", "error"]


@dataclass
class TokenLogprob:
    token_id: int
    token: str
    logprob: float | None  # None only for a prompt's first token, which nothing before it scores
    top: list[tuple[int, str, float]] = field(default_factory=list)  # (token id, text, logprob)


@dataclass
class SampleDelta:
    """New output of one of the request's `n` samples since the previous `RequestOutput`."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it


@dataclass
class RequestTimings:
    """Engine-side timestamps (time.monotonic()) of one request."""

    arrival: float
    first_scheduled: float | None = None
    first_token: float | None = None
    finished: float | None = None


@dataclass
class RequestOutput:
    request_id: str
    samples: list[SampleDelta]
    finished: bool
    prompt_tokens: int
    completion_tokens: int  # over all samples so far
    attention_seconds: float  # attention time attributed to this request so far (prefill + decode)
    timings: RequestTimings
    cached_prompt_tokens: int = 0
    error: str | None = None  # set with finished=True when the request failed inside the engine
    # SamplingParams.prompt_logprobs: one entry per prompt token, on the request's first output that has
    # samples (the one with every sample's first token, or its end when max_tokens is 0); None on others.
    prompt_logprobs: list[TokenLogprob] | None = None
