"""Request and sequence state inside the engine. A request with `n` samples owns up to `n` sequences:
sequence 0 computes the prompt, the other n-1 are forked from it when its prompt is done (sharing the
prompt's KV blocks) and sample their first token from the same logits."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

from leanserve.server.engine.outputs import FinishReason, RequestTimings, TokenLogprob
from leanserve.server.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    import numpy as np
    import torch
    from llguidance import LLMatcher

    from leanserve.server.engine.detokenizer import IncrementalDetokenizer

_seq_ids = itertools.count()


class SeqStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One sample: prompt + its output tokens. `num_computed_tokens` of `token_ids` have K/V in the
    cache; the step that brings it to len(token_ids) yields the logits of the next token."""

    request: Request
    index: int  # sample index within the request
    token_ids: list[int]
    detokenizer: IncrementalDetokenizer
    generator: torch.Generator | None = None
    grammar: LLMatcher | None = None  # structured outputs: the matcher of the tokens so far
    seq_id: int = field(default_factory=lambda: next(_seq_ids))
    num_computed_tokens: int = 0
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    # What was produced since the last RequestOutput (the engine drains these).
    new_token_ids: list[int] = field(default_factory=list)
    new_text: str = ""
    new_logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reported: bool = False

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.request.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    @property
    def scores_prompt(self) -> bool:
        """This sequence computes its request's prompt logprobs: sequence 0 (the siblings share its
        prompt) of a request that asks for them, until its prompt is done (no output token or placeholder
        yet; a recomputation after a later preemption scores nothing again)."""
        return (
            self.request.params.prompt_logprobs is not None
            and self.index == 0
            and len(self.token_ids) == self.num_prompt_tokens
        )

    @property
    def needs_fork(self) -> bool:
        """Sequence 0 of an n > 1 request whose siblings do not exist yet."""
        return self.index == 0 and len(self.request.sequences) < self.request.params.n


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    timings: RequestTimings
    sequences: list[Sequence] = field(default_factory=list)
    attention_seconds: float = 0.0
    cached_prompt_tokens: int = 0
    error: str | None = None
    # With prompt logprobs: an entry per prompt token scored so far (the first token's has no logprob),
    # handed to the first output that has samples (then None).
    prompt_logprobs: list[TokenLogprob] | None = None
    # allowed_token_ids as the sampler's bitmask row (built by the step pipeline at the first step)
    allowed_mask: np.ndarray | None = None

    @property
    def finished(self) -> bool:
        return len(self.sequences) == self.params.n and all(s.finished for s in self.sequences)

    @property
    def num_generated_tokens(self) -> int:
        return sum(len(s.token_ids) - len(self.prompt_token_ids) for s in self.sequences)
