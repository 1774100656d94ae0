"""What an LLMEngine runs on, built from an EngineConfig: the model (or its tensor-parallel workers), the
tokenizer, the KV pool's size (from free GPU memory, or `kv_cache_tokens` on CPU) and the model runner."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from transformers import AutoTokenizer

from leanserve.models.kv_cache import KVCache, resolve_kv_cache_dtype
from leanserve.models.layers import prepack_linear_weights
from leanserve.models.loader import load_model, resolve_dtype
from leanserve.models.sdpa_prefill import prefix_gather_bytes
from leanserve.models.weights_source import resolve_model_dir
from leanserve.server.engine.config import EngineConfig
from leanserve.server.engine.model_runner import ModelRunner
from leanserve.server.engine.tp_worker import TPWorkers, WorkerSpec

# GPU memory kept out of the KV pool, estimated with margin for Llama-3-8B: activations of a full prefill
# step (hidden states, fused qkv and gate/up outputs, fp32 norm temporaries: under 160 KiB per token of
# the step budget), the logits of every running sequence with the sampler's copies of them (4 fp32
# vocab-sized rows each), the CUDA graphs' own pool, and the longest prefix the SDPA prefill gathers out
# of the cache (models.sdpa_prefill).
_ACTIVATION_BYTES_PER_TOKEN = 160 * 1024
_LOGIT_COPIES = 4
_GRAPH_RESERVE_BYTES = 1 << 30

logger = logging.getLogger(__name__)


@dataclass
class EngineParts:
    runner: ModelRunner
    tokenizer: object  # a transformers tokenizer
    num_blocks: int
    max_model_len: int


def resolve_device(name: str) -> torch.device:
    """`--device` value -> device: "auto" is CUDA when there is a GPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_engine_parts(config: EngineConfig, time_attention: bool = True) -> EngineParts:
    model_dir = resolve_model_dir(config.model)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    kv_cache_dtype = resolve_kv_cache_dtype(config.kv_cache_dtype, dtype, device)
    workers = None
    if config.tensor_parallel_size > 1:
        spec = WorkerSpec(
            str(model_dir),
            dtype,
            device.type,
            config.load_format,
            torch.get_num_threads(),
            config.quantization,
        )
        workers = TPWorkers(spec, config.tensor_parallel_size)
        model = workers.load_model(device)
    else:
        model = load_model(model_dir, dtype, device, config.load_format, quantization=config.quantization)
    if device.type == "cpu":
        prepack_linear_weights(model)
    # A hub name is read from the local HF cache only, as the model is: the server never downloads.
    tokenizer = AutoTokenizer.from_pretrained(config.tokenizer or model_dir, local_files_only=True)
    max_model_len = config.max_model_len or model.config.max_position_embeddings
    num_blocks = num_kv_blocks(config, model, kv_cache_dtype, device)
    block_bytes = KVCache.bytes_per_block(model.config, config.block_size, kv_cache_dtype, model.tp_size)
    logger.info(
        "KV cache: %d blocks of %d tokens (%d tokens, %s, %.2f GiB a rank)",
        num_blocks,
        config.block_size,
        num_blocks * config.block_size,
        str(kv_cache_dtype).removeprefix("torch."),
        num_blocks * block_bytes / (1 << 30),
    )
    runner = ModelRunner(
        model,
        num_blocks,
        config.block_size,
        config.max_num_seqs,
        max_model_len,
        kv_cache_dtype,
        device,
        use_cuda_graphs=not config.enforce_eager,
        time_attention=time_attention,
        workers=workers,
    )
    return EngineParts(runner, tokenizer, num_blocks, max_model_len)


def num_kv_blocks(config: EngineConfig, model, kv_cache_dtype: torch.dtype, device: torch.device) -> int:
    """CPU: `kv_cache_tokens`. GPU: what `gpu_memory_utilization` of the card leaves after the weights,
    the step's activations, the CUDA graphs and the SDPA prefill's gathered prefix, in blocks of
    `kv_cache_dtype` (an fp8 cache holds about twice the tokens of a bf16 one)."""
    if device.type != "cuda":
        return config.kv_cache_tokens // config.block_size
    free, total = torch.cuda.mem_get_info(device)
    logits = config.max_num_seqs * model.config.vocab_size * 4 * _LOGIT_COPIES
    max_prefix = config.max_model_len or model.config.max_position_embeddings
    kv_heads = model.config.num_kv_heads // model.tp_size
    gather = prefix_gather_bytes(
        max_prefix, kv_heads, model.config.head_dim, resolve_dtype(config.dtype, device)
    )
    reserve = (
        config.max_num_batched_tokens * _ACTIVATION_BYTES_PER_TOKEN + logits + _GRAPH_RESERVE_BYTES + gather
    )
    budget = total * config.gpu_memory_utilization - (total - free) - reserve
    block_bytes = KVCache.bytes_per_block(model.config, config.block_size, kv_cache_dtype, model.tp_size)
    num_blocks = int(budget // block_bytes)
    if num_blocks < 1:
        raise RuntimeError(
            f"no GPU memory left for the KV cache (gpu_memory_utilization={config.gpu_memory_utilization})"
        )
    return num_blocks
