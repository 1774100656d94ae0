"""Tensor-parallel worker group. The engine process is rank 0: it spawns ranks 1..N-1, and each loads
its shard of the model and of the KV cache. The scheduler, block manager and sampler run once, on rank
0; every step rank 0 broadcasts the model inputs (host metadata over a gloo group, the tensors over the
device group: NCCL on CUDA, gloo on CPU), every rank runs the same forward with its all-reduces, and only
rank 0 computes logits (the LM head is whole on every rank) and samples."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from leanserve.models.attention import AttentionBatch
from leanserve.models.config import ModelConfig
from leanserve.models.kv_cache import KVCache
from leanserve.models.layers import prepack_linear_weights
from leanserve.models.llama import CausalLM
from leanserve.models.loader import load_model
from leanserve.models.parallel import TensorParallel, check_divisible, destroy_distributed, init_distributed
from leanserve.server.engine.runtime import setup_process

logger = logging.getLogger(__name__)

_STARTUP_TIMEOUT = timedelta(seconds=300)  # spawned workers import torch and load their shard first
# AttentionBatch tensors sent each step, after input_ids and positions.
_BATCH_TENSORS = (
    "slot_mapping",
    "prefill_cu_seqlens_q",
    "prefill_context_lens",
    "prefill_block_tables",
    "decode_block_tables",
    "decode_seq_lens",
)


@dataclass(frozen=True)
class WorkerSpec:
    """What every rank needs to build its shard (pickled to the spawned workers)."""

    model_dir: str
    dtype: torch.dtype
    device_type: str  # "cpu" or "cuda" (rank r uses cuda:r)
    load_format: str = "auto"
    num_threads: int = 1  # torch intra-op threads of a worker (CPU)
    quantization: str = "auto"  # EngineConfig.quantization


# Messages from rank 0 to the workers, over the gloo group.
@dataclass
class _AllocateCache:
    num_blocks: int
    block_size: int
    dtype: torch.dtype


@dataclass
class _CopyBlocks:
    copies: list[tuple[int, int]]


@dataclass
class _Step:
    shapes: list[tuple[int, ...]]  # input_ids, positions, then _BATCH_TENSORS
    dtypes: list[torch.dtype]
    num_prefill_tokens: int
    prefill_context_lens_host: list[int]
    prefill_query_lens_host: list[int]


@dataclass
class _Stop:
    pass


class TPWorkers:
    """Rank 0's handle on the other ranks: start them, load rank 0's shard, then mirror each cache
    allocation, block copy and forward to them. `close()` stops them and leaves the process group."""

    def __init__(self, spec: WorkerSpec, world_size: int) -> None:
        check_divisible(ModelConfig.from_dir(spec.model_dir), world_size)  # fail before spawning
        self.spec = spec
        # Port 0: the OS picks a free port; the store tells the workers where to connect.
        store = dist.TCPStore(
            "127.0.0.1", 0, world_size, is_master=True, timeout=_STARTUP_TIMEOUT, wait_for_workers=False
        )
        context = mp.get_context("spawn")
        self._procs = [
            context.Process(
                target=_worker_main,
                args=(rank, world_size, store.port, spec),
                name=f"leanserve-tp{rank}",
                daemon=True,
            )
            for rank in range(1, world_size)
        ]
        for proc in self._procs:
            proc.start()
        self.tp: TensorParallel = init_distributed(0, world_size, store, spec.device_type)
        self._store = store
        self._serving = False  # the workers have loaded their shards and wait for messages
        self._closed = False

    def load_model(self, device: torch.device) -> CausalLM:
        """Load rank 0's shard, then wait for every worker's; raises if any rank failed to load."""
        error = None
        try:
            spec = self.spec
            model = load_model(
                Path(spec.model_dir), spec.dtype, device, spec.load_format, self.tp, spec.quantization
            )
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
        errors = _gather_errors(error, self.tp)
        if any(errors):
            self.close()  # the workers saw the errors too and are leaving
            failed = "; ".join(f"rank {rank}: {err}" for rank, err in enumerate(errors) if err)
            raise RuntimeError(f"tensor-parallel model loading failed ({failed})")
        self._serving = True
        return model

    def allocate_kv_cache(self, num_blocks: int, block_size: int, dtype: torch.dtype) -> None:
        """Every worker allocates its share of a cache of `num_blocks` blocks of `dtype` (rank 0 makes
        its own)."""
        self._send(_AllocateCache(num_blocks, block_size, dtype))

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Mirror a block copy (forked sequences) into every worker's cache."""
        self._send(_CopyBlocks(copies))

    def broadcast_step(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: AttentionBatch) -> None:
        """Send one step's model inputs; call right before rank 0's own forward. input_ids, positions:
        [T] int64; the batch's tensors go over the device group, its host lists with the header."""
        tensors = [input_ids, positions, *(getattr(batch, name) for name in _BATCH_TENSORS)]
        self._send(
            _Step(
                [tuple(t.shape) for t in tensors],
                [t.dtype for t in tensors],
                batch.num_prefill_tokens,
                batch.prefill_context_lens_host,
                batch.prefill_query_lens_host,
            )
        )
        _broadcast_tensors(tensors, self.tp)

    def close(self) -> None:
        """Stop the workers and leave the process group (idempotent)."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._serving:
                self._send(_Stop())
        except RuntimeError:  # a worker is already gone: nothing to tell the others over gloo
            logger.warning("tensor-parallel workers unreachable at close")
        for proc in self._procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.terminate()
        destroy_distributed()

    def _send(self, message: object) -> None:
        dist.broadcast_object_list([message], src=0, group=self.tp.cpu_group)


def _gather_errors(error: str | None, tp: TensorParallel) -> list[str | None]:
    errors: list[str | None] = [None] * tp.world_size
    dist.all_gather_object(errors, error, group=tp.cpu_group)
    return errors


def _broadcast_tensors(tensors: list[torch.Tensor], tp: TensorParallel) -> None:
    """Fill the other ranks' same-shaped `tensors` with rank 0's: one broadcast per dtype of a flat
    concatenation (the step's tensors are small; fewer collectives beat fewer copies)."""
    for dtype in dict.fromkeys(t.dtype for t in tensors):
        group = [t for t in tensors if t.dtype == dtype]
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.broadcast(flat, src=0, group=tp.group)
        if tp.rank:
            for t, part in zip(group, flat.split([t.numel() for t in group]), strict=True):
                t.copy_(part.view_as(t))


def _receive(tp: TensorParallel) -> object:
    message: list[object] = [None]
    dist.broadcast_object_list(message, src=0, group=tp.cpu_group)
    return message[0]


def _worker_main(rank: int, world_size: int, port: int, spec: WorkerSpec) -> None:
    """Entry point of a spawned rank: join the group, load the shard, then run rank 0's steps."""
    torch.set_num_threads(spec.num_threads)
    setup_process(spec.device_type)
    store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False, timeout=_STARTUP_TIMEOUT)
    tp = init_distributed(rank, world_size, store, spec.device_type)
    device = torch.device("cuda", rank) if spec.device_type == "cuda" else torch.device("cpu")
    model, error = None, None
    try:
        model = load_model(Path(spec.model_dir), spec.dtype, device, spec.load_format, tp, spec.quantization)
        if device.type == "cpu":  # as the engine does for rank 0's shard
            prepack_linear_weights(model)
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
    if not any(_gather_errors(error, tp)):
        with torch.inference_mode():
            _serve(model, tp, device)
    destroy_distributed()


def _serve(model: CausalLM, tp: TensorParallel, device: torch.device) -> None:
    """A worker's loop: apply rank 0's messages until it says stop."""
    kv_cache: KVCache | None = None
    while not isinstance(message := _receive(tp), _Stop):
        if isinstance(message, _AllocateCache):
            kv_cache = KVCache(
                model.config, message.num_blocks, message.block_size, message.dtype, device, tp.world_size
            )
        elif isinstance(message, _CopyBlocks):
            kv_cache.copy_blocks(message.copies)
        elif isinstance(message, _Step):
            tensors = [
                torch.empty(shape, dtype=dtype, device=device)
                for shape, dtype in zip(message.shapes, message.dtypes, strict=True)
            ]
            _broadcast_tensors(tensors, tp)
            input_ids, positions, *batch_tensors = tensors
            batch = AttentionBatch(
                **dict(zip(_BATCH_TENSORS, batch_tensors, strict=True)),
                num_prefill_tokens=message.num_prefill_tokens,
                prefill_context_lens_host=message.prefill_context_lens_host,
                prefill_query_lens_host=message.prefill_query_lens_host,
            )
            model(input_ids, positions, batch, kv_cache)
