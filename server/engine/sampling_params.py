"""Per-request sampling parameters: what the HTTP layer hands the engine with each request."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# logit_bias limits as OpenAI's: a bias lies in [-100, 100] (-100 bans a token, +100 all but forces it),
# for at most this many tokens (the sampler rebuilds the bias on the device every step).
MAX_LOGIT_BIAS_TOKENS = 300
MAX_BAD_WORDS = 128  # each word is checked against the output every step


class InvalidParameter(ValueError):
    """A request the engine cannot run, because of the request parameter `param`: the HTTP layer answers
    400 with `message`, naming the parameter under the name its client used."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param
        self.message = message


@dataclass
class SamplingParams:
    """OpenAI/vLLM-style sampling knobs. Validates itself: a bad value raises InvalidParameter naming the
    parameter."""

    n: int = 1
    max_tokens: int = 16  # 0: the request ends after its prefill, no token (an echo of the prompt alone)
    min_tokens: int = 0  # no EOS or stop token id before this many output tokens (vLLM's min_tokens)
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 (or -1) disables
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: no logprobs; k >= 0: sampled token plus k top alternatives
    # None: no prompt logprobs; k >= 0: every prompt token after the first scored by the model given the
    # tokens before it, plus its k top alternatives (the request then skips the prefix cache: see scheduler)
    prompt_logprobs: int | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    include_stop_str_in_output: bool = False  # a matched stop string stays at the end of the text
    skip_special_tokens: bool = True  # special tokens are left out of the text
    allowed_token_ids: list[int] | None = None  # None: any token; else only these are sampled
    # vLLM's bad_words, tokenized: the last token of each list is banned after the others (at once for a
    # single token), in the output tokens.
    bad_words_token_ids: list[list[int]] = field(default_factory=list)
    # Structured outputs: an llguidance LLMatcher at its grammar's start (server/engine/grammar.py), which
    # each sequence copies; None: free text.
    grammar: Any = None

    def __post_init__(self) -> None:
        if self.top_k == -1:
            self.top_k = 0
        checks = {
            "n": 1 <= self.n <= 16,
            "max_tokens": self.max_tokens >= 0,
            "min_tokens": 0 <= self.min_tokens <= self.max_tokens,
            "temperature": 0.0 <= self.temperature <= 100.0,
            "top_p": 0.0 < self.top_p <= 1.0,
            "top_k": self.top_k >= 0,
            "min_p": 0.0 <= self.min_p <= 1.0,
            "presence_penalty": -2.0 <= self.presence_penalty <= 2.0,
            "frequency_penalty": -2.0 <= self.frequency_penalty <= 2.0,
            "repetition_penalty": 0.0 < self.repetition_penalty <= 10.0,
            "logprobs": self.logprobs is None or 0 <= self.logprobs <= 20,
            "prompt_logprobs": self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20,
            "stop": len(self.stop) <= 16 and all(isinstance(s, str) and s for s in self.stop),
            "allowed_token_ids": self.allowed_token_ids is None or len(self.allowed_token_ids) > 0,
            "bad_words": len(self.bad_words_token_ids) <= 2 * MAX_BAD_WORDS,
            "logit_bias": len(self.logit_bias) <= MAX_LOGIT_BIAS_TOKENS
            and all(-100.0 <= b <= 100.0 for b in self.logit_bias.values()),
        }
        for name, ok in checks.items():
            if not ok:
                value = getattr(self, name, None)
                raise InvalidParameter(name, f"invalid value for '{name}': {value!r}"[:200])

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def needs_output_tokens(self) -> bool:
        """Choosing the next token reads the output tokens on the host (a bad word of several tokens):
        the sequence's step must be complete before the next is scheduled."""
        return any(len(ids) > 1 for ids in self.bad_words_token_ids)
