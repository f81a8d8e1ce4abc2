"""BlockManager: the paged KV cache's bookkeeping — block ids, reference counts, prefix hashes.

Pure Python, no torch; the model runner owns the tensors, this file owns who holds which block.

Every block is in exactly one of three states:
  free       ref 0, no hash                 `_free` (deque)
  evictable  ref 0, hash of its full tokens `_evictable` (OrderedDict, least recently freed first)
  in use     ref ≥ 1 (shared when two requests start with the same cached prefix)

Prefix caching (nano-vllm / vLLM v1 style): once a block is full of computed tokens it gets a chained
hash, `hash((hash of the previous block or None, tuple(its tokens)))`, so equal hashes mean equal
whole prefixes. A freed hashed block stays findable until an allocation needs its slot: allocations
take free blocks first, then evict the least recently freed cached block.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass

from shoal.engine.request import Request


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None  # set ⇔ `_hash_to_block[hash] == block_id`
    token_ids: tuple[int, ...] = ()  # the tokens the hash stands for (guards against hash collisions)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks ≥ 1 and block_size ≥ 1, got {num_blocks} and {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._blocks = [Block(i) for i in range(num_blocks)]
        self._free: deque[int] = deque(range(num_blocks))
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._hash_to_block: dict[int, int] = {}
        self._num_hashed: dict[str, int] = {}  # request id → leading blocks already offered to the cache
        self.prefix_cache_queries = 0  # tokens of admitted requests looked up
        self.prefix_cache_hits = 0  # of those, tokens served from the cache

    # ------------------------------------------------------------------ capacity
    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can take now: free ones plus evictable cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by some request."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    @property
    def hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0

    def ref_count(self, block_id: int) -> int:
        return self._blocks[block_id].ref_count

    def block_hash(self, block_id: int) -> int | None:
        return self._blocks[block_id].hash

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ------------------------------------------------------------------ prefix cache
    def _hashes(self, req: Request, num_blocks: int) -> list[int]:
        """Chained hashes of req's first `num_blocks` full blocks, memoised on the request."""
        hashes, toks, bs = req.block_hashes, req.all_token_ids, self.block_size
        for i in range(len(hashes), num_blocks):
            hashes.append(hash((hashes[i - 1] if i else None, tuple(toks[i * bs : (i + 1) * bs]))))
        return hashes

    def get_computed_blocks(self, req: Request) -> tuple[list[int], int]:
        """Longest cached prefix of req's full blocks, leaving at least one token to compute.

        Takes no references; pass the result to `allocate_slots`, which also records the stats.
        """
        if not self.enable_prefix_caching:
            return [], 0
        max_blocks = (req.num_tokens - 1) // self.block_size
        toks, bs = req.all_token_ids, self.block_size
        found: list[int] = []
        for i, h in enumerate(self._hashes(req, max_blocks)[:max_blocks]):
            bid = self._hash_to_block.get(h)
            if bid is None or self._blocks[bid].token_ids != tuple(toks[i * bs : (i + 1) * bs]):
                break
            found.append(bid)
        return found, len(found) * bs

    def cache_full_blocks(self, req: Request) -> None:
        """Offer req's newly full (by `num_computed_tokens`) blocks to the prefix cache.

        A block whose hash some other block already holds stays private: the existing mapping wins.
        """
        if not self.enable_prefix_caching:
            return
        num_full = min(req.num_computed_tokens // self.block_size, len(req.block_ids))
        start = self._num_hashed.get(req.request_id, 0)
        if num_full <= start:
            return
        hashes, bs = self._hashes(req, num_full), self.block_size
        for i in range(start, num_full):
            h = hashes[i]
            block = self._blocks[req.block_ids[i]]
            if block.hash is None and h not in self._hash_to_block:
                block.hash, block.token_ids = h, tuple(req.all_token_ids[i * bs : (i + 1) * bs])
                self._hash_to_block[h] = block.block_id
        self._num_hashed[req.request_id] = num_full

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash and the stats. Refused (False) while any block is in use."""
        if self.num_free_blocks != self.num_blocks:
            return False
        for bid in self._evictable:
            self._blocks[bid].hash, self._blocks[bid].token_ids = None, ()
            self._free.append(bid)
        self._evictable.clear()
        self._hash_to_block.clear()
        self.prefix_cache_queries = self.prefix_cache_hits = 0
        return True

    # ------------------------------------------------------------------ allocate / free
    def _take_block(self) -> int:
        if self._free:
            bid = self._free.popleft()
        else:
            bid, _ = self._evictable.popitem(last=False)  # least recently freed cached block
            block = self._blocks[bid]
            del self._hash_to_block[block.hash]  # type: ignore[arg-type]
            block.hash, block.token_ids = None, ()
        self._blocks[bid].ref_count = 1
        return bid

    def allocate_slots(self, req: Request, num_new_tokens: int, computed_blocks: list[int] | None = None) -> bool:
        """Grow req's block table to cover its computed tokens + `num_new_tokens`.

        `computed_blocks` (first admission, from `get_computed_blocks`) become the head of the table
        and count as computed. Returns False, changing nothing, if the cache is too full.
        """
        cached = computed_blocks or []
        if computed_blocks is not None and (req.block_ids or req.num_computed_tokens):
            raise ValueError(f"request {req.request_id!r} already holds blocks; computed_blocks is for admission")
        num_computed = req.num_computed_tokens + len(cached) * self.block_size
        num_new_blocks = self.blocks_needed(num_computed + num_new_tokens) - len(req.block_ids) - len(cached)
        revived = sum(1 for bid in cached if self._blocks[bid].ref_count == 0)  # leave the evictable pool
        if num_new_blocks + revived > self.num_free_blocks:
            return False
        if computed_blocks is not None:
            for bid in cached:
                block = self._blocks[bid]
                if block.ref_count == 0:
                    del self._evictable[bid]
                block.ref_count += 1
            req.block_ids = list(cached)
            req.num_computed_tokens = num_computed
            if req.num_preemptions == 0:
                req.num_cached_tokens = num_computed
            self._num_hashed[req.request_id] = len(cached)
            self.prefix_cache_queries += req.num_tokens if self.enable_prefix_caching else 0
            self.prefix_cache_hits += num_computed
        for _ in range(num_new_blocks):
            req.block_ids.append(self._take_block())
        return True

    def free(self, req: Request) -> None:
        """Drop req's references, tail first, so its tail blocks are the first evicted."""
        for bid in reversed(req.block_ids):
            block = self._blocks[bid]
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.hash is not None:
                    self._evictable[bid] = None
                else:
                    self._free.append(bid)
        req.block_ids = []
        self._num_hashed.pop(req.request_id, None)
