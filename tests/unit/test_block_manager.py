"""BlockManager: allocation, ref counts, chained prefix hashes, LRU eviction. No model, no torch."""

from __future__ import annotations

import pytest

from shoal.engine.block_manager import BlockManager
from shoal.engine.request import Request
from shoal.sampling_params import SamplingParams


def req(rid: str, tokens: list[int]) -> Request:
    return Request(rid, list(tokens), SamplingParams(max_tokens=4))


def admit(bm: BlockManager, r: Request) -> int:
    """Admit r like the scheduler does, compute all its tokens, hash its full blocks. Returns the hit tokens."""
    blocks, hit = bm.get_computed_blocks(r)
    assert bm.allocate_slots(r, r.num_tokens - hit, blocks)
    r.num_computed_tokens = r.num_tokens
    bm.cache_full_blocks(r)
    return hit


def test_allocate_grow_and_free() -> None:
    bm = BlockManager(8, 4)
    r = req("a", range(10))
    assert bm.allocate_slots(r, 10, [])
    assert len(r.block_ids) == 3 and len(set(r.block_ids)) == 3
    assert bm.num_free_blocks == 5 and bm.usage == pytest.approx(3 / 8)
    r.num_computed_tokens = 10
    r.append_output_token(99)
    assert bm.allocate_slots(r, 1)  # 11 tokens still fit in 3 blocks
    assert len(r.block_ids) == 3
    assert bm.allocate_slots(r, 3)  # 13 tokens need a 4th
    assert len(r.block_ids) == 4 and bm.num_free_blocks == 4
    bm.free(r)
    assert r.block_ids == [] and bm.num_free_blocks == 8 and bm.usage == 0.0
    assert all(bm.ref_count(b) == 0 for b in range(8))


def test_failed_allocation_changes_nothing() -> None:
    bm = BlockManager(3, 4)
    a, b = req("a", range(8)), req("b", range(100, 108))
    assert bm.allocate_slots(a, 8, [])
    assert not bm.allocate_slots(b, 8, [])
    assert b.block_ids == [] and b.num_computed_tokens == 0 and bm.num_free_blocks == 1


def test_prefix_hit_and_shared_ref_counts() -> None:
    bm = BlockManager(16, 4)
    a = req("a", list(range(9)))
    assert admit(bm, a) == 0
    b = req("b", list(range(8)) + [50, 51])
    blocks, hit = bm.get_computed_blocks(b)
    assert blocks == a.block_ids[:2] and hit == 8
    assert all(bm.ref_count(x) == 1 for x in blocks)  # lookup takes no references
    assert bm.allocate_slots(b, b.num_tokens - hit, blocks)
    assert b.num_computed_tokens == 8 and b.num_cached_tokens == 8 and len(b.block_ids) == 3
    assert [bm.ref_count(x) for x in b.block_ids] == [2, 2, 1]
    assert bm.num_free_blocks == 16 - 4  # a: 3 blocks, b: 1 new one
    bm.free(a)
    assert [bm.ref_count(x) for x in b.block_ids] == [1, 1, 1]
    assert bm.num_free_blocks == 16 - 3  # a's private tail came back; the shared head is still held
    bm.free(b)
    assert bm.num_free_blocks == 16 and bm.usage == 0.0
    assert bm.prefix_cache_queries == 9 + 10 and bm.prefix_cache_hits == 8
    assert bm.hit_rate == pytest.approx(8 / 19)


def test_hashes_are_chained() -> None:
    bm = BlockManager(16, 4)
    a = req("a", [1, 2, 3, 4, 5, 6, 7, 8, 0])
    admit(bm, a)
    # same second block, different first block: the whole prefix differs, so no hit at all
    c = req("c", [9, 9, 9, 9, 5, 6, 7, 8, 0])
    assert bm.get_computed_blocks(c) == ([], 0)
    assert c.block_hashes[1] != a.block_hashes[1]
    # same first block only: one block hit
    d = req("d", [1, 2, 3, 4, 0, 0, 0, 0, 0])
    assert bm.get_computed_blocks(d) == (a.block_ids[:1], 4)


def test_hit_is_capped_to_leave_one_token() -> None:
    bm = BlockManager(16, 4)
    a = req("a", range(12))
    admit(bm, a)
    assert bm.get_computed_blocks(req("b", range(12))) == (a.block_ids[:2], 8)  # (12 - 1) // 4 = 2
    assert bm.get_computed_blocks(req("c", range(13))) == (a.block_ids[:3], 12)
    assert bm.get_computed_blocks(req("d", range(4))) == ([], 0)


