"""The paged KV cache tensors: per layer one K and one V tensor of [num_blocks, block_size, Hkv, D],
all views of a single allocation. Under tensor parallelism a rank caches only its Hkv / tp KV heads.
An fp8 cache (float8_e4m3fn) also holds one fp32 scale per cached (token, KV head) row of K and of V,
per layer [num_blocks, block_size, Hkv] views of a second allocation (kernels.kv_quant). Which sequence
owns which block is the block manager's business.

Blocks are stored head-major: a block is Hkv pages of [block_size, D], one per KV head (and the scales
Hkv runs of block_size), so the rows a decode or prefill program reads for its head lie together rather
than Hkv * D elements apart. The per-layer tensors are transposed views of that storage with the
[num_blocks, block_size, Hkv, ...] shape every consumer takes; the attention readers and the cache
writers address K, V and the scales through their strides. On an H100 decode attention alone
(benchmarks/bench_decode_attention.py --layouts) takes 183.8 us instead of 215.5 token-major for 32
sequences of 4k tokens with Llama-3-8B's heads (32 q / 8 KV, bf16), 144.0 instead of 167.0 for 32 ragged
sequences of ~2k, 190.0 instead of 191.1 for one of 128k; fp8 with head-major scales is as fast or
slightly faster (one 128k sequence, 32 / 32 heads: 704.4 instead of 713.5 us).

An fp8 cache can store V's pages slot-major instead ([D, block_size] a page, `FP8_V_SLOT_MAJOR`): the
operand layout e4m3 tensor-core products take for P V, so the decode kernel multiplies K and V without
widening them (kernels/lean_decode.py, _attend_tile_e4m3). The readers and the writer take either layout
through V's strides; which one the engine allocates waits on their timing on a GPU
(`bench_decode_attention.py` times both)."""

from __future__ import annotations

import torch

from leanserve.kernels.fp8 import FP8
from leanserve.models.config import ModelConfig

KV_CACHE_DTYPES = ("auto", "bf16", "fp8")
FP8_V_SLOT_MAJOR = False
_SCALE_DTYPE = torch.float32


def block_view(pages: torch.Tensor) -> torch.Tensor:
    """Head-major blocks [num_blocks, Hkv, block_size, ...] as the [num_blocks, block_size, Hkv, ...]
    view the kernels take (a transpose, no copy); and such a view back as its head-major pages."""
    return pages.transpose(1, 2)


def head_major(cache: torch.Tensor) -> torch.Tensor:
    """A copy of `cache` ([num_blocks, block_size, Hkv, ...], K, V or scales) stored head-major as KVCache
    stores its blocks, viewed with cache's shape."""
    return block_view(block_view(cache).contiguous())


def slot_major(cache: torch.Tensor) -> torch.Tensor:
    """A copy of `cache` ([num_blocks, block_size, Hkv, D]) stored with slot-major pages, [num_blocks,
    Hkv, D, block_size], viewed with cache's shape (as KVCache stores an fp8 V under FP8_V_SLOT_MAJOR)."""
    return cache.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)


def resolve_kv_cache_dtype(name: str, model_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """`--kv-cache-dtype` -> the cache's storage dtype: auto is the model's dtype, bf16 needs a bf16
    model (the attention kernels read the cache in q's dtype), fp8 is float8_e4m3fn with scales, for
    any model dtype, where (CUDA) the GPU converts it (compute capability 8.9+)."""
    if name == "auto":
        return model_dtype
    if name == "bf16":
        if model_dtype != torch.bfloat16:
            raise ValueError(f"kv_cache_dtype bf16 needs dtype bfloat16, the model runs in {model_dtype}")
        return torch.bfloat16
    if name != "fp8":
        raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {name!r}")
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        raise ValueError(
            f"kv_cache_dtype fp8 needs a GPU of compute capability 8.9 or newer, got "
            f"{torch.cuda.get_device_name(device)}"
        )
    return FP8


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
        self.dtype = dtype
        num_kv_heads = config.num_kv_heads // tp_size
        pages = (config.num_layers, 2, num_blocks, num_kv_heads, block_size)
        # Zeroed, not empty: kernels multiply masked-out probabilities (0) with whatever V holds in a
        # partly filled block, and 0 * NaN from stale memory would poison the output.
        self.data = torch.zeros(*pages, config.head_dim, dtype=dtype, device=device)
        self.k = _layer_views(self.data, 0)  # per layer [num_blocks, block_size, Hkv, D]
        self.v = _layer_views(self.data, 1, slot_major=self.quantized and FP8_V_SLOT_MAJOR)
        self.scales = None
        self.k_scale: list[torch.Tensor | None] = [None] * config.num_layers
        self.v_scale: list[torch.Tensor | None] = [None] * config.num_layers
        if self.quantized:
            self.scales = torch.zeros(pages, dtype=_SCALE_DTYPE, device=device)
            self.k_scale = _layer_views(self.scales, 0)  # per layer [num_blocks, block_size, Hkv]
            self.v_scale = _layer_views(self.scales, 1)

    @property
    def quantized(self) -> bool:
        return self.dtype == FP8

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy whole blocks (all layers, K and V, with their scales) from src to dst for each pair: a
        block index is dim 2 of the storage, whatever the layout within the block."""
        if copies:
            src, dst = (torch.tensor(c, device=self.data.device) for c in zip(*copies, strict=True))
            self.data[:, :, dst] = self.data[:, :, src]
            if self.scales is not None:
                self.scales[:, :, dst] = self.scales[:, :, src]

    @staticmethod
    def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype, tp_size: int = 1) -> int:
        """Bytes one block takes over all layers, K and V, scales included (on one rank of `tp_size`)."""
        row_bytes = config.head_dim * torch.empty((), dtype=dtype).element_size()
        if dtype == FP8:
            row_bytes += torch.empty((), dtype=_SCALE_DTYPE).element_size()
        kv_heads = config.num_kv_heads // tp_size
        return 2 * config.num_layers * block_size * kv_heads * row_bytes


def _layer_views(storage: torch.Tensor, kv: int, slot_major: bool = False) -> list[torch.Tensor]:
    """Per layer, K's (kv=0) or V's (kv=1) blocks of `storage` [layers, 2, num_blocks, Hkv, block_size,
    ...] as [num_blocks, block_size, Hkv, ...] views; `slot_major`: each [block_size, D] page's bytes read
    as [D, block_size] instead."""
    layers = storage[:, kv].unbind(0)
    if slot_major:
        return [layer.view(*layer.shape[:2], *layer.shape[:1:-1]).permute(0, 3, 1, 2) for layer in layers]
    return [block_view(layer) for layer in layers]
