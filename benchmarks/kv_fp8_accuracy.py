"""FP8 KV cache accuracy: greedy decoding through the engine with `--kv-cache-dtype fp8` against the same
model with its unquantized cache (bf16 by default), over a fixed prompt set. Prints, per model, the share
of the first N generated tokens that agree (position by position, and up to each prompt's first
difference) and the mean |delta logprob| of the chosen token where both runs saw the same context; writes
JSON to --out. Runs on CPU or GPU. Usage: python benchmarks/kv_fp8_accuracy.py [--model DIR ...]
[--dtype bfloat16] [--tokens 64] [--out DIR]"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from leanserve.server.engine.config import EngineConfig
from leanserve.server.engine.llm_engine import LLMEngine
from leanserve.server.engine.sampling_params import SamplingParams

# Fixed prompts of different kinds (prose, code, a list, a question); each is decoded greedily.
PROMPTS = (
    "The history of the printing press begins in",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Here is a list of the planets of the solar system, in order from the sun:",
    "Question: Why is the sky blue? Answer:",
    "Once upon a time, in a small village by the sea, there lived",
    "The three laws of thermodynamics state that",
    "SELECT name, COUNT(*) FROM orders JOIN customers ON",
    "To bake bread at home, you will need flour, water,",
)


@dataclass
class Agreement:
    model: str
    dtype: str
    tokens: int  # generated tokens compared per prompt
    prompts: int
    position_agreement: float  # share of positions with the same token
    prefix_agreement: float  # share of positions before each prompt's first difference
    mean_abs_dlogprob: float  # chosen token's |logprob(fp8) - logprob(reference)| where contexts match
    max_abs_dlogprob: float


def greedy_runs(
    config: EngineConfig, prompts: list[list[int]], tokens: int
) -> list[tuple[list[int], list[float]]]:
    """Greedy tokens and each one's logprob for every prompt, from one engine of `config`."""
    engine = LLMEngine.from_config(config)
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True, logprobs=0)
    try:
        for i, prompt in enumerate(prompts):
            engine.add_request(str(i), prompt, params)
        runs: dict[str, tuple[list[int], list[float]]] = {str(i): ([], []) for i in range(len(prompts))}
        while engine.has_work:
            for out in engine.step():
                for sample in out.samples:
                    runs[out.request_id][0].extend(sample.token_ids)
                    runs[out.request_id][1].extend(lp.logprob for lp in sample.logprobs or [])
    finally:
        engine.close()
    return [runs[str(i)] for i in range(len(prompts))]


def compare(model: str | None, dtype: str, device: str, tokens: int, prompts: list[list[int]]) -> Agreement:
    """fp8 against the model dtype's cache (`auto`), one engine each, same prompts."""
    base = dict(model=model, dtype=dtype, device=device, max_num_seqs=len(prompts), kv_cache_tokens=16384)
    reference = greedy_runs(EngineConfig(**base, kv_cache_dtype="auto"), prompts, tokens)
    fp8 = greedy_runs(EngineConfig(**base, kv_cache_dtype="fp8"), prompts, tokens)
    same = prefix = 0
    deltas: list[float] = []
    for (ref_ids, ref_lps), (ids, lps) in zip(reference, fp8, strict=True):
        same += sum(a == b for a, b in zip(ref_ids, ids, strict=True))
        first_difference = next(
            (i for i, (a, b) in enumerate(zip(ref_ids, ids, strict=True)) if a != b), tokens
        )
        prefix += first_difference
        # Up to and including the first difference both runs scored the same context.
        shared = min(first_difference + 1, tokens)
        deltas += [abs(a - b) for a, b in zip(ref_lps[:shared], lps[:shared], strict=True)]
    total = tokens * len(prompts)
    return Agreement(
        model=Path(model).name if model else "embedded default",
        dtype=dtype,
        tokens=tokens,
        prompts=len(prompts),
        position_agreement=same / total,
        prefix_agreement=prefix / total,
        mean_abs_dlogprob=statistics.fmean(deltas),
        max_abs_dlogprob=max(deltas),
    )


def tokenize(model: str | None, texts: tuple[str, ...]) -> list[list[int]]:
    from transformers import AutoTokenizer

    from leanserve.models.weights_source import resolve_model_dir

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(model))
    return [tokenizer.encode(text) for text in texts]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", action="append", help="model directory (repeatable); default: embedded")
    parser.add_argument("--dtype", default="bfloat16", help="model dtype; the reference cache uses it")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("bench_out"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for model in args.model or [None]:
        results.append(compare(model, args.dtype, args.device, args.tokens, tokenize(model, PROMPTS)))
        print(json.dumps(asdict(results[-1])), flush=True)
    env = {"device": args.device, "torch": torch.__version__}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    (args.out / "kv_fp8_accuracy.json").write_text(
        json.dumps({"env": env, "results": [asdict(r) for r in results]}, indent=1)
    )
    print("| model | dtype | prompts x tokens | same token | same prefix | mean abs dlogprob | max |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r.model} | {r.dtype} | {r.prompts} x {r.tokens} | {100 * r.position_agreement:.1f}% "
            f"| {100 * r.prefix_agreement:.1f}% | {r.mean_abs_dlogprob:.4f} | {r.max_abs_dlogprob:.4f} |"
        )


if __name__ == "__main__":
    main()
