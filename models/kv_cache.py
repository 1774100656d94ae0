"""The paged KV cache tensors: per layer one K and one V tensor of [num_blocks, block_size, Hkv, D],
all views of a single allocation. Under tensor parallelism a rank caches only its Hkv / tp KV heads.
Which sequence owns which block is the block manager's business."""

from __future__ import annotations

import torch

from leanserve.models.config import ModelConfig


class KVCache:
    def __init__(
        self,
        config: ModelConfig,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device | str,
        tp_size: int = 1,
    ) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        # Zeroed, not empty: kernels multiply masked-out probabilities (0) with whatever V holds in a
        # partly filled block, and 0 * NaN from stale memory would poison the output.
        self.data = torch.zeros(
            config.num_layers,
            2,
            num_blocks,
            block_size,
            config.num_kv_heads // tp_size,
            config.head_dim,
            dtype=dtype,
            device=device,
        )
        self.k = list(self.data[:, 0].unbind(0))  # per layer [num_blocks, block_size, Hkv, D]
        self.v = list(self.data[:, 1].unbind(0))

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy whole blocks (all layers, K and V) from src to dst for each (src, dst) pair."""
        if copies:
            src, dst = (torch.tensor(c, device=self.data.device) for c in zip(*copies, strict=True))
            self.data[:, :, dst] = self.data[:, :, src]

    @staticmethod
    def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype, tp_size: int = 1) -> int:
        """Bytes one block takes over all layers, K and V (on one rank of `tp_size`)."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        kv_heads = config.num_kv_heads // tp_size
        return 2 * config.num_layers * block_size * kv_heads * config.head_dim * itemsize
