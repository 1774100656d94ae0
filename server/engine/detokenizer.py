"""Incremental detokenization of one output sequence: turns new token ids into text that is safe to stream
(never half a UTF-8 character, never a piece of a stop string) and detects stop strings across tokens."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from tokenizers.decoders import DecodeStream

# Prompt tokens decoded with the first output tokens so that tokenizers that treat the start of a
# text specially (SentencePiece drops a leading space) decode the output as it reads in context.
_PROMPT_CONTEXT_TOKENS = 5


@dataclass
class DetokenizedDelta:
    text: str  # new text safe to emit (no broken UTF-8, no possible stop-string prefix)
    stop_reason: str | None  # the stop string that matched (then stop, text excludes it)


class IncrementalDetokenizer:
    """Decodes a growing token sequence with the tokenizers library's `DecodeStream`, which re-decodes a
    small window of recent tokens per step and returns text only once it is made of complete characters
    (it holds back a window that decodes to a trailing U+FFFD: bytes of a character still incomplete).
    The last few prompt tokens prime the stream, so that tokenizers that treat the start of a text
    specially (SentencePiece drops a leading space) decode the output as it reads in context.

    Decoded text then passes the stop-string filter: a match truncates the text there (the stop string
    is never returned) and the text that ends in a prefix of some stop string is held back until the
    next tokens decide. Invariant: every stop-string match starts at or after the emitted text's end.
    Each stop string has a Knuth-Morris-Pratt matcher fed only the newly decoded characters, so a step
    costs O(new text x stop strings) whatever their length: the matchers' states are both the matches and
    the held-back length (the longest partial match, at most the longest stop string minus one).
    """

    def __init__(
        self,
        tokenizer,
        prompt_token_ids: list[int],
        stop: list[str],
        skip_special_tokens: bool = True,
        min_tokens: int = 0,
        include_stop: bool = False,
    ):
        self._backend = tokenizer.backend_tokenizer  # the Rust tokenizer behind a transformers one
        self._skip_special_tokens = skip_special_tokens
        self._stop = list(stop)
        self._failure = [_failure_table(s) for s in self._stop]
        self._matched = [0] * len(self._stop)  # per stop string: length of its prefix the text ends with
        self._fed = 0  # characters of _text the matchers have seen
        self._include_stop = include_stop  # vLLM's include_stop_str_in_output: the text keeps the match
        # Stop strings are looked for only in text decoded once this many tokens were added (vLLM's
        # min_tokens); the text before is emitted as it comes.
        self._tokens_before_stop = min_tokens
        context = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        self._stream = DecodeStream(context, skip_special_tokens=skip_special_tokens)
        # For flush: the tokens of the last decoded chunk (context) and those the stream holds back.
        self._context_ids, self._held_ids = context, []
        self._text = ""  # decoded output text made of complete characters, cut at a stop string
        self._emitted = 0  # characters of _text returned to the caller so far
        self._stop_reason: str | None = None

    @property
    def output_text(self) -> str:
        """The text returned so far by `add_tokens` and `flush`."""
        return self._text[: self._emitted]

    def add_tokens(self, token_ids: list[int]) -> DetokenizedDelta:
        if self._stop_reason is not None:
            return DetokenizedDelta("", self._stop_reason)
        for token_id in token_ids:
            self._held_ids.append(token_id)
            chunk = self._stream.step(self._backend, token_id)
            if chunk is not None:
                self._text += chunk
                self._context_ids, self._held_ids = self._held_ids, []
        self._tokens_before_stop -= len(token_ids)
        if self._tokens_before_stop > 0:
            self._fed = len(self._text)  # no stop string starts in text decoded before min_tokens
            return DetokenizedDelta(self._take(len(self._text)), None)
        if self._cut_at_stop():
            return DetokenizedDelta(self._take(len(self._text)), self._stop_reason)
        return DetokenizedDelta(self._take(len(self._text) - max(self._matched, default=0)), None)

    def flush(self) -> str:
        """At a finish other than a stop string (length, EOS, stop token): everything held back, including
        an incomplete character at the very end (as U+FFFD), still cut before any stop string."""
        if self._stop_reason is not None:
            return ""
        if self._held_ids:
            context = self._decode(self._context_ids)
            self._text += self._decode(self._context_ids + self._held_ids)[len(context) :]
            self._context_ids, self._held_ids = self._held_ids, []
        if self._tokens_before_stop <= 0:
            self._cut_at_stop()
        return self._take(len(self._text))

    def _decode(self, token_ids: list[int]) -> str:
        return self._backend.decode(token_ids, skip_special_tokens=self._skip_special_tokens)

    def _take(self, end: int) -> str:
        """Returns the not yet emitted text up to `end` and marks it emitted."""
        delta = self._text[self._emitted : end]
        self._emitted = max(self._emitted, end)
        return delta

    def _cut_at_stop(self) -> bool:
        """Feeds the text decoded since the last call to every stop string's matcher; truncates the text at
        the earliest-starting match, if any, and records which stop string it was."""
        text, start = self._text, self._fed
        self._fed = len(text)
        best: tuple[int, str] | None = None
        for i, stop in enumerate(self._stop):
            failure, q = self._failure[i], self._matched[i]
            for pos in range(start, len(text)):
                char = text[pos]
                while q and stop[q] != char:
                    q = failure[q - 1]
                if stop[q] == char:
                    q += 1
                if q == len(stop):
                    match = pos + 1 - len(stop)
                    if best is None or match < best[0]:
                        best = (match, stop)
                    break
            self._matched[i] = q
        if best is None:
            return False
        pos, self._stop_reason = best
        self._text = self._text[: pos + len(self._stop_reason) if self._include_stop else pos]
        return True


@lru_cache(maxsize=256)
def _failure_table(stop: str) -> tuple[int, ...]:
    """KMP failure function: entry i is the length of the longest proper prefix of stop[: i + 1] that is
    also its suffix (shared by the sequences of a request, whose stop strings are the same)."""
    table = [0] * len(stop)
    k = 0
    for i in range(1, len(stop)):
        while k and stop[i] != stop[k]:
            k = table[k - 1]
        if stop[i] == stop[k]:
            k += 1
        table[i] = k
    return tuple(table)
