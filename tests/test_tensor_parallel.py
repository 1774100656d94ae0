"""Tensor parallelism on CPU with gloo and 2 processes (the test process is rank 0, one spawned worker
is rank 1): greedy tokens and logits of TP=2 equal TP=1 for the tiny Llama-3 and Qwen3 models, through
the greedy loop of tests/greedy_runner.py (chunked prefill, batched decode); each rank loads exactly its
slices; indivisible head counts fail clearly; tp=1 is the plain model; the engine with
tensor_parallel_size=2 gives the same tokens as with 1 (also on 2 GPUs with NCCL when they exist)."""

from __future__ import annotations

import random

import pytest
import torch
from greedy_runner import BLOCK_SIZE, GreedyRunner

from leanserve.models.config import ModelConfig
from leanserve.models.kv_cache import KVCache
from leanserve.models.llama import CausalLM
from leanserve.models.loader import load_model
from leanserve.models.parallel import TensorParallel, check_divisible
from leanserve.server.engine import engine_setup
from leanserve.server.engine.config import EngineConfig
from leanserve.server.engine.llm_engine import LLMEngine
from leanserve.server.engine.sampling_params import SamplingParams
from leanserve.server.engine.tp_worker import TPWorkers, WorkerSpec

CHUNK = 5  # prefill chunk: prompts longer than it also take the cached-prefix prefill path
NEW_TOKENS = 12
PROMPTS = [[random.Random(i).randrange(100, 40000) for _ in range(n)] for i, n in enumerate((3, 11, 17))]


def greedy(model: CausalLM, workers: TPWorkers | None = None) -> tuple[list[list[int]], torch.Tensor]:
    """Greedy continuations of PROMPTS, all in one batch: prompts prefilled CHUNK tokens per step, then
    batched decode; with `workers`, every forward is mirrored to them first, as the engine's model runner
    does. Returns (new tokens per prompt, last step's logits)."""
    runner = GreedyRunner(model, num_blocks=64, workers=workers)
    tokens = runner.generate(PROMPTS, new_tokens=NEW_TOKENS, chunk=CHUNK)
    return tokens, runner.last_logits


@pytest.mark.parametrize("kind", ["llama3", "qwen3"])
def test_tp2_greedy_matches_tp1(tiny_model_factory, kind):
    path = tiny_model_factory(kind)
    expected, expected_logits = greedy(load_model(path, torch.float32, "cpu"))
    workers = TPWorkers(WorkerSpec(str(path), torch.float32, "cpu"), world_size=2)
    try:
        model = workers.load_model(torch.device("cpu"))
        assert model.tp_size == 2 and model.layers[0].attn.num_kv_heads == 1
        got, logits = greedy(model, workers)
    finally:
        workers.close()
    assert got == expected
    assert len({tuple(t) for t in expected}) > 1  # not degenerate
    # Only the summation order differs (partial sums over heads and MLP columns, then the all-reduce).
    torch.testing.assert_close(logits, expected_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["llama3", "qwen3"])
