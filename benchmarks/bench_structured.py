"""Per-token cost of structured outputs: decode tokens/s of a batch of free-text requests, then of the
same batch constrained by a JSON schema (at least 100 records, so no request ends before max_tokens),
then of a free-text batch next to one constrained request (what the others pay).

    python benchmarks/bench_structured.py [--model DIR] [--batch 8] [--tokens 128] [--device cpu]
"""

from __future__ import annotations

import argparse
import time

from leanserve.models.weights_source import default_model_dir
from leanserve.server.engine.config import EngineConfig
from leanserve.server.engine.llm_engine import LLMEngine
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
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()
    config = EngineConfig(
        model=args.model or str(default_model_dir()),
        device=args.device,
        dtype="float32",
        kv_cache_tokens=16384,
    )
    engine = LLMEngine.from_config(config)
    engine.grammar.compile("regex", "a", "warm-up")  # the tokenizer's llguidance view, built once
    run(engine, args.batch, 16, 0)  # warm up
    for name, constrained in (("free", 0), ("all constrained", args.batch), ("one constrained", 1)):
        rates = [run(engine, args.batch, args.tokens, constrained) for _ in range(3)]
        print(f"{name:16s} batch {args.batch}: {max(rates):8.1f} tokens/s (best of 3)")


if __name__ == "__main__":
    main()
