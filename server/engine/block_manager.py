"""KV cache bookkeeping in pure Python (no torch): a pool of fixed-size blocks, per-sequence block
tables, and a prefix cache of full blocks keyed by (parent hash, token ids), shared by ref count, with
freed cached blocks kept until evicted least-recently-used first. The engine turns block ids into
cache slots; this module never touches tensors."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

SeqId = Hashable


@dataclass
class _Block:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None  # set once the block is full, computed and registered in the cache


class BlockPool:
    """Owns every block. Invariants (checked by `check_invariants`):
    - a block is free (in `_free`) exactly when its ref_count is 0;
    - `_cached[h] == b` exactly when `blocks[b].block_hash == h`: every hashed block, used or free, can be
      found by its hash, and a free hashed block keeps its content until it is handed out again;
    - `_free` is ordered by eviction priority: blocks without a hash first (nothing to lose), then hashed
      blocks from least to most recently freed."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.blocks = [_Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._cached: dict[int, int] = {}

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        """Take the block with the lowest eviction priority; a hashed one leaves the cache."""
        block_id, _ = self._free.popitem(last=False)
        block = self.blocks[block_id]
        if block.block_hash is not None:
            del self._cached[block.block_hash]
            block.block_hash = None
        block.ref_count = 1
        return block_id

    def lookup(self, block_hash: int) -> int | None:
        return self._cached.get(block_hash)

    def acquire(self, block_id: int) -> None:
        """Add a reference to a block found in the cache (it may be free: then it is revived)."""
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self._free[block_id]
        block.ref_count += 1

    def release(self, block_id: int) -> None:
        block = self.blocks[block_id]
        assert block.ref_count > 0, f"block {block_id} released more often than acquired"
        block.ref_count -= 1
        if block.ref_count == 0:
            self._free[block_id] = None
            if block.block_hash is None:  # nothing cached in it: hand it out before any cached block
                self._free.move_to_end(block_id, last=False)

    def register(self, block_id: int, block_hash: int) -> None:
        """Make a full, computed block findable. If an equal block is already cached, keep that one."""
        block = self.blocks[block_id]
        if block.block_hash is None and block_hash not in self._cached:
            block.block_hash = block_hash
            self._cached[block_hash] = block_id

    def check_invariants(self) -> None:
        for block in self.blocks:
            assert (block.ref_count == 0) == (block.block_id in self._free), block
            if block.block_hash is not None:
                assert self._cached[block.block_hash] == block.block_id, block
        assert all(self.blocks[b].block_hash == h for h, b in self._cached.items())
        unhashed_seen_after_hashed = False
        hashed_seen = False
        for block_id in self._free:
            if self.blocks[block_id].block_hash is None:
                unhashed_seen_after_hashed |= hashed_seen
            else:
                hashed_seen = True
        assert not unhashed_seen_after_hashed, "free blocks without content must be evicted first"


@dataclass
class Allocation:
    """Result of admitting a sequence: how many of its leading tokens were found in the prefix cache."""

    num_cached_tokens: int


@dataclass
class _SeqBlocks:
    block_ids: list[int] = field(default_factory=list)
    hashes: list[int] = field(default_factory=list)  # hashes of the leading full blocks registered so far


