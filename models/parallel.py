"""Tensor parallelism over torch.distributed: which share of a dimension each rank holds, the
all-reduce that row-parallel layers end with, and the process groups (NCCL on CUDA, gloo on CPU, plus a
gloo group for host-side messages). Attention heads, KV heads and the MLP width are split evenly."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from leanserve.models.config import ModelConfig

NVLINK_MULTICAST_OFF = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}


@dataclass(frozen=True)
class TensorParallel:
    """This process's place in a tensor-parallel group of `world_size` ranks."""

    rank: int
    world_size: int
    group: dist.ProcessGroup | None = None  # device collectives; None: the default group
    cpu_group: dist.ProcessGroup | None = None  # host-side messages (gloo); None: the default group

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside a tensor-parallel group of {self.world_size}")

    def shard(self, size: int) -> tuple[int, int]:
        """[start, end) of this rank's contiguous share of a dimension of `size` (divisible)."""
        part = size // self.world_size
        return self.rank * part, (self.rank + 1) * part

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over the ranks in place (the partial outputs of a row-parallel matmul)."""
        dist.all_reduce(x, group=self.group)
        return x


def check_divisible(config: ModelConfig, world_size: int) -> None:
    """Raise a ValueError naming every dimension that `world_size` ranks cannot split evenly. KV heads
    are split, not replicated, so a model with fewer KV heads than ranks cannot run."""
    dims = {
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "intermediate_size": config.intermediate_size,
    }
    bad = [f"{name}={size}" for name, size in dims.items() if size % world_size]
    if bad:
        raise ValueError(
            f"tensor_parallel_size={world_size} must divide {' and '.join(bad)} "
            f"(each rank holds an equal share of the attention heads, KV heads and MLP width)"
        )


def init_distributed(
    rank: int, world_size: int, store: dist.Store, device_type: str, timeout_s: float = 600.0
) -> TensorParallel:
    """Join the default process group (NCCL on CUDA, gloo on CPU) through `store`; on CUDA also make a
    gloo group for host-side messages, so broadcasting step metadata never touches the GPU."""
    if device_type == "cuda":
        torch.cuda.set_device(rank)
    backend = "nccl" if device_type == "cuda" else "gloo"
    timeout = timedelta(seconds=timeout_s)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
    cpu_group = dist.new_group(backend="gloo", timeout=timeout) if backend == "nccl" else None
    return TensorParallel(rank, world_size, cpu_group=cpu_group)


def destroy_distributed() -> None:
    """Leave the process groups (so a later engine in this process can form new ones)."""
    if dist.is_initialized():
        dist.destroy_process_group()
