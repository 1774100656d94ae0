"""Engine configuration: one typed dataclass filled by the CLI / environment (server/settings.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
Device = Literal["auto", "cpu", "cuda"]
LoadFormat = Literal["auto", "dummy"]


@dataclass
class EngineConfig:
    model: str | None = None  # HF directory or cached hub name; None = embedded default model
    tokenizer: str | None = None  # defaults to the model directory
    served_model_name: str | None = None  # name clients use; defaults to the model dir's name
    dtype: Dtype = "auto"
    device: Device = "auto"
    load_format: LoadFormat = "auto"  # dummy: random weights from config.json alone
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048  # per-step token budget (chunked prefill)
    max_model_len: int | None = None  # defaults to the model's max_position_embeddings
    gpu_memory_utilization: float = 0.9
    kv_cache_tokens: int = 65536  # KV cache size on CPU
    enable_prefix_caching: bool = True
    enforce_eager: bool = False  # True disables CUDA graphs for decode
    # Launch step N+1 before step N's tokens reach the host (None: on for CUDA, where it hides the host
    # work of a step behind the device; on CPU nothing overlaps and it would only waste the last step).
    async_scheduling: bool | None = None
    tensor_parallel_size: int = 1  # ranks (one per GPU) sharing every layer's heads; > 1 runs eager
    seed: int = 0

    def __post_init__(self) -> None:
        checks = {
            "block_size": self.block_size in (1, 8, 16, 32, 64, 128),
            "max_num_seqs": self.max_num_seqs >= 1,
            "max_num_batched_tokens": self.max_num_batched_tokens >= 16,
            "max_model_len": self.max_model_len is None or self.max_model_len >= 1,
            "gpu_memory_utilization": 0.0 < self.gpu_memory_utilization <= 1.0,
            "kv_cache_tokens": self.kv_cache_tokens >= self.block_size,
            "tensor_parallel_size": self.tensor_parallel_size >= 1,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"invalid engine setting {name}={getattr(self, name)!r}")
