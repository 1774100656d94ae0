"""Model runner: turns a scheduled step into device tensors, runs the model and returns the logits of
the sequences that sample this step. Pure-decode steps on CUDA replay a graph captured per batch-size
bucket (attention kernel with its timer stamps and LM head inside); everything else runs eagerly.

Input token ids may be placeholders for tokens the device is still sampling (asynchronous scheduling:
the engine launches step N+1 before the host has seen step N's tokens): -(r + 1) stands for row r of the
in-flight step's sampled ids, which `execute` receives as `pending_tokens` and gathers on the device."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from leanserve.kernels.decode_inputs import (
    DecodeInputs,
    decode_inputs,
    resolve_placeholders,
    staged_size,
    staged_views,
)
from leanserve.models.attention import AttentionBatch, AttentionReading, AttentionTimer
from leanserve.models.kv_cache import KVCache
from leanserve.models.llama import CausalLM
from leanserve.models.prefetch import SideStreamPrefetch
from leanserve.server.engine.sampler import SamplerOutput, token_logprobs
from leanserve.server.engine.scheduler import PrefillChunk, SchedulerOutput
from leanserve.server.engine.tp_worker import TPWorkers

logger = logging.getLogger(__name__)

# Prompt positions whose logits exist at once while prompts are scored: a 2048-token chunk of a 128k
# vocabulary would be 1 GiB of fp32 logits; 256 rows with their log-softmax take about 320 MiB, which
# the step's activation reserve (free again once the forward is done) covers.
_SCORE_ROWS = 256

# Decode steps of at most this many sequences and KV tokens in all replay a graph that prefetches each
# layer's output projection into L2 while its attention runs (models.prefetch; Hopper). What it changed in
# a Llama-3-8B layer chain on an H100 (us a step; batch x context): 1 x 1k -95, 1 x 2k -81, 1 x 3k -64,
# 1 x 4k -3, 2 x 1k -61, 2 x 2k +8, 4 x 1k -18, 16 x 1k +35, 64 x 1.5k +873 (docs/benchmarks.md).
PREFETCH_MAX_BATCH = 4
PREFETCH_MAX_KV_TOKENS = 3072


def graph_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then steps of 8 up to `max_batch` (fewer padded rows than powers of two beyond 8)."""
    sizes = [b for b in (1, 2, 4) if b < max_batch] + list(range(8, max_batch, 8)) + [max_batch]
    return sorted(set(sizes))


@dataclass
class _DecodeGraph:
    graph: torch.cuda.CUDAGraph
    timer: AttentionTimer | None
    inputs: DecodeInputs  # the first `bucket` rows of the static inputs, read by each replay
    logits: torch.Tensor  # [bucket, vocab] float32, written by each replay


def prefetches(num_seqs: int, kv_tokens: int) -> bool:
    """A decode step this small is latency-bound in attention: replay its graph with the L2 prefetch."""
    return num_seqs <= PREFETCH_MAX_BATCH and kv_tokens <= PREFETCH_MAX_KV_TOKENS


