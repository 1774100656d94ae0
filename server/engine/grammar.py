"""Structured outputs with llguidance: grammars (JSON schema, regex, choice, Lark / GBNF) compiled into
matchers, and the token bitmasks of a step's constrained rows.

Why llguidance (over xgrammar): one abi3 wheel for every Python, no CUDA or torch build dependency (the
mask is computed on the host in Rust, with the GIL released, and applied by the sampler on whatever
device the logits are on, so CPU and GPU serving take the same path), an Earley parser that takes any
context-free grammar (Lark syntax, GBNF converted), a broad JSON-schema coverage, and masks in well
under a millisecond per row for 128k vocabularies without ahead-of-time compilation per schema.

Each constrained sequence owns a matcher (a deep copy of its request's, which the HTTP layer compiled
and checked): the pipeline fills its row of the step's bitmask before sampling and the engine feeds it
the sampled token once the step is collected. With the async scheduler, a step with constrained rows
queues its forward pass before the previous step is collected, and fills the masks after that, while
the device runs the forward pass (`StepPipeline.launch`): the device does not wait for the host.
A preempted sequence keeps its matcher: its tokens are recomputed, not sampled again."""

from __future__ import annotations

import json
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Literal

import llguidance
import llguidance.hf
import numpy as np

from leanserve.server.engine.sampling_params import InvalidParameter

GrammarKind = Literal["json_schema", "regex", "choice", "grammar"]


class GrammarCompiler:
    """Compiles grammars for one tokenizer. The llguidance view of the tokenizer (about a second to
    build) is made at the first constrained request, not at startup; compiling may take long for huge
    grammars, so callers run it off the event loop and the engine thread."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: frozenset[int]) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        # llguidance refuses an EOS id past the tokenizer's vocabulary: a model's config paired with
        # another tokenizer (the GPU benchmarks run Llama-3-8B shapes with SmolLM2's) names one. The
        # tokenizer can never produce it, and the mask leaves ids past the tokenizer out anyway.
        self._eos = sorted(t for t in eos_token_ids if t < len(tokenizer))
        self._ll_tokenizer: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()

    def _ll(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._ll_tokenizer is None:
                self._ll_tokenizer = llguidance.hf.from_tokenizer(
                    self._tokenizer, n_vocab=self.vocab_size, eos_token=self._eos or None
                )
            return self._ll_tokenizer

    def compile(self, kind: GrammarKind, spec, param: str) -> llguidance.LLMatcher:
        """A matcher at the grammar's start. A grammar llguidance rejects is an InvalidParameter naming
        `param` (the request field it came from)."""
        try:
            if kind == "json_schema":
                # Compact JSON (vLLM's disable_any_whitespace): whitespace between tokens is where a
                # small model wanders off until max_tokens.
                grammar = llguidance.LLMatcher.grammar_from_json_schema(
                    spec if isinstance(spec, str) else json.dumps(spec),
                    overrides={"whitespace_flexible": False},
                )
            elif kind == "choice":
                grammar = llguidance.grammar_from("choice", json.dumps(spec))
            else:
                grammar = llguidance.grammar_from(kind, spec)
        except (ValueError, TypeError) as e:
            raise InvalidParameter(param, f"invalid {param}: {e}") from e
        matcher = llguidance.LLMatcher(self._ll(), grammar, log_level=0)
        if matcher.is_error():
            raise InvalidParameter(param, f"invalid {param}: {matcher.get_error()}"[:2000])
        return matcher


class MaskFiller:
    """Fills the bitmask rows of a step's constrained sequences in a background thread (llguidance
    releases the GIL), so that the work overlaps the model's forward pass."""

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._executor: llguidance.LLExecutor | None = None

    def submit(self, matchers: list[tuple[llguidance.LLMatcher, int]], table: np.ndarray) -> Future:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="grammar-masks")
            self._executor = llguidance.LLExecutor()
        return self._pool.submit(self._fill, matchers, table)

    def _fill(self, matchers: list[tuple[llguidance.LLMatcher, int]], table: np.ndarray) -> None:
        assert self._executor is not None
        row_bytes = table.shape[1] * 4
        self._executor.unsafe_compute_mask_ptr(matchers, table.ctypes.data, row_bytes, table.shape[0])


def accept_token(matcher: llguidance.LLMatcher, token_id: int) -> bool:
    """Advance the matcher by a sampled token. Returns whether the grammar is complete (it takes no token
    but EOS now, or the token broke it, which the mask makes impossible short of a bug)."""
    matcher.consume_token(token_id)
    return matcher.is_stopped() or matcher.is_error()
