"""FP8 KV cache accuracy: the engine with `--kv-cache-dtype fp8` against the same model with its
unquantized cache (bf16 by default), over a fixed prompt set, both ways:

- teacher-forced: each prompt plus the reference's greedy continuation is scored by both engines (prompt
  logprobs, prefilled in chunks of 16 tokens so that every chunk after the first reads its prefix from
  the cache, dequantized; its own K/V unquantized, as the engine's SDPA prefill attends them, or from the
  cache too with --paged-prefill, as a decode step reads them); the share of continuation positions where
  both pick the same argmax, and the mean |delta logprob| of the reference's token. Positions in the first
  chunk, which attends to its own unquantized K/V only, are left out.
- free-running: greedy decoding with each cache, the share of positions with the same token, and of
  positions before each prompt's first difference (after which the contexts differ).

`--decode-forms` compares the decode kernel's two fp8 forms instead, on the same fp8 cache: free-running
greedy decoding with decode attention by the Triton kernel (q in fp16, so that slot-major V pages take the
e4m3 products) against the same cache read by the torch twin, for each form. On CPU the kernel runs under
TRITON_INTERPRET=1 (8 prompts x 64 tokens: ~15-25 minutes a form on 2 cores).

Prints a table per model and (but for --decode-forms) writes JSON to --out. Runs on CPU or GPU. Usage:
python benchmarks/kv_fp8_accuracy.py [--model DIR ...] [--dtype bfloat16] [--tokens 64] [--out DIR]
[--paged-prefill | --decode-forms]"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from leanserve.kernels import lean_attention, ops
from leanserve.models import attention, kv_cache
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
CHUNK = 16  # the smallest token budget a step takes (EngineConfig.max_num_batched_tokens)


@dataclass
class Agreement:
    model: str
    dtype: str
    tokens: int  # generated tokens per prompt
    prompts: int
    forced_positions: int  # continuation positions scored teacher-forced (past the first chunk)
    forced_agreement: float  # share of them where fp8's argmax is the reference's
    mean_abs_dlogprob: float  # |logprob(fp8) - logprob(reference)| of the reference's token, mean
    max_abs_dlogprob: float
    free_agreement: float  # free-running: share of positions with the same token
    free_prefix: float  # free-running: share of positions before each prompt's first difference


@dataclass
class FormAgreement:
    form: str  # the decode kernel's fp8 form: widening or e4m3
    same_token: float  # free-running, kernel against twin: share of positions with the same token
    same_prefix: float  # share of positions before each prompt's first difference
    mean_abs_dlogprob: float  # |delta logprob| of the chosen token before the first difference, mean
    max_abs_dlogprob: float


def _engine(config: EngineConfig, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, list]:
    """Run `requests` on one engine of `config`: id -> [token ids, their logprobs, prompt logprobs]."""
    engine = LLMEngine.from_config(config)
    runs = {rid: [[], [], None] for rid in requests}
    try:
        for rid, (prompt, params) in requests.items():
            engine.add_request(rid, prompt, params)
        while engine.has_work:
            for out in engine.step():
                for sample in out.samples:
                    runs[out.request_id][0].extend(sample.token_ids)
                    runs[out.request_id][1].extend(lp.logprob for lp in sample.logprobs or [])
                if out.prompt_logprobs is not None:
                    runs[out.request_id][2] = out.prompt_logprobs
    finally:
        engine.close()
    return runs


def _free_running(reference: dict[str, list], runs: dict[str, list], tokens: int) -> tuple[int, int, list]:
    """Two engines' greedy runs of the same requests (_engine's): the positions with the same token, the
    positions before each request's first difference, and |delta logprob| of the token at each of those."""
    same = prefix = 0
    deltas = []
    for rid, (ref_ids, ref_logprobs, _) in reference.items():
        ids, logprobs = runs[rid][0], runs[rid][1]
        same += sum(a == b for a, b in zip(ref_ids, ids, strict=True))
        first = next((i for i, (a, b) in enumerate(zip(ref_ids, ids, strict=True)) if a != b), tokens)
        prefix += first
        deltas += [abs(a - b) for a, b in zip(ref_logprobs[:first], logprobs[:first], strict=True)]
    return same, prefix, deltas


