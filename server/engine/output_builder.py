"""What the engine streams back, built from its per-sequence state: a request's `RequestOutput` delta
since the last one, and logprob entries with the texts of their tokens."""

from __future__ import annotations

import time

from leanserve.server.engine.outputs import RequestOutput, SampleDelta, TokenLogprob
from leanserve.server.engine.request import Request
from leanserve.server.engine.sampler import SamplerOutput


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