class BlockManager:
    """Per-sequence block tables over a `BlockPool`, with optional prefix caching.

    Invariants: every block id in a table holds one reference of that table (a block shared by k tables
    has ref_count k); `hashes[i]` is the content hash of `block_ids[i]` (that block, or an equal one, is
    in the cache) for exactly the leading full blocks whose tokens are computed; after every sequence is
    freed, every block is free."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.pool = BlockPool(num_blocks)
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._seqs: dict[SeqId, _SeqBlocks] = {}
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0  # of which found

    # -- queries --------------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def usage(self) -> float:
        return 1.0 - self.pool.num_free / self.pool.num_blocks

    def block_table(self, seq_id: SeqId) -> list[int]:
        return self._seqs[seq_id].block_ids

    def __contains__(self, seq_id: SeqId) -> bool:
        return seq_id in self._seqs

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- admission / growth / release ----------------------------------------------------------------
    def allocate(
        self, seq_id: SeqId, token_ids: Sequence[int], reuse_prefix: bool = True
    ) -> Allocation | None:
        """Give a new sequence blocks for all of `token_ids`, reusing cached full blocks of its prefix
        unless `reuse_prefix` is False (a sequence that needs the logits of every position; its blocks
        still enter the cache once computed). The last token is never taken from the cache (its logits
        must be computed). Returns None and changes nothing when the pool is too small right now."""
        assert seq_id not in self._seqs, f"sequence {seq_id!r} already has blocks"
        hits: list[int] = []
        hashes: list[int] = []
        if self.enable_prefix_caching and reuse_prefix:
            parent = None
            for start in range(0, len(token_ids) - 1 - self.block_size + 1, self.block_size):
                block_hash = hash((parent, tuple(token_ids[start : start + self.block_size])))
                block_id = self.pool.lookup(block_hash)
                if block_id is None:
                    break
                hits.append(block_id)
                hashes.append(block_hash)
                parent = block_hash
        num_new = self.blocks_needed(len(token_ids)) - len(hits)
        # Hit blocks that are currently free would be taken out of the free list too.
        revived = sum(1 for b in hits if self.pool.blocks[b].ref_count == 0)
        if num_new + revived > self.pool.num_free:
            return None
        for block_id in hits:
            self.pool.acquire(block_id)
        block_ids = hits + [self.pool.allocate() for _ in range(num_new)]
        self._seqs[seq_id] = _SeqBlocks(block_ids, hashes)
        num_cached = len(hits) * self.block_size
        if self.enable_prefix_caching and reuse_prefix:
            self.prefix_queries += len(token_ids)
            self.prefix_hits += num_cached
        return Allocation(num_cached_tokens=num_cached)

    def ensure_capacity(self, seq_id: SeqId, num_tokens: int) -> bool:
        """Grow the table to hold `num_tokens` tokens (decode). False, with nothing changed, when the
        pool has no block left: the caller preempts someone and retries."""
        seq = self._seqs[seq_id]
        missing = self.blocks_needed(num_tokens) - len(seq.block_ids)
        if missing > self.pool.num_free:
            return False
        seq.block_ids.extend(self.pool.allocate() for _ in range(missing))
        return True

    def fork(self, parent_id: SeqId, child_id: SeqId, num_tokens: int) -> list[tuple[int, int]] | None:
        """Give `child_id` the first `num_tokens` computed tokens of `parent_id`: full blocks are shared,
        a partly filled last block gets a private copy. Returns the (src, dst) block copies the caller
        must apply to the KV tensors before the child's next step, or None if no block is free."""
        parent = self._seqs[parent_id]
        num_full = num_tokens // self.block_size
        partial = num_tokens % self.block_size != 0
        if partial and self.pool.num_free == 0:
            return None
        shared = parent.block_ids[:num_full]
        for block_id in shared:
            self.pool.acquire(block_id)
        copies = []
        block_ids = list(shared)
        if partial:
            dst = self.pool.allocate()
            copies.append((parent.block_ids[num_full], dst))
            block_ids.append(dst)
        self._seqs[child_id] = _SeqBlocks(block_ids, parent.hashes[:num_full])
        return copies

    def mark_computed(self, seq_id: SeqId, token_ids: Sequence[int], num_computed: int) -> None:
        """Register the full blocks among the first `num_computed` tokens in the prefix cache. Call only
        after the step that computed them succeeded: a failed step must not leave garbage findable."""
        if not self.enable_prefix_caching:
            return
        seq = self._seqs[seq_id]
        bs = self.block_size
        for i in range(len(seq.hashes), num_computed // bs):
            parent = seq.hashes[i - 1] if i else None
            block_hash = hash((parent, tuple(token_ids[i * bs : (i + 1) * bs])))
            self.pool.register(seq.block_ids[i], block_hash)
            seq.hashes.append(block_hash)

    def free(self, seq_id: SeqId) -> None:
        """Release a finished, aborted or preempted sequence's blocks. Tail blocks are released first so
        that, among equally old cached blocks, a prompt's later blocks are evicted before its prefix."""
        seq = self._seqs.pop(seq_id)
        for block_id in reversed(seq.block_ids):
            self.pool.release(block_id)

    def check_invariants(self) -> None:
        self.pool.check_invariants()
        refs = [0] * self.pool.num_blocks
        for seq in self._seqs.values():
            assert len(seq.hashes) <= len(seq.block_ids)
            for block_id in seq.block_ids:
                refs[block_id] += 1
        assert refs == [b.ref_count for b in self.pool.blocks], "ref counts differ from the block tables"
