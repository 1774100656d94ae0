"""Per-token cost of structured outputs: decode tokens/s of a batch of free-text requests, then of the
same batch constrained by a JSON schema (at least 100 records, so no request ends before max_tokens),
then of a free-text batch next to one constrained request (what the others pay).

    python benchmarks/bench_structured.py [--model DIR] [--batch 8] [--tokens 128] [--device cpu]
    GPU (benchmarks/gpu_suite.sh run structured): Llama-3-8B shapes, dummy weights, SmolLM2's tokenizer.
The model's --dtype default applies (CPU: fp32 without native bf16, docs/cpu_dtype.md).
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

from leanserve.models.weights_source import default_model_dir
from leanserve.server.engine.config import EngineConfig
from leanserve.server.engine.llm_engine import LLMEngine
from leanserve.server.engine.runtime import setup_process
from leanserve.server.engine.sampling_params import SamplingParams

# At least 100 records: no request completes its grammar (and leaves the batch) before max_tokens.
SCHEMA = {
    "type": "array",
    "minItems": 100,
    "items": {"type": "object", "properties": {"k": {"type": "string"}, "v": {"type": "integer"}}},
}


def run(engine: LLMEngine, batch: int, tokens: int, constrained: int) -> float:
    """Generated tokens per second of `batch` requests, the first `constrained` of them with SCHEMA."""
    prompt = engine.tokenizer("Write a JSON list of records:").input_ids
    for i in range(batch):
        params = SamplingParams(max_tokens=tokens, temperature=1.0, seed=i, ignore_eos=True)
        if i < constrained:
            params.grammar = engine.grammar.compile("json_schema", SCHEMA, "response_format")
        engine.add_request(f"r{time.monotonic_ns()}-{i}", list(prompt), params)
    started, generated = time.perf_counter(), 0
    while engine.has_work:
        generated += sum(len(s.token_ids) for out in engine.step() for s in out.samples)
    return generated / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None, help="default: the embedded model")
    parser.add_argument("--tokenizer", default=None, help="default: the model's")
    parser.add_argument("--load-format", default="auto", help="dummy: random weights")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")  # start-up phases
    setup_process(args.device, seed=0)
    config = EngineConfig(
        model=args.model or str(default_model_dir()),
        tokenizer=args.tokenizer,
        load_format=args.load_format,
        device=args.device,
        kv_cache_tokens=16384,
        # Decode graphs for the batch sizes the runs use only: each size costs a capture (and on a cold
        # Triton cache, compiles) when the engine starts.
        max_num_seqs=args.batch,
        max_model_len=2048,
    )
    engine = LLMEngine.from_config(config)
    engine.grammar.compile("regex", "a", "warm-up")  # the tokenizer's llguidance view, built once
    run(engine, args.batch, 16, 0)  # warm up
    free = 0.0
    for name, constrained in (("free", 0), ("all constrained", args.batch), ("one constrained", 1)):
        rate = max(run(engine, args.batch, args.tokens, constrained) for _ in range(3))
        free = free or rate
        print(
            f"{name:16s} batch {args.batch}: {rate:8.1f} tokens/s (best of 3), {rate / free:6.1%} of free, "
            f"{1e6 * args.batch * (1 / rate - 1 / free):+.0f} us per step",
            flush=True,
        )


if __name__ == "__main__":
    main()
