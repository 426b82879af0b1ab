"""BlockPool: the KV cache's blocks, their reference counts, and the prefix-cache map.

A block is free when its ref count is 0. Free blocks wait in one queue, reused from its
front: first freed blocks that hold nothing (no hash), then never-used blocks in id order,
then blocks that still hold a cached prefix, least recently freed first (until reused they
stay findable). Besides full blocks, a finished request's last, partial block is findable by its
tokens (`cache_partial`): a request that continues those tokens copies it into a block of its own
(copy-on-write) instead of computing them again, as beams do every step. Empty used blocks go first because their memory is already committed: on the
CPU the cache is lazily mapped, and a never-used block costs page faults on its first write
(docs/PERFORMANCE.md). Blocks are never freed twice: freeing one with ref count 0 is a bug
and raises.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

BlockHash = bytes


@dataclass(eq=False)
class KVCacheBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: BlockHash | None = None
    partial_hash: BlockHash | None = None  # a free block holding a prefix's last, partial block


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool):
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        # Queue order = reuse order: the first entry is reused (and evicted, if cached) first.
        self._free: OrderedDict[int, KVCacheBlock] = OrderedDict((b.block_id, b) for b in self.blocks)
        self._cached: dict[BlockHash, KVCacheBlock] = {}
        self._partial: dict[BlockHash, KVCacheBlock] = {}
        self.num_evictions = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use by some request (cached-but-free blocks count as free)."""
        return 1.0 - len(self._free) / self.num_blocks

    def get_new_blocks(self, n: int) -> list[KVCacheBlock]:
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} blocks with {len(self._free)} free")
        out = []
        for _ in range(n):
            _, block = self._free.popitem(last=False)
            if block.block_hash is not None:
                self._evict(block)
            if block.partial_hash is not None:
                if self._partial.get(block.partial_hash) is block:
                    del self._partial[block.partial_hash]
                block.partial_hash = None
            block.ref_cnt = 1
            out.append(block)
        return out

    def _evict(self, block: KVCacheBlock) -> None:
        if self._cached.get(block.block_hash) is block:
            del self._cached[block.block_hash]
        block.block_hash = None
        self.num_evictions += 1

    def get_cached_block(self, block_hash: BlockHash) -> KVCacheBlock | None:
        return self._cached.get(block_hash) if self.enable_caching else None

    def get_partial_block(self, partial_hash: BlockHash) -> KVCacheBlock | None:
        return self._partial.get(partial_hash) if self.enable_caching else None

    def cache_partial(self, block: KVCacheBlock, partial_hash: BlockHash) -> None:
        """Registers a block about to be freed that holds a prefix's last tokens, fewer than a block
        (the first such block wins; it stays findable until the free queue reuses it)."""
        if (not self.enable_caching or block.block_hash is not None or block.partial_hash is not None
                or partial_hash in self._partial):
            return
        block.partial_hash = partial_hash
        self._partial[partial_hash] = block

    def touch(self, blocks: list[KVCacheBlock]) -> None:
        """Takes a reference on cache-hit blocks, pulling free ones out of the free queue."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self._free[block.block_id]
            block.ref_cnt += 1

    def free_blocks(self, blocks: list[KVCacheBlock]) -> None:
        """Drops one reference of each; give them tail-first so a request's last blocks are evicted
        first. A block left holding no cached prefix goes to the front of the queue."""
        for block in blocks:
            if block.ref_cnt <= 0:
                raise RuntimeError(f"block {block.block_id} freed twice")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free[block.block_id] = block
                if block.block_hash is None and block.partial_hash is None:
                    self._free.move_to_end(block.block_id, last=False)

    def cache_block(self, block: KVCacheBlock, block_hash: BlockHash) -> None:
        """Registers a full block under its chained hash (first writer wins on duplicates)."""
        if not self.enable_caching or block.block_hash is not None:
            return
        if block_hash in self._cached:
            return  # an identical block is cached already; this copy stays private
        block.block_hash = block_hash
        self._cached[block_hash] = block

    def reset_prefix_cache(self) -> bool:
        """Forgets every cached prefix; only possible when no block is in use."""
        if len(self._free) != self.num_blocks:
            return False
        for block in self.blocks:
            block.block_hash = block.partial_hash = None
        self._cached.clear()
        self._partial.clear()
        return True

    def check_invariants(self) -> None:
        """For tests: free queue ⇔ ref 0, cache map consistent."""
        for block in self.blocks:
            assert block.ref_cnt >= 0, block
            assert (block.ref_cnt == 0) == (block.block_id in self._free), block
        for h, block in self._cached.items():
            assert block.block_hash == h
        for h, block in self._partial.items():
            assert block.partial_hash == h and block.ref_cnt == 0, block
