"""The paged KV bookkeeping on its own: allocation, refcounts, prefix hits, eviction."""

from __future__ import annotations

import pytest

from forge_batch.engine.block_manager import BlockManager, chain_hash
from forge_batch.engine.sampling_params import SamplingParams
from forge_batch.engine.sequence import Sequence

_ids = iter(range(10**6))


def seq(tokens: list[int]) -> Sequence:
    return Sequence(next(_ids), "r", 0, list(tokens), SamplingParams(), seed=0)


def admit(bm: BlockManager, s: Sequence) -> None:
    """Admit a whole prompt, compute it, and publish its blocks (what the engine does over steps)."""
    hits = bm.match_prefix(s)
    bm.allocate_prefix(s, hits)
    n = s.num_tokens - s.num_computed_tokens
    bm.grow(s, n)
    s.num_computed_tokens += n
    bm.commit_computed(s)


def test_allocate_and_free_returns_every_block():
    bm = BlockManager(num_blocks=8, block_size=4)
    s = seq(list(range(10)))  # 3 blocks
    admit(bm, s)
    assert len(s.block_table) == 3 and bm.num_free_blocks == 5
    assert all(bm.blocks[b].ref_count == 1 for b in s.block_table)
    bm.free_seq(s)
    assert bm.num_free_blocks == 8 and s.block_table == []


def test_growth_allocates_a_block_only_at_boundaries():
    bm = BlockManager(num_blocks=8, block_size=4)
    s = seq([1, 2, 3])
    admit(bm, s)
    assert len(s.block_table) == 1
    s.output_token_ids.append(9)  # 4th token still fits the first block
    bm.grow(s, 1)
    s.num_computed_tokens += 1
    assert len(s.block_table) == 1
    s.output_token_ids.append(10)  # 5th token needs a second block
    assert bm.can_grow(s, 1)
    bm.grow(s, 1)
    assert len(s.block_table) == 2


def test_prefix_hit_shares_full_blocks_with_refcount():
    bm = BlockManager(num_blocks=16, block_size=4)
    shared = list(range(100, 112))  # 3 full blocks
    a = seq(shared + [1, 2])
    admit(bm, a)
    b = seq(shared + [7, 8, 9])
    hits = bm.match_prefix(b)
    assert hits == a.block_table[:3]
    bm.allocate_prefix(b, hits)
    assert b.num_computed_tokens == 12 and b.num_cached_tokens == 12
    assert all(bm.blocks[x].ref_count == 2 for x in hits)
    bm.grow(b, 3)
    assert b.block_table[:3] == a.block_table[:3] and b.block_table[3] != a.block_table[3]
    bm.free_seq(a)
    assert all(bm.blocks[x].ref_count == 1 for x in hits)


def test_prefix_must_match_from_the_start():
    """Chained hashes: an equal block after a different prefix is not a hit."""
    bm = BlockManager(num_blocks=16, block_size=4)
    admit(bm, seq([1, 2, 3, 4, 5, 6, 7, 8, 0]))
    assert bm.match_prefix(seq([9, 9, 9, 9, 5, 6, 7, 8, 0])) == []
    assert chain_hash(None, [5, 6, 7, 8]) != chain_hash(chain_hash(None, [1, 2, 3, 4]), [5, 6, 7, 8])


def test_last_prompt_token_is_never_cached():
    """A prompt that is entirely cached still recomputes its last block, to get logits."""
    bm = BlockManager(num_blocks=16, block_size=4)
    p = list(range(8))
    admit(bm, seq(p))
    assert len(bm.match_prefix(seq(p))) == 1
    assert len(bm.match_prefix(seq(p + [99]))) == 2


def test_blocks_are_published_only_once_computed():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = seq(list(range(12)))
    bm.allocate_prefix(a, bm.match_prefix(a))
    bm.grow(a, 12)  # allocated, not yet computed
    assert bm.match_prefix(seq(list(range(12)) + [5])) == []
    a.num_computed_tokens = 8  # first chunk done
    bm.commit_computed(a)
    assert len(bm.match_prefix(seq(list(range(12)) + [5]))) == 2


