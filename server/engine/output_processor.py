"""From sampled tokens to what the engine streams back: detokenization, stop strings, logprob entries
with their tokens' texts, prompt logprobs, and each request's `RequestOutput` delta since the last one."""

from __future__ import annotations

import time
from collections.abc import Callable

from leanserve.server.engine.outputs import FinishReason, RequestOutput, SampleDelta, TokenLogprob
from leanserve.server.engine.request import Request, Sequence
from leanserve.server.engine.sampler import SamplerOutput
from leanserve.server.engine.step_pipeline import InFlightStep

Finish = Callable[[Sequence, FinishReason, str | int | None], None]


class OutputProcessor:
    """Owns the tokens appended but not yet detokenized and turns them into `RequestOutput`s; the text
    work of one step overlaps the device's next step."""

    def __init__(self, tokenizer, finish: Finish) -> None:
        self.tokenizer = tokenizer
        self.finish = finish  # ends a sequence in the scheduler (a stop string matched)
        self.requests: dict[str, Request] = {}  # unfinished requests by id
        # Tokens appended but not yet detokenized; None: the sequence ended without one (max_tokens=0).
        self._pending: list[tuple[Sequence, int | None]] = []

    @property
    def has_pending(self) -> bool:
        return bool(self._pending)

    def add_request(self, request: Request) -> None:
        if request.params.prompt_logprobs is not None:  # the first token has no logprob: nothing before it
            (text,) = token_texts(self.tokenizer, request.prompt_token_ids[:1])
            request.prompt_logprobs = [TokenLogprob(request.prompt_token_ids[0], text, None)]
        self.requests[request.request_id] = request

    def add_step(self, flight: InFlightStep, appended: list[tuple[int, Sequence, int | None]]) -> None:
        """Queue a completed step's appended tokens for detokenization, with their logprob entries, and
        put its prompt scores into their requests' lists."""
        self._record_prompt_logprobs(flight)
        if flight.host_sampled.logprobs is not None:
            entries = logprob_entries(self.tokenizer, flight.logprobs, flight.host_sampled)
            for row, seq, token_id in appended:
                if token_id is not None and entries[row] is not None:
                    seq.new_logprobs.append(entries[row])
        self._pending += [(seq, token_id) for _, seq, token_id in appended]

    def drop_pending(self) -> None:
        self._pending = []

    def process(self) -> list[RequestOutput]:
        """Detokenize the pending tokens, apply stop strings, build the outputs of the requests touched."""
        touched: dict[str, Request] = {}
        for seq, token_id in self._pending:
            touched[seq.request.request_id] = seq.request
            if token_id is None:  # ended by its prefill (max_tokens=0): no text, only the output is due
                continue
            delta = seq.detokenizer.add_tokens([token_id])
            seq.new_text += delta.text
            if delta.stop_reason is not None:
                if not seq.finished:
                    self.finish(seq, "stop", delta.stop_reason)
                seq.finish_reason, seq.stop_reason = "stop", delta.stop_reason
            elif seq.finished:  # finished by its last token: release the text held back
                seq.new_text += seq.detokenizer.flush()
        self._pending = []
        return [self.drain(r) for r in touched.values()]

    def drain(self, request: Request) -> RequestOutput:
        """The request's output since the last one; a finished request is forgotten."""
        output = drain_output(request)
        if output.finished:
            self.requests.pop(request.request_id, None)
        return output

    def _record_prompt_logprobs(self, flight: InFlightStep) -> None:
        """Put the step's prompt scores into their requests' lists, by prompt position: steps complete
        in launch order, so a chunk's entries follow those before it, and a chunk recomputed after a
        preemption writes the same entries again."""
        if flight.scores is None:
            return
        chunks = flight.scores.chunks
        ks = [request.params.prompt_logprobs for request, _, n in chunks for _ in range(n)]
        entries = logprob_entries(self.tokenizer, ks, flight.scores.host)
        row = 0
        for request, start, n in chunks:
            if request.prompt_logprobs is not None:  # None: handed out already (the request was aborted)
                request.prompt_logprobs[start : start + n] = entries[row : row + n]
            row += n


def token_texts(tokenizer, token_ids: list[int]) -> list[str]:
    """Each token's own text as OpenAI reports it (" unless", not the BPE symbol "Ġunless"); ids the
    tokenizer does not know (random-weight benchmarks) decode to ""."""
    return tokenizer.batch_decode([[i] for i in token_ids])


def logprob_entries(tokenizer, ks: list[int | None], out: SamplerOutput) -> list[TokenLogprob | None]:
    """An entry per row of a host `out` with k top alternatives, None for rows whose k is None. The
    texts of all the rows' tokens are decoded in one call (a scored prompt has thousands)."""
    token_ids, logprobs = out.token_ids.tolist(), out.logprobs.tolist()
    top_ids = out.top_ids.tolist() if out.top_ids is not None else None
    top_lps = out.top_logprobs.tolist() if out.top_logprobs is not None else None
    tops = [list(zip(top_ids[i][:k], top_lps[i][:k], strict=True)) if k else [] for i, k in enumerate(ks)]
    wanted = [i for i, k in enumerate(ks) if k is not None]
    wanted_ids = [t for i in wanted for t in (token_ids[i], *(t for t, _ in tops[i]))]
    texts = iter(token_texts(tokenizer, wanted_ids))
    entries: list[TokenLogprob | None] = [None] * len(ks)
    for i in wanted:
        text = next(texts)
        top = [(t, next(texts), lp) for t, lp in tops[i]]
        entries[i] = TokenLogprob(token_ids[i], text, logprobs[i], top)
    return entries


def drain_output(request: Request) -> RequestOutput:
    """The request's new tokens, text and logprobs of every sequence since the last output (handed over:
    the sequences' buffers are emptied), its prompt logprobs with the first samples, and its totals."""
    samples = []
    for seq in request.sequences:
        if seq.new_token_ids or seq.new_text or (seq.finished and not seq.finish_reported):
            seq.finish_reported = seq.finished
            samples.append(
                SampleDelta(
                    index=seq.index,
                    text=seq.new_text,
                    token_ids=seq.new_token_ids,
                    logprobs=seq.new_logprobs if request.params.logprobs is not None else None,
                    finish_reason=seq.finish_reason,
                    stop_reason=seq.stop_reason,
                )
            )
            seq.new_token_ids, seq.new_text, seq.new_logprobs = [], "", []
    prompt_logprobs = None
    if samples:  # the first output with samples: the prompt is done (or the request failed)
        prompt_logprobs, request.prompt_logprobs = request.prompt_logprobs, None
    finished = request.finished
    if finished:
        request.timings.finished = time.monotonic()
    return RequestOutput(
        request_id=request.request_id,
        samples=samples,
        finished=finished,
        prompt_tokens=len(request.prompt_token_ids),
        completion_tokens=request.num_generated_tokens,
        attention_seconds=request.attention_seconds,
        timings=request.timings,
        cached_prompt_tokens=request.cached_prompt_tokens,
        error=request.error,
        prompt_logprobs=prompt_logprobs,
    )