def compare(
    model: str | None,
    dtype: str,
    device: str,
    tokens: int,
    prompts: list[list[int]],
    free_running: bool = True,
) -> Agreement:
    """fp8 against the model dtype's cache (`auto`): one engine each for greedy decoding (the fp8 one
    only if `free_running`; free_* are nan without it), one each for scoring the reference's
    continuations."""
    base = dict(model=model, dtype=dtype, device=device, max_num_seqs=len(prompts), kv_cache_tokens=16384)
    greedy = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True, logprobs=0)
    requests = {str(i): (p, greedy) for i, p in enumerate(prompts)}
    caches = ("auto", "fp8") if free_running else ("auto",)
    free = {c: _engine(EngineConfig(**base, kv_cache_dtype=c), requests) for c in caches}
    same, prefix, _ = _free_running(free["auto"], free["fp8"], tokens) if free_running else (0, 0, [])

    # Teacher-forced: prompt + continuation scored in CHUNK-token steps, every chunk after the first
    # reading its prefix back from the cache (its own tokens too with --paged-prefill).
    score = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1)
    scored = {rid: (p + free["auto"][rid][0], score) for rid, (p, _) in requests.items()}
    chunked = dict(base, max_num_batched_tokens=CHUNK, enable_prefix_caching=False)
    forced = {c: _engine(EngineConfig(**chunked, kv_cache_dtype=c), scored) for c in ("auto", "fp8")}
    agree, deltas = 0, []
    for rid, (prompt, _) in requests.items():
        ref, fp8 = forced["auto"][rid][2], forced["fp8"][rid][2]
        # Entry pos scores token pos from the query at pos - 1: the first chunk's queries are 0..CHUNK-1.
        for pos in range(max(len(prompt), CHUNK + 1), len(ref)):
            agree += ref[pos].top[0][0] == fp8[pos].top[0][0]
            deltas.append(abs(ref[pos].logprob - fp8[pos].logprob))
    total = tokens * len(prompts) if free_running else float("nan")
    return Agreement(
        model=Path(model).name if model else "embedded default",
        dtype=dtype,
        tokens=tokens,
        prompts=len(prompts),
        forced_positions=len(deltas),
        forced_agreement=agree / len(deltas),
        mean_abs_dlogprob=statistics.fmean(deltas),
        max_abs_dlogprob=max(deltas),
        free_agreement=same / total,
        free_prefix=prefix / total,
    )


def _kernel_decode(q, k_cache, v_cache, block_tables, seq_lens, sm_scale=None, out=None, timestamps=None,
                   k_scale=None, v_scale=None):  # fmt: skip
    """ops.decode_attention by the Triton kernel on any device, q in fp16 (the e4m3 products take a
    half-precision q; the model's own dtype may be fp32 on CPU)."""
    result = lean_attention.lean_attention_decode(
        q.half(), k_cache, v_cache, block_tables, seq_lens, sm_scale, None, None, k_scale, v_scale
    ).to(q.dtype)
    return result if out is None else out.copy_(result)


def compare_decode_forms(
    model: str | None, dtype: str, device: str, tokens: int, prompts: list[list[int]]
) -> list[FormAgreement]:
    """Per fp8 V layout (D-major: the widening form; slot-major: the e4m3 form), free-running greedy with
    the decode kernel against the twin on the same fp8 cache: the share of positions with the same token
    and before the first difference, and the mean |delta logprob| of the chosen token before it."""
    base = dict(model=model, dtype=dtype, device=device, max_num_seqs=len(prompts), kv_cache_tokens=16384)
    greedy = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True, logprobs=0)
    requests = {str(i): (p, greedy) for i, p in enumerate(prompts)}
    twin_decode, rows = ops.decode_attention, []
    for form, slot_major in (("widening", False), ("e4m3", True)):
        kv_cache.FP8_V_SLOT_MAJOR = slot_major
        ops.decode_attention = twin_decode
        twin = _engine(EngineConfig(**base, kv_cache_dtype="fp8"), requests)
        ops.decode_attention = _kernel_decode
        kernel = _engine(EngineConfig(**base, kv_cache_dtype="fp8"), requests)
        same, prefix, deltas = _free_running(twin, kernel, tokens)
        total = tokens * len(prompts)
        rows.append(FormAgreement(form, same / total, prefix / total, statistics.fmean(deltas), max(deltas)))
    ops.decode_attention, kv_cache.FP8_V_SLOT_MAJOR = twin_decode, False
    return rows


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
    parser.add_argument(
        "--paged-prefill",
        action="store_true",
        help="prefill through the paged path (models.attention.SDPA_PREFILL off): every key from the cache",
    )
    parser.add_argument(
        "--decode-forms",
        action="store_true",
        help="the decode kernel's widening and e4m3 forms against the twin on the same fp8 cache instead",
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.decode_forms:
        print("| model | form | prompts x tokens | same token | same prefix | mean abs dlogprob | max |")
        print("|---|---|---:|---:|---:|---:|---:|")
        for model in args.model or [None]:
            for r in compare_decode_forms(
                model, args.dtype, args.device, args.tokens, tokenize(model, PROMPTS)
            ):
                print(
                    f"| {Path(model).name if model else 'embedded default'} | {r.form} | {len(PROMPTS)} x "
                    f"{args.tokens} | {100 * r.same_token:.1f}% | {100 * r.same_prefix:.1f}% "
                    f"| {r.mean_abs_dlogprob:.4f} | {r.max_abs_dlogprob:.4f} |",
                    flush=True,
                )
        return
    attention.SDPA_PREFILL = not args.paged_prefill
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
    print(
        "| model | dtype | prompts x tokens | teacher-forced positions | same argmax | mean abs dlogprob "
        "| max | free-running same token | same prefix |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r.model} | {r.dtype} | {r.prompts} x {r.tokens} | {r.forced_positions} "
            f"| {100 * r.forced_agreement:.1f}% | {r.mean_abs_dlogprob:.4f} | {r.max_abs_dlogprob:.4f} "
            f"| {100 * r.free_agreement:.1f}% | {100 * r.free_prefix:.1f}% |"
        )


if __name__ == "__main__":
    main()