def test_lru_eviction_order() -> None:
    bm = BlockManager(6, 2)
    a, b = req("a", [1, 1, 2, 2, 3, 3, 0]), req("b", [4, 4, 5, 5])
    admit(bm, a)  # 4 blocks, the first 3 full and hashed
    admit(bm, b)  # 2 blocks, both hashed
    a_blocks = list(a.block_ids)
    assert bm.num_free_blocks == 0
    bm.free(a)  # tail first: [0] (unhashed) → free list; [3,3], [2,2], [1,1] → evictable, in that order
    bm.free(b)  # then [5,5], [4,4]
    assert bm.num_free_blocks == 6
    x = req("x", [7] * 6)
    assert bm.allocate_slots(x, 6, [])  # the free block, then evicts a's [3,3] and [2,2]
    assert a_blocks[2] in x.block_ids and a_blocks[1] in x.block_ids and a_blocks[3] in x.block_ids
    assert bm.get_computed_blocks(req("a2", [1, 1, 2, 2, 3, 3, 0])) == (a_blocks[:1], 2)
    assert bm.get_computed_blocks(req("b2", [4, 4, 5, 5, 0]))[1] == 4  # b, freed later, survived


def test_revived_blocks_count_against_free_space() -> None:
    bm = BlockManager(3, 2)
    a = req("a", [1, 1, 2, 2, 0])
    admit(bm, a)
    bm.free(a)  # 2 evictable + 1 free
    c = req("c", [9])
    assert bm.allocate_slots(c, 1, [])  # takes the plain free block
    b = req("b", [1, 1, 2, 2, 3, 3, 4])
    blocks, hit = bm.get_computed_blocks(b)
    assert hit == 4
    assert not bm.allocate_slots(b, 3, blocks)  # 2 revived + 2 new > 2 takeable
    assert b.block_ids == [] and b.num_computed_tokens == 0 and bm.num_free_blocks == 2
    assert not bm.allocate_slots(b, 1, blocks)  # 5 tokens: 2 revived + 1 new > 2 takeable
    bm.free(c)
    assert bm.allocate_slots(b, 1, blocks)  # now 3 takeable
    assert b.block_ids[:2] == blocks and bm.num_free_blocks == 0 and b.num_computed_tokens == 4


def test_duplicate_content_keeps_first_mapping() -> None:
    bm = BlockManager(8, 2)
    a, b = req("a", [1, 2, 3, 4, 0]), req("b", [1, 2, 3, 4, 9])
    for r in (a, b):  # both admitted before either is hashed: no sharing possible
        assert bm.allocate_slots(r, r.num_tokens, bm.get_computed_blocks(r)[0])
    for r in (a, b):
        r.num_computed_tokens = r.num_tokens
        bm.cache_full_blocks(r)
    assert [bm.block_hash(x) is not None for x in a.block_ids] == [True, True, False]
    assert [bm.block_hash(x) for x in b.block_ids] == [None, None, None]
    a_blocks = list(a.block_ids)
    bm.free(a)
    bm.free(b)
    assert bm.num_free_blocks == 8
    assert bm.get_computed_blocks(req("c", [1, 2, 3, 4, 5]))[0] == a_blocks[:2]


def test_prefix_caching_off() -> None:
    bm = BlockManager(8, 2, enable_prefix_caching=False)
    a = req("a", [1, 2, 3, 4, 0])
    assert admit(bm, a) == 0
    assert all(bm.block_hash(x) is None for x in a.block_ids)
    bm.free(a)
    assert bm.get_computed_blocks(req("b", [1, 2, 3, 4, 0])) == ([], 0)
    assert bm.prefix_cache_queries == 0 and bm.hit_rate == 0.0


def test_reset_prefix_cache() -> None:
    bm = BlockManager(8, 2)
    a = req("a", [1, 2, 3, 4, 0])
    admit(bm, a)
    assert not bm.reset_prefix_cache()  # a still holds its blocks
    bm.free(a)
    assert bm.reset_prefix_cache()
    assert bm.get_computed_blocks(req("b", [1, 2, 3, 4, 0])) == ([], 0)
    assert bm.num_free_blocks == 8 and bm.prefix_cache_queries == 0


def test_preempted_request_finds_its_own_blocks() -> None:
    bm = BlockManager(8, 2)
    a = req("a", [1, 2, 3, 4, 5])
    admit(bm, a)
    a.append_output_token(6)
    bm.free(a)  # preemption
    a.num_computed_tokens = 0
    a.num_preemptions = 1
    blocks, hit = bm.get_computed_blocks(a)
    assert hit == 4  # blocks [1,2] [3,4]; [5,6] was never computed
    assert bm.allocate_slots(a, a.num_tokens - hit, blocks)
    assert a.num_computed_tokens == 4 and a.num_cached_tokens == 0  # stays the first admission's count