def test_ranks_load_exactly_their_slices(tiny_model_factory, kind):
    """Loading needs no process group: rank r's parameters are its rows/columns of the full ones."""
    path = tiny_model_factory(kind)
    full = load_model(path, torch.float32, "cpu")
    shards = [load_model(path, torch.float32, "cpu", tp=TensorParallel(r, 2)) for r in range(2)]
    cfg = full.config
    q, kv, inter = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
    for ours, theirs in zip(full.layers, zip(*(s.layers for s in shards), strict=True), strict=True):
        qkv = [t.attn.qkv_weight for t in theirs]
        local_q, local_kv = q // 2, kv // 2
        for start, size, local_start in ((0, q, 0), (q, kv, local_q), (q + kv, kv, local_q + local_kv)):
            parts = [w[local_start : local_start + size // 2] for w in qkv]
            torch.testing.assert_close(torch.cat(parts), ours.attn.qkv_weight[start : start + size])
        torch.testing.assert_close(torch.cat([t.attn.o_weight for t in theirs], dim=1), ours.attn.o_weight)
        torch.testing.assert_close(
            torch.cat([t.mlp.down_weight for t in theirs], dim=1), ours.mlp.down_weight
        )
        gate_up = [t.mlp.gate_up_weight.view(2, inter // 2, -1) for t in theirs]
        torch.testing.assert_close(torch.cat(gate_up, dim=1).flatten(0, 1), ours.mlp.gate_up_weight)
        if cfg.qk_norm:  # per-head norm weights: the same vectors, over fewer heads
            assert theirs[1].attn.qk_norm_weight.shape == (3, cfg.head_dim)
            for shard in theirs:  # q_norm over the 2 local query heads, then k_norm over the 1 KV head
                norm, whole = shard.attn.qk_norm_weight, ours.attn.qk_norm_weight
                torch.testing.assert_close(norm, torch.cat([whole[:2], whole[4:5]]))
    for shard in shards:  # replicated: embeddings, final norm, LM head
        torch.testing.assert_close(shard.lm_head_weight, full.lm_head_weight)
        torch.testing.assert_close(shard.norm.weight, full.norm.weight)
    cache = KVCache(cfg, 3, BLOCK_SIZE, torch.float32, "cpu", tp_size=2)
    assert cache.k[0].shape == (3, BLOCK_SIZE, cfg.num_kv_heads // 2, cfg.head_dim)
    assert KVCache.bytes_per_block(cfg, BLOCK_SIZE, torch.float32, tp_size=2) * 2 == (
        KVCache.bytes_per_block(cfg, BLOCK_SIZE, torch.float32)
    )


def test_indivisible_heads_are_a_clear_error(tiny_model_factory):
    path = tiny_model_factory("llama")  # 3 query heads, 1 KV head
    config = ModelConfig.from_dir(path)
    with pytest.raises(
        ValueError, match=r"tensor_parallel_size=2 must divide num_attention_heads=3 and num_key"
    ):
        check_divisible(config, 2)
    with pytest.raises(ValueError, match="num_key_value_heads=1"):
        CausalLM(config, torch.float32, TensorParallel(0, 2))
    with pytest.raises(ValueError, match="num_key_value_heads=1"):  # before any worker is spawned
        TPWorkers(WorkerSpec(str(path), torch.float32, "cpu"), world_size=2)
    check_divisible(ModelConfig.from_dir(tiny_model_factory("qwen3")), 2)  # 4 / 2 heads: up to 2 ranks
    with pytest.raises(ValueError, match="num_key_value_heads=2"):
        check_divisible(ModelConfig.from_dir(tiny_model_factory("qwen3")), 4)


def test_a_rank_that_cannot_load_fails_startup(tiny_model_factory):
    workers = TPWorkers(WorkerSpec(str(tiny_model_factory("qwen3")), torch.float32, "cpu", "bogus"), 2)
    with pytest.raises(RuntimeError, match=r"rank 0: ValueError: unsupported load_format.*; rank 1: Value"):
        workers.load_model(torch.device("cpu"))
    assert not any(proc.is_alive() for proc in workers._procs)
    workers.close()  # idempotent


def test_one_rank_is_the_plain_model(tiny_model_factory):
    model = CausalLM(ModelConfig.from_dir(tiny_model_factory("llama")), torch.float32, TensorParallel(0, 1))
    assert model.tp is None and model.tp_size == 1
    assert all(layer.tp is None for layer in model.layers)
    assert all(shard is None for *_, shard in model.checkpoint_layout().values())


def _engine_tokens(engine: LLMEngine) -> dict[str, list[list[int]]]:
    """Greedy continuations through the engine: prompts of 1, 9 and 19 tokens (chunked prefill at a
    16-token step budget) and n=2 samples of one prompt (forked sequences copy their partial block)."""
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    requests = {f"r{i}": (p, params) for i, p in enumerate(([5], PROMPTS[1][:9], PROMPTS[2] + [7, 8]))}
    requests["n2"] = (PROMPTS[1], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, n=2))
    for request_id, (prompt, request_params) in requests.items():
        engine.add_request(request_id, prompt, request_params)
    tokens: dict[str, list[list[int]]] = {rid: [[] for _ in range(p.n)] for rid, (_, p) in requests.items()}
    while engine.has_work:
        for out in engine.step():
            for sample in out.samples:
                tokens[out.request_id][sample.index].extend(sample.token_ids)
    assert engine.block_manager.num_free_blocks == engine.block_manager.pool.num_blocks
    return tokens


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=[
                pytest.mark.gpu,
                pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs"),
            ],
        ),
    ],
)
def test_engine_tp2_matches_tp1(tiny_model_factory, device, monkeypatch):
    """On CUDA: NCCL between the ranks, asynchronous scheduling on, eager decode (no graphs under TP)."""
    # Both engines live in one process: size the pools by kv_cache_tokens on a GPU too.
    monkeypatch.setattr(
        engine_setup, "num_kv_blocks", lambda config, *_: config.kv_cache_tokens // config.block_size
    )
    settings = dict(
        model=str(tiny_model_factory("llama3")),
        device=device,
        dtype="float32",
        block_size=8,
        kv_cache_tokens=1024,
        max_num_batched_tokens=16,
    )
    expected = _engine_tokens(LLMEngine.from_config(EngineConfig(**settings)))
    engine = LLMEngine.from_config(EngineConfig(**settings, tensor_parallel_size=2))
    try:
        assert engine.runner.model.tp_size == 2 and engine.runner.kv_cache.k[0].shape[2] == 1
        got = _engine_tokens(engine)
    finally:
        engine.close()
    assert got == expected
    assert all(len(sample) == 8 for samples in got.values() for sample in samples)


def test_tensor_parallel_size_is_validated():
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        EngineConfig(tensor_parallel_size=0)