def test_freed_blocks_stay_cached_until_evicted_lru():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = seq(list(range(8)) + [1])
    admit(bm, a)
    bm.free_seq(a)
    assert bm.num_free_blocks == 4
    again = seq(list(range(8)) + [2])
    hits = bm.match_prefix(again)
    assert len(hits) == 2  # still cached after free
    bm.allocate_prefix(again, hits)
    assert bm.num_free_blocks == 2 and all(bm.blocks[h].ref_count == 1 for h in hits)
    bm.free_seq(again)
    # Fill the whole cache with other tokens: the old blocks get evicted and lose their hash.
    other = seq(list(range(50, 66)))
    admit(bm, other)
    assert bm.match_prefix(seq(list(range(8)) + [3])) == []
    assert bm.num_free_blocks == 0


def test_lru_evicts_a_sequences_tail_before_its_head():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = seq(list(range(12)) + [1])  # 4 blocks, 3 full
    admit(bm, a)
    bm.free_seq(a)
    b = seq([7, 7, 7, 7, 1])  # needs 2 blocks: takes the two tail blocks of a
    admit(bm, b)
    assert len(bm.match_prefix(seq(list(range(12)) + [2]))) == 2


def test_out_of_blocks_raises_in_grow():
    bm = BlockManager(num_blocks=2, block_size=4)
    s = seq(list(range(8)))
    admit(bm, s)
    s.output_token_ids.append(1)
    assert not bm.can_grow(s, 1)
    with pytest.raises(RuntimeError):
        bm.grow(s, 1)


def test_prefix_caching_off_never_hits():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    admit(bm, seq(list(range(9))))
    assert bm.match_prefix(seq(list(range(9)))) == []


def test_reset_prefix_cache_forgets_free_blocks_only():
    bm = BlockManager(num_blocks=8, block_size=4)
    held = seq(list(range(9)))
    admit(bm, held)
    gone = seq(list(range(50, 59)))
    admit(bm, gone)
    bm.free_seq(gone)
    bm.reset_prefix_cache()
    assert bm.match_prefix(seq(list(range(50, 59)))) == []
    assert len(bm.match_prefix(seq(list(range(9))))) == 2  # still held by a running sequence


def test_reuse_freed_first_keeps_the_written_blocks_at_the_peak_in_use():
    """With reuse_freed_first (a CPU cache whose memory is committed on first write) one sequence after
    another reuses the same blocks; by default each takes never-used blocks until the cache is exhausted,
    keeping the finished prompts cached."""
    for reuse, expected in ((True, 3), (False, 64)):
        bm = BlockManager(num_blocks=64, block_size=4, reuse_freed_first=reuse)
        fresh = []
        for i in range(40):
            s = seq([1000 + i] + list(range(8)))  # distinct prompts, 3 blocks each
            admit(bm, s)
            fresh += bm.pop_fresh()
            bm.free_seq(s)
        assert bm.num_blocks_ever_used == expected == len(set(fresh))
        assert bm.num_free_blocks == 64


def test_reuse_freed_first_still_grows_into_never_used_blocks_and_keeps_hits():
    bm = BlockManager(num_blocks=16, block_size=4, reuse_freed_first=True)
    a, b = seq(list(range(9))), seq(list(range(50, 59)))
    admit(bm, a)
    admit(bm, b)  # nothing freed yet: b takes never-used blocks
    assert bm.num_blocks_ever_used == 6 and not set(a.block_table) & set(b.block_table)
    bm.free_seq(a)
    again = seq(list(range(8)) + [7])
    assert len(bm.match_prefix(again)) == 2  # freed blocks stay cached until reused
    c = seq(list(range(100, 105)))  # 2 blocks: taken from a's freed ones (its tail first), not new memory
    admit(bm, c)
    assert bm.num_blocks_ever_used == 6 and len(bm.match_prefix(again)) == 1
