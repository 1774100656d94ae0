"""Warm-up before serving: run each kind of step once on synthetic sequences, so that no request pays
for first-use work. On a cold Triton cache that work is seconds per kernel variant. Measured on an H100
(Llama-3-8B shapes, empty Triton cache), without this the first 512-token prompt after start took 1.17 s
instead of 0.12 s and the first eight concurrent 300-token prompts 9.3 s instead of 0.18 s (a step that
mixes a prefill chunk with a new power of two of decodes compiles a LeanAttention variant); with it,
0.20 s and 0.32 s, for 58 s more of start-up (the compilation moved, not added). The decode CUDA graphs
are captured, and so compiled, at start already; this covers the eager steps: prefill chunks of each
row-count class the kernels specialise on, a chunked-prefill continuation, scored prompts (echo), and
prefill + decode mixes for every power of two of decodes a step can hold; then the sampler with every
option on.

The synthetic sequences own no blocks: their block tables point at the runner's scratch block (where the
decode graphs' padded rows write too), so no request, block, scheduler state or metric is touched."""

from __future__ import annotations

import logging
import time

import torch

from leanserve.server.engine.config import EngineConfig
from leanserve.server.engine.model_runner import ModelRunner
from leanserve.server.engine.outputs import RequestTimings
from leanserve.server.engine.request import Request, Sequence
from leanserve.server.engine.sampler import Sampler, SamplingRow
from leanserve.server.engine.sampling_params import SamplingParams
from leanserve.server.engine.scheduler import PrefillChunk, SchedulerOutput

logger = logging.getLogger(__name__)

# A prefill chunk whose row count is neither 1 nor a multiple of 16 (the classes Triton specialises
# integer arguments on) and small enough for the skinny product kernels' tall tiles (17-64 rows).
_ODD_CHUNK = 37

# One of each kind of sampling row: greedy, seeded top-k/top-p/min-p, penalties, bias, top logprobs.
_SAMPLING_MIX = (
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=0.8, top_k=50, top_p=0.9, min_p=0.05, seed=0),
    SamplingParams(repetition_penalty=1.1, presence_penalty=0.5, frequency_penalty=0.5),
    SamplingParams(temperature=0.0, logit_bias={1: 5.0}, logprobs=5),
)
_SCORED = SamplingParams(temperature=0.0, prompt_logprobs=5)


def warm_up_steps(config: EngineConfig, max_model_len: int) -> list[SchedulerOutput]:
    """The synthetic steps, in order. The first one is a whole prefill, so the scratch block holds
    finite K/V before any step reads it. No sequence is longer than `max_model_len`."""

    def seq(length: int, computed: int = 0, params: SamplingParams = _SAMPLING_MIX[0]) -> Sequence:
        # A prompt of `length` tokens; with params.prompt_logprobs its chunks score it.
        request = Request("warm-up", [0] * length, params, RequestTimings(time.monotonic()))
        s = Sequence(request, 0, [0] * length, detokenizer=None)
        s.num_computed_tokens = computed
        return s

    full = min(config.max_num_batched_tokens, max_model_len)
    odd = min(_ODD_CHUNK, full - 1)
    steps = [
        SchedulerOutput(prefills=[PrefillChunk(seq(full), full)]),
        SchedulerOutput(prefills=[PrefillChunk(seq(odd), odd)]),
        # a chunk after a cached prefix (chunked prefill, prefix-cache hit)
        SchedulerOutput(prefills=[PrefillChunk(seq(full, full - odd), odd)]),
        # prompts scored (echo): the LM head over slices of a whole chunk, and over a few rows
        SchedulerOutput(prefills=[PrefillChunk(seq(full, params=_SCORED), full)]),
        SchedulerOutput(prefills=[PrefillChunk(seq(odd, params=_SCORED), odd)]),
    ]
    # LeanAttention compiles one variant per power of two of decodes in a step (BLOCK_B); a mixed step
    # holds at most max_num_seqs - 1 of them beside its prefill chunk, within the token budget.
    most = min(config.max_num_seqs - 1, config.max_num_batched_tokens - odd)
    for decodes in sorted({min(2**k, most) for k in range(1, most.bit_length() + 1)}):
        running = [seq(config.block_size + 1, config.block_size) for _ in range(decodes)]
        steps.append(SchedulerOutput(prefills=[PrefillChunk(seq(odd), odd)], decodes=running))
    return steps


def warm_up(runner: ModelRunner, sampler: Sampler, config: EngineConfig, max_model_len: int) -> float:
    """Run `warm_up_steps` and the sampler; returns the seconds it took."""
    started = time.perf_counter()
    steps = warm_up_steps(config, max_model_len)
    for step in steps:
        tables = {
            s.seq_id: [runner.scratch_block] * -(-len(s.token_ids) // config.block_size) for s in step.seqs
        }
        logits, *_ = runner.execute(step, tables)
    generator = torch.Generator(runner.device).manual_seed(0)
    rows = [
        SamplingRow(p, [0], [1, 2], generator if p.seed is not None else None)
        for p in (_SAMPLING_MIX * logits.shape[0])[: logits.shape[0]]
    ]
    sampler(logits, rows).to_host()
    sampler(logits, [SamplingRow(_SAMPLING_MIX[0], [0], [], None)] * logits.shape[0])  # greedy only
    if runner.device.type == "cuda":
        torch.cuda.synchronize(runner.device)
    seconds = time.perf_counter() - started
    logger.info("warm-up: %d synthetic steps and the sampler in %.1f s", len(steps), seconds)
    return seconds
