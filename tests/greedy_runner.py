"""A minimal stand-in for the engine's model runner, shared by the model tests: a greedy loop over a
KVCache + AttentionBatch with chunked prefill, staggered joins and batched decode (not a test module)."""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field

import torch

from leanserve.models.attention import AttentionBatch, AttentionTimer
from leanserve.models.kv_cache import KVCache
from leanserve.models.llama import CausalLM
from leanserve.server.engine.tp_worker import TPWorkers

NEW_TOKENS = 32
BLOCK_SIZE = 4  # small, so that prompts span several non-contiguous pages


@dataclass
class Seq:
    """One sequence of the test-local greedy loop: its tokens and its pages in the cache."""

    tokens: list[int]
    prompt_len: int
    start_step: int = 0
    num_cached: int = 0
    blocks: list[int] = field(default_factory=list)

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.prompt_len :]


class GreedyRunner:
    """A minimal stand-in for the engine's model runner: pages from a shuffled free list, each step
    prefill chunks first then one decode token per sequence whose prompt is cached."""

    def __init__(
        self,
        model: CausalLM,
        num_blocks: int = 256,
        timer: AttentionTimer | None = None,
        workers: TPWorkers | None = None,
        cache_dtype: torch.dtype | None = None,
    ):
        self.model = model
        self.device = model.embed_weight.device
        cache_dtype = cache_dtype or model.embed_weight.dtype
        self.cache = KVCache(model.config, num_blocks, BLOCK_SIZE, cache_dtype, self.device, model.tp_size)
        # Tensor parallelism: mirror the cache and every forward to the other ranks, as the engine does.
        self.workers = workers
        if workers is not None:
            workers.allocate_kv_cache(num_blocks, BLOCK_SIZE, cache_dtype)
        self.last_logits: torch.Tensor | None = None  # logits of generate()'s last step
        self.free = list(range(num_blocks))
        random.Random(0).shuffle(self.free)
        self.timer = timer

    def _slots(self, seq: Seq, count: int) -> list[int]:
        positions = range(seq.num_cached, seq.num_cached + count)
        while len(seq.blocks) * BLOCK_SIZE < positions[-1] + 1:
            seq.blocks.append(self.free.pop())
        return [seq.blocks[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in positions]

    def step(self, prefill: list[tuple[Seq, int]], decode: list[Seq]) -> torch.Tensor:
        """Run one forward; returns the hidden rows [T, H] (prefill chunk tokens, then decode tokens)."""
        ids, positions, slots = [], [], []
        for seq, count in [*prefill, *((s, 1) for s in decode)]:
            ids += seq.tokens[seq.num_cached : seq.num_cached + count]
            positions += range(seq.num_cached, seq.num_cached + count)
            slots += self._slots(seq, count)
        query_lens = [count for _, count in prefill]
        context_lens = [seq.num_cached + count for seq, count in prefill]
        width = max([len(s.blocks) for s, _ in prefill] + [len(s.blocks) for s in decode] + [1])

        def tensor(values, dtype=torch.int32) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=self.device)

        def tables(seqs: list[Seq]) -> torch.Tensor:
            return tensor([s.blocks + [0] * (width - len(s.blocks)) for s in seqs]).view(len(seqs), width)

        batch = AttentionBatch(
            slot_mapping=tensor(slots, torch.int64),
            num_prefill_tokens=sum(query_lens),
            prefill_cu_seqlens_q=tensor([0, *itertools.accumulate(query_lens)]),
            prefill_context_lens=tensor(context_lens),
            prefill_block_tables=tables([s for s, _ in prefill]),
            decode_block_tables=tables(decode),
            decode_seq_lens=tensor([s.num_cached + 1 for s in decode]),
            prefill_context_lens_host=context_lens,
            prefill_query_lens_host=query_lens,
            timer=self.timer,
        )
        input_ids, pos = tensor(ids, torch.int64), tensor(positions, torch.int64)
        if self.workers is not None:
            self.workers.broadcast_step(input_ids, pos, batch)
        with torch.inference_mode():
            hidden = self.model(input_ids, pos, batch, self.cache)
        for seq, count in [*prefill, *((s, 1) for s in decode)]:
            seq.num_cached += count
        return hidden

    def generate(
        self, prompts: list[list[int]], new_tokens: int = NEW_TOKENS, chunk: int = 1 << 30, stagger: int = 0
    ) -> list[list[int]]:
        """Greedy: each prompt prefilled in chunks of `chunk` tokens, sequence i joining at step
        i * stagger, then decoded together with the others (mixed prefill + decode steps)."""
        seqs = [Seq(list(p), len(p), start_step=i * stagger) for i, p in enumerate(prompts)]
        step = 0
        while any(len(s.generated) < new_tokens for s in seqs):
            active = [s for s in seqs if s.start_step <= step and len(s.generated) < new_tokens]
            prefill = [
                (s, min(chunk, s.prompt_len - s.num_cached)) for s in active if s.num_cached < s.prompt_len
            ]
            decode = [s for s in active if s.num_cached >= s.prompt_len]
            if prefill or decode:
                hidden = self.step(prefill, decode)
                rows, samplers, end = [], [], 0
                for seq, count in prefill:
                    end += count
                    if seq.num_cached == seq.prompt_len:  # the prompt is complete: sample its first token
                        rows.append(end - 1)
                        samplers.append(seq)
                rows += range(end, end + len(decode))
                samplers += decode
                with torch.inference_mode():
                    self.last_logits = self.model.compute_logits(hidden[rows])
                next_ids = self.last_logits.argmax(-1).tolist()
                for seq, token in zip(samplers, next_ids, strict=True):
                    seq.tokens.append(token)
            step += 1
        return [s.generated for s in seqs]
