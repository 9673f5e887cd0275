"""Paged KV cache bookkeeping: fixed-size blocks, a free list, refcounts and a prefix cache.

Pure bookkeeping (no tensors), so it is tested on its own. A full block is identified by a chained hash
of its tokens and the hash of the block before it, so two sequences share a block only when their whole
prefix up to it is equal. A block is published in the prefix cache only once its K/V have been computed
(``commit_computed``), never at allocation, so a sequence can never "hit" a block another sequence has
not written yet. Freed blocks keep their hash and stay findable until they are reused, in LRU order.

Blocks never used yet are kept apart (``_unused``). By default they are handed out before any freed block,
so the prefix cache keeps every freed block as long as possible. Where the cache's memory is only committed
when first written (a CPU cache allocated uninitialised), ``reuse_freed_first`` reverses that: a freed block
is reused (its cache entry evicted, LRU) before a never-used one is touched, so the memory a job takes
follows the most blocks it holds at once, not the cache's size (for distinct prompts, the cached blocks of
finished ones are rarely hit again).
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from dataclasses import dataclass

from .sequence import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: bytes | None = None


def chain_hash(parent: bytes | None, token_ids: list[int]) -> bytes:
    """Hash of a full block given its parent block's hash (a content hash; collisions are not a concern)."""
    h = hashlib.blake2b(parent or b"", digest_size=16)
    h.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    return h.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 reuse_freed_first: bool = False) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.reuse_freed_first = reuse_freed_first
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free blocks that were used before, in LRU order (oldest first); cached ones keep their hash until
        # reused. Never-used blocks wait apart, lowest id first (popped from the end).
        self.free: OrderedDict[int, None] = OrderedDict()
        self._unused: list[int] = list(range(num_blocks - 1, -1, -1))
        self.cached: dict[bytes, int] = {}
        # Per sequence: hashes of its full blocks so far (parallel to the first entries of block_table).
        self._seq_hashes: dict[int, list[bytes]] = {}
        # Hashes of prompt blocks some running sequence is computing right now (not yet published), and
        # which sequence: a prompt that needs one of them next waits a step and then hits the cache,
        # instead of computing the same KV a second time.
        self.pending: dict[bytes, int] = {}
        self._seq_pending: dict[int, list[bytes]] = {}
        self.prefix_hits = 0  # blocks served from the cache (for stats and tests)
        self.prefix_queries = 0
        # Blocks handed out for the first time since the last pop_fresh(): the cache memory behind them
        # was never written, so the runner zeroes them (cheaper than zero-filling a huge cache up front).
        self._fresh: list[int] = []

    # ---- queries -------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free) + len(self._unused)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def num_blocks_ever_used(self) -> int:
        """Blocks handed out at least once: the part of the cache whose memory has been written."""
        return self.num_blocks - len(self._unused)

    def blocks_needed(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    # ---- allocation ----------------------------------------------------------------------------
    def _take_free(self) -> int:
        if self._unused and not (self.reuse_freed_first and self.free):
            block_id = self._unused.pop()
            self._fresh.append(block_id)
        else:
            block_id, _ = self.free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None:  # evict its cache entry: the block is about to hold other tokens
            if self.cached.get(block.hash) == block_id:
                del self.cached[block.hash]
            block.hash = None
        block.ref_count = 1
        return block_id

    def reset_prefix_cache(self) -> None:
        """Forget every cached block that no sequence holds (blocks in use keep theirs)."""
        for block_id in self.free:
            block = self.blocks[block_id]
            if block.hash is not None:
                if self.cached.get(block.hash) == block_id:
                    del self.cached[block.hash]
                block.hash = None

    def pop_fresh(self) -> list[int]:
        """Block ids used for the first time since the last call (their memory is uninitialised)."""
        fresh, self._fresh = self._fresh, []
        return fresh

    def _ref(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free[block_id]
        block.ref_count += 1

    def _prompt_hashes(self, seq: Sequence) -> list[bytes]:
        """Chained hashes of the sequence's full blocks, last token excluded (memoised per length)."""
        n = seq.num_tokens
        memo = getattr(seq, "_hash_memo", None)
        if memo is not None and memo[0] == n:
            return memo[1]
        bs = self.block_size
        tokens = seq.token_ids
        hashes: list[bytes] = []
        parent = None
        for i in range((n - 1) // bs):
            parent = chain_hash(parent, tokens[i * bs : (i + 1) * bs])
            hashes.append(parent)
        seq._hash_memo = (n, hashes)  # type: ignore[attr-defined]
        return hashes

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Cached block ids for the longest run of ``seq``'s full prompt blocks already in the cache.

        The last prompt token is never served from the cache: its logits are needed to sample. Nor is any
        prompt token of a sequence that still needs prompt logprobs: a cached position is never run.
        """
        if not self.enable_prefix_caching or seq.wants_prompt_logprobs:
            return []
        hits: list[int] = []
        for h in self._prompt_hashes(seq):
            block_id = self.cached.get(h)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def waits_for_pending(self, seq: Sequence, num_hits: int) -> bool:
        """True when the first block ``seq`` would compute is being computed by another sequence (never for a
        sequence that computes its whole prompt anyway, to score it: waiting would gain it nothing)."""
        if not self.enable_prefix_caching or not self.pending or seq.wants_prompt_logprobs:
            return False
        hashes = self._prompt_hashes(seq)
        return num_hits < len(hashes) and hashes[num_hits] in self.pending

    def allocate_prefix(self, seq: Sequence, hits: list[int]) -> None:
        """Attach cached blocks ``hits`` (from match_prefix) to a sequence being admitted."""
        assert not seq.block_table, "sequence already holds blocks"
        for block_id in hits:
            self._ref(block_id)
        seq.block_table = list(hits)
        self._seq_hashes[seq.seq_id] = [self.blocks[b].hash for b in hits]  # type: ignore[misc]
        n = len(hits) * self.block_size
        seq.num_computed_tokens = n
        seq.num_cached_tokens = n
        self.prefix_queries += max(0, (seq.num_tokens - 1) // self.block_size)
        self.prefix_hits += len(hits)
        if self.enable_prefix_caching:
            mine = [h for h in self._prompt_hashes(seq)[len(hits):] if h not in self.pending]
            for h in mine:
                self.pending[h] = seq.seq_id
            self._seq_pending[seq.seq_id] = mine

    def can_grow(self, seq: Sequence, num_new_tokens: int) -> bool:
        need = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        return need <= self.num_free_blocks

    def grow(self, seq: Sequence, num_new_tokens: int) -> None:
        """Make sure the block table covers the tokens computed this step. Call can_grow first."""
        need = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        if need > self.num_free_blocks:
            raise RuntimeError("out of KV blocks (the scheduler should have preempted)")
        for _ in range(need):
            seq.block_table.append(self._take_free())

    def commit_computed(self, seq: Sequence) -> None:
        """Publish the sequence's newly completed full blocks in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        hashes = self._seq_hashes.setdefault(seq.seq_id, [])
        bs = self.block_size
        num_full = seq.num_computed_tokens // bs
        if len(hashes) >= num_full:
            return
        tokens = seq.token_ids
        parent = hashes[-1] if hashes else None
        for i in range(len(hashes), num_full):
            parent = chain_hash(parent, tokens[i * bs : (i + 1) * bs])
            hashes.append(parent)
            if self.pending.get(parent) == seq.seq_id:
                del self.pending[parent]
            block = self.blocks[seq.block_table[i]]
            if block.hash is None and parent not in self.cached:
                block.hash = parent
                self.cached[parent] = block.block_id

    def free_seq(self, seq: Sequence) -> None:
        """Release a sequence's blocks (finished or preempted). Freed blocks go to the LRU tail;
        a sequence's later blocks are freed first so its prefix survives longest."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block_id] = None
        seq.block_table = []
        seq.num_computed_tokens = 0
        self._seq_hashes.pop(seq.seq_id, None)
        for h in self._seq_pending.pop(seq.seq_id, ()):
            if self.pending.get(h) == seq.seq_id:
                del self.pending[h]
