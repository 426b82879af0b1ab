"""KVCacheManager: per-request block tables on top of the BlockPool, and prefix-cache look-up.

A request's full blocks are keyed by a chained hash: blake2b(parent hash, the block's token
ids, extra keys such as a cache salt / LoRA id / the hashes of the images its tokens hold).
Equal hashes mean equal prefixes, so a new request whose first k blocks hash the same reuses
them instead of recomputing.
"""
from __future__ import annotations

import hashlib
from array import array
from dataclasses import dataclass

from asyncllm.core.block_pool import BlockHash, BlockPool, KVCacheBlock
from asyncllm.request import Request


def hash_block(parent: BlockHash | None, token_ids: list[int], extra: str | None) -> BlockHash:
    h = hashlib.blake2b(digest_size=16)
    h.update(parent or b"root")
    h.update(array("q", token_ids).tobytes())
    if extra is not None:
        h.update(b"\x00extra:" + extra.encode())
    return h.digest()


@dataclass
class PrefixCacheStats:
    queries: int = 0  # prompt tokens looked up
    hits: int = 0  # of those, served from the cache

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool):
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_blocks, enable_caching)
        self.req_blocks: dict[str, list[KVCacheBlock]] = {}
        self.req_hashes: dict[str, list[BlockHash]] = {}
        self.req_num_cached: dict[str, int] = {}  # how many of the request's blocks are registered
        self.stats = PrefixCacheStats()

    @property
    def usage(self) -> float:
        return self.pool.usage

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _block_hashes(self, request: Request, upto_tokens: int) -> list[BlockHash]:
        """Hashes of the request's full blocks within its first `upto_tokens` tokens (memoised)."""
        hashes = self.req_hashes.setdefault(request.request_id, [])
        bs = self.block_size
        while (len(hashes) + 1) * bs <= upto_tokens:
            i = len(hashes)
            parent = hashes[-1] if hashes else None
            hashes.append(hash_block(parent, request.token_ids(i * bs, (i + 1) * bs),
                                     request.block_key(i * bs, (i + 1) * bs)))
        return hashes

    def get_computed_blocks(self, request: Request) -> tuple[list[KVCacheBlock], int]:
        """Longest cached prefix of a request not yet started → (blocks, number of tokens)."""
        if not self.enable_caching:
            return [], 0
        # At least one token must be computed to produce logits, so never hit the whole prompt.
        hashes = self._block_hashes(request, request.num_tokens - 1)
        hits = []
        for h in hashes:
            block = self.pool.get_cached_block(h)
            if block is None:
                break
            hits.append(block)
        num_tokens = len(hits) * self.block_size
        self.stats.queries += request.num_tokens
        self.stats.hits += num_tokens
        return hits, num_tokens

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       computed_blocks: list[KVCacheBlock] | None = None) -> bool:
        """Makes room for `num_new_tokens` more tokens; False (nothing changed) when blocks run out."""
        blocks = self.req_blocks.get(request.request_id, [])
        computed_blocks = computed_blocks or []
        num_computed = request.num_computed_tokens + len(computed_blocks) * self.block_size
        total = num_computed + num_new_tokens
        need = self.blocks_needed(total) - len(blocks) - len(computed_blocks)
        # Cache hits sitting in the free queue are not free for this allocation.
        hits_free = sum(1 for b in computed_blocks if b.ref_cnt == 0)
        if need > self.pool.num_free_blocks - hits_free:
            return False
        if computed_blocks:
            self.pool.touch(computed_blocks)
            blocks = blocks + computed_blocks
        if need > 0:
            blocks = blocks + self.pool.get_new_blocks(need)
        self.req_blocks[request.request_id] = blocks
        self._cache_full_blocks(request, blocks, total)
        return True

    def _cache_full_blocks(self, request: Request, blocks: list[KVCacheBlock], num_tokens: int) -> None:
        """Registers blocks that are full once this step's tokens are written.

        Safe to do before the forward: a request hitting them in the same step runs in the
        same forward, where every layer writes all new K/V before attending.
        """
        if not self.enable_caching:
            return
        # Only tokens whose ids are known can be hashed: the sampled token of this step is not.
        num_full = min(num_tokens, request.num_tokens) // self.block_size
        start = self.req_num_cached.get(request.request_id, 0)
        if num_full <= start:
            return
        hashes = self._block_hashes(request, num_full * self.block_size)
        for i in range(start, num_full):
            self.pool.cache_block(blocks[i], hashes[i])
        self.req_num_cached[request.request_id] = num_full

    def get_partial_block(self, request: Request, num_hit: int) -> tuple[KVCacheBlock | None, int]:
        """After `num_hit` tokens of full-block hits: a free partial block holding the request's next
        m tokens (the longest, m < a block, at least one token left to compute) → (block, m), to be
        copied into the request's own next block; (None, 0) if none."""
        if not self.enable_caching:
            return None, 0
        bs = self.block_size
        hashes = self._block_hashes(request, num_hit)
        parent = hashes[num_hit // bs - 1] if num_hit else None
        for m in range(min(bs - 1, request.num_tokens - num_hit - 1), 0, -1):
            block = self.pool.get_partial_block(
                hash_block(parent, request.token_ids(num_hit, num_hit + m), request.block_key(num_hit, num_hit + m)))
            if block is not None:
                return block, m
        return None, 0

    def _cache_partial_block(self, request: Request, blocks: list[KVCacheBlock]) -> None:
        """The computed tokens in a leaving request's last, partial block stay findable."""
        bs, computed = self.block_size, request.num_computed_tokens
        full, m = divmod(computed, bs)
        if not self.enable_caching or m == 0 or full >= len(blocks) or blocks[full].ref_cnt != 1:
            return
        hashes = self._block_hashes(request, full * bs)
        parent = hashes[full - 1] if full else None
        self.pool.cache_partial(blocks[full], hash_block(parent, request.token_ids(full * bs, computed),
                                                         request.block_key(full * bs, computed)))

    def free(self, request: Request) -> None:
        blocks = self.req_blocks.pop(request.request_id, [])
        self._cache_partial_block(request, blocks)
        self.pool.free_blocks(list(reversed(blocks)))
        self.req_num_cached.pop(request.request_id, None)
        self.req_hashes.pop(request.request_id, None)

    def block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_blocks.get(request_id, [])]

    def num_used_blocks(self) -> int:
        return self.pool.num_blocks - self.pool.num_free_blocks