class ModelRunner:
    """Owns the model, the KV cache (with one extra scratch block for padded graph rows) and the
    static buffers of the decode graphs. `execute` returns logits [num_sampling, vocab] float32:
    one row per prefill chunk that completes its sequence, then one per decode, in schedule order; and
    the logprobs of the prompt tokens that the step's chunks score (`PrefillChunk.num_scored`)."""

    def __init__(
        self,
        model: CausalLM,
        num_blocks: int,
        block_size: int,
        max_num_seqs: int,
        max_model_len: int,
        kv_cache_dtype: torch.dtype,
        device: torch.device,
        use_cuda_graphs: bool,
        time_attention: bool = True,
        workers: TPWorkers | None = None,
    ) -> None:
        self.model = model
        self.workers = workers  # tensor parallelism: the other ranks mirror every forward and copy
        self.device = device
        self.block_size = block_size
        self.kv_cache = KVCache(
            model.config, num_blocks + 1, block_size, kv_cache_dtype, device, model.tp_size
        )
        if workers is not None:
            workers.allocate_kv_cache(num_blocks + 1, block_size, kv_cache_dtype)
        self.scratch_block = num_blocks
        self.max_blocks_per_seq = -(-max_model_len // block_size)
        self.time_attention = time_attention
        self._num_layers = model.config.num_layers
        self._timer = AttentionTimer(device, self._num_layers) if time_attention else None
        self._pin = device.type == "cuda"
        self._graphs: dict[tuple[int, bool], _DecodeGraph] = {}  # (bucket, with the L2 prefetch)
        self._buckets: list[int] = []
        # A graph replay would skip the input broadcast that tensor-parallel workers wait for.
        if use_cuda_graphs and device.type == "cuda" and workers is None:
            self._capture_decode_graphs(min(max_num_seqs, 512))

    # -- host -> device -----------------------------------------------------------------------------
    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(array)
        if self._pin:
            tensor = tensor.pin_memory()
        return tensor.to(self.device, non_blocking=True)

    def _block_table_array(self, tables: list[list[int]], rows: int) -> np.ndarray:
        width = max((len(t) for t in tables), default=1) or 1
        array = np.full((rows, width), self.scratch_block, dtype=np.int32)
        for i, table in enumerate(tables):
            array[i, : len(table)] = table
        return array

    def _slots(self, table: list[int], start: int, end: int) -> np.ndarray:
        positions = np.arange(start, end)
        return np.asarray(table, dtype=np.int64)[positions // self.block_size] * self.block_size + (
            positions % self.block_size
        )

    # -- execution ----------------------------------------------------------------------------------
    def execute(
        self, step: SchedulerOutput, tables: dict[int, list[int]], pending_tokens: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, AttentionReading | None, SamplerOutput | None]:
        """Queue one step; returns its logits, its attention timer's reading (None when timing is off)
        and its prompt scores (`_score_prompts`; None when no chunk scores). `tables` maps seq_id ->
        block table for every sequence in the step."""
        if not step.prefills and len(step.decodes) <= (self._buckets[-1] if self._buckets else 0):
            return self._replay_decode(step, tables, pending_tokens)
        return self._run_eager(step, tables, pending_tokens)

    def _run_eager(
        self, step: SchedulerOutput, tables: dict[int, list[int]], pending_tokens: torch.Tensor | None
    ) -> tuple[torch.Tensor, AttentionReading | None, SamplerOutput | None]:
        ids, positions, slots, logit_rows = [], [], [], []
        cu, query_lens, context_lens = [0], [], []
        for chunk in step.prefills:
            seq, start = chunk.seq, chunk.seq.num_computed_tokens
            end = start + chunk.num_tokens
            ids.append(np.asarray(seq.token_ids[start:end], dtype=np.int64))
            positions.append(np.arange(start, end, dtype=np.int64))
            slots.append(self._slots(tables[seq.seq_id], start, end))
            cu.append(cu[-1] + chunk.num_tokens)
            query_lens.append(chunk.num_tokens)
            context_lens.append(end)
            if chunk.completes_prompt:
                logit_rows.append(cu[-1] - 1)
        num_prefill = cu[-1]
        decode_lens = [len(seq.token_ids) for seq in step.decodes]
        if step.decodes:
            ids.append(np.asarray([seq.token_ids[-1] for seq in step.decodes], dtype=np.int64))
            positions.append(np.asarray(decode_lens, dtype=np.int64) - 1)
            slots.append(np.concatenate([self._slots(tables[s.seq_id], n - 1, n) for s, n in zip(
                step.decodes, decode_lens, strict=True)]))  # fmt: skip
            logit_rows.extend(range(num_prefill, num_prefill + len(step.decodes)))
        prefill_tables = [tables[c.seq.seq_id] for c in step.prefills]
        decode_tables = [tables[s.seq_id] for s in step.decodes]
        batch = AttentionBatch(
            slot_mapping=self._to_device(np.concatenate(slots)),
            num_prefill_tokens=num_prefill,
            prefill_cu_seqlens_q=self._to_device(np.asarray(cu, dtype=np.int32)),
            prefill_context_lens=self._to_device(np.asarray(context_lens, dtype=np.int32)),
            prefill_block_tables=self._to_device(
                self._block_table_array(prefill_tables, len(prefill_tables))
            ),
            decode_block_tables=self._to_device(self._block_table_array(decode_tables, len(decode_tables))),
            decode_seq_lens=self._to_device(np.asarray(decode_lens, dtype=np.int32)),
            prefill_context_lens_host=context_lens,
            prefill_query_lens_host=query_lens,
            timer=self._timer,
        )
        if self._timer is not None:
            self._timer.start()
        input_ids = resolve_placeholders(self._to_device(np.concatenate(ids)), pending_tokens)
        input_positions = self._to_device(np.concatenate(positions))
        if self.workers is not None:
            self.workers.broadcast_step(input_ids, input_positions, batch)
        hidden = self.model(input_ids, input_positions, batch, self.kv_cache)
        rows = self._to_device(np.asarray(logit_rows, dtype=np.int64))
        logits = self.model.compute_logits(hidden.index_select(0, rows))
        scores = self._score_prompts(step.prefills, cu, hidden)
        return logits, self._timer.finish() if self._timer is not None else None, scores

    def _score_prompts(
        self, prefills: list[PrefillChunk], cu: list[int], hidden: torch.Tensor
    ) -> SamplerOutput | None:
        """Logprobs of the prompt tokens the chunks score, each from the raw logits of the position
        before it, with the top k alternatives (k: the most any of the chunks' requests asks): token_ids
        [R] are the scored tokens, chunk after chunk. Logits exist `_SCORE_ROWS` rows at a time. None,
        with no device work, when no chunk scores (the common step). hidden: [T, hidden] of the step."""
        rows, targets, k = [], [], 0
        for chunk, first_row in zip(prefills, cu[:-1], strict=True):
            if num := chunk.num_scored:
                start = chunk.seq.num_computed_tokens
                rows.append(np.arange(first_row, first_row + num, dtype=np.int64))
                targets.append(np.asarray(chunk.seq.token_ids[start + 1 : start + 1 + num], dtype=np.int64))
                k = max(k, chunk.seq.request.params.prompt_logprobs)
        if not rows:
            return None
        rows_d, targets_d = self._to_device(np.concatenate(rows)), self._to_device(np.concatenate(targets))
        parts = [
            token_logprobs(
                self.model.compute_logits(hidden.index_select(0, rows_d[i : i + _SCORE_ROWS])),
                targets_d[i : i + _SCORE_ROWS],
                k,
            )
            for i in range(0, len(rows_d), _SCORE_ROWS)
        ]
        return SamplerOutput(
            targets_d,
            torch.cat([p.logprobs for p in parts]),
            torch.cat([p.top_ids for p in parts]) if k else None,
            torch.cat([p.top_logprobs for p in parts]) if k else None,
        )

    # -- CUDA graphs for pure-decode steps ---------------------------------------------------------
    def _capture_decode_graphs(self, max_batch: int) -> None:
        n, width = max_batch, self.max_blocks_per_seq
        dev = self.device
        # The graphs' static inputs: every graph reads the first rows of these (its _DecodeGraph.inputs).
        static = DecodeInputs(
            ids=torch.zeros(n, dtype=torch.int64, device=dev),
            positions=torch.zeros(n, dtype=torch.int64, device=dev),
            slots=torch.full((n,), self.scratch_block * self.block_size, dtype=torch.int64, device=dev),
            seq_lens=torch.ones(n, dtype=torch.int32, device=dev),
            block_tables=torch.full((n, width), self.scratch_block, dtype=torch.int32, device=dev),
        )
        # Each step's lengths, last tokens and tables travel in one copy (kernels.decode_inputs), from one
        # of two pinned staging arrays used in turn (see _replay_decode).
        self._staged = torch.empty(staged_size(n, width), dtype=torch.int32, device=dev)
        self._stage = [torch.empty(staged_size(n, width), dtype=torch.int32).pin_memory() for _ in range(2)]
        self._replays = 0
        empty_i32 = torch.zeros(0, dtype=torch.int32, device=dev)
        pool = torch.cuda.graph_pool_handle()
        self._buckets = graph_buckets(max_batch)
        prefetch = SideStreamPrefetch(dev) if SideStreamPrefetch.supported(dev) else None
        variants = [(bucket, False) for bucket in self._buckets]
        if prefetch is not None:
            variants += [(bucket, True) for bucket in self._buckets if prefetches(bucket, 0)]
        started = time.perf_counter()
        # Largest first: later graphs reuse its pool memory.
        for bucket, prefetching in sorted(variants, reverse=True):
            timer = AttentionTimer(dev, self._num_layers) if self.time_attention else None
            inputs = static.rows(bucket)
            batch = AttentionBatch(
                slot_mapping=inputs.slots,
                num_prefill_tokens=0,
                prefill_cu_seqlens_q=torch.zeros(1, dtype=torch.int32, device=dev),
                prefill_context_lens=empty_i32,
                prefill_block_tables=torch.zeros(0, width, dtype=torch.int32, device=dev),
                decode_block_tables=inputs.block_tables,
                decode_seq_lens=inputs.seq_lens,
                prefill_context_lens_host=[],
                prefill_query_lens_host=[],
                timer=None,
                prefetch=prefetch if prefetching else None,
            )

            def run(batch=batch, inputs=inputs) -> torch.Tensor:
                if batch.timer is not None:
                    batch.timer.start()  # captured: each replay resets the stamps it fills
                hidden = self.model(inputs.ids, inputs.positions, batch, self.kv_cache)
                return self.model.compute_logits(hidden)

            run()  # warm-up outside the graph: kernel compilation, workspace allocation
            torch.cuda.synchronize()
            batch.timer = timer
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = run()
            self._graphs[(bucket, prefetching)] = _DecodeGraph(graph, timer, inputs, logits)
        torch.cuda.synchronize()
        # Most of this is Triton compiling kernel variants on the first start; later starts find them in
        # Triton's cache (TRITON_CACHE_DIR, ~/.triton/cache by default; docs/deployment.md).
        logger.info(
            "decode CUDA graphs for batch sizes %s (with the L2 prefetch of o: %s) captured in %.1f s",
            self._buckets,
            sorted(bucket for bucket, prefetching in variants if prefetching) or "none",
            time.perf_counter() - started,
        )

    def _replay_decode(
        self, step: SchedulerOutput, tables: dict[int, list[int]], pending_tokens: torch.Tensor | None
    ) -> tuple[torch.Tensor, AttentionReading | None, None]:
        num = len(step.decodes)
        bucket = next(b for b in self._buckets if b >= num)
        decode_tables = [tables[seq.seq_id] for seq in step.decodes]
        width = max(len(t) for t in decode_tables)
        # The previous step may still be in flight with its copy not yet run, while the one before it has
        # returned its sampled ids to the host: the two staging arrays alternate.
        stage = self._stage[self._replays % 2][: staged_size(bucket, width)]
        self._replays += 1
        lens, ids, block_tables = (t.numpy() for t in staged_views(stage, bucket, width))
        lens.fill(1)
        lens[:num] = [len(seq.token_ids) for seq in step.decodes]
        ids.fill(0)
        ids[:num] = [seq.token_ids[-1] for seq in step.decodes]
        block_tables.fill(self.scratch_block)  # padded rows write their token to the scratch block
        for i, table in enumerate(decode_tables):
            block_tables[i, : len(table)] = table
        prefetching = prefetches(num, int(lens[:num].sum()))
        entry = self._graphs.get((bucket, prefetching)) or self._graphs[(bucket, False)]
        staged = self._staged[: stage.numel()]
        staged.copy_(stage, non_blocking=True)
        decode_inputs(staged, pending_tokens, self.block_size, entry.inputs)
        entry.graph.replay()
        return entry.logits[:num], entry.timer.finish() if entry.timer is not None else None, None

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy whole blocks (all layers, K and V), for forked sequences' private last blocks."""
        self.kv_cache.copy_blocks(copies)
        if self.workers is not None and copies:
            self.workers.copy_blocks(copies)

    def close(self) -> None:
        """Stop the tensor-parallel workers, if any."""
        if self.workers is not None:
            self.workers.close()
