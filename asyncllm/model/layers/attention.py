"""Attention over the paged KV cache: the metadata every backend reads, and the torch backend.

The batch is one flat run of tokens from many requests. Requests whose query is a single
token (decodes, or a 1-token prompt chunk) come first so they attend as one batched call;
each longer query (a prompt chunk) attends on its own. A backend first writes the step's
new K/V into their cache slots, then attends, so a request may read blocks another request
of the same step is filling (prefix-cache hits on blocks computed this step).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    num_decodes: int  # the first `num_decodes` requests have exactly one query token each
    query_start_loc: list[int]  # [B + 1] offsets of each request's tokens in the flat batch
    seq_lens: list[int]  # [B] context length after this step (cached + new tokens)
    seq_lens_tensor: torch.Tensor  # [B] int64, on the device
    block_tables: torch.Tensor  # [B, max_blocks] int64, padded with 0 (masked by seq_lens)
    slot_mapping: torch.Tensor  # [T] int64, cache slot of each new token
    # Per-step values every layer shares, built on first use (decode_context, prefill_query_starts).
    _memo: dict = field(default_factory=dict, repr=False)

    @property
    def num_requests(self) -> int:
        return len(self.seq_lens)

    def decode_context(self, sliding_window: int | None, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """For the decodes: the block ids to read, flat [nd * nblk] (padding points at block 0),
        and the additive mask [nd, 1, nblk * block_size] (0 where visible, -inf elsewhere).
        Built once per step and window, then shared by every layer."""
        key = ("decode", sliding_window)
        if key not in self._memo:
            nd, bs = self.num_decodes, block_size
            nblk = (max(self.seq_lens[:nd]) + bs - 1) // bs
            table = self.block_tables[:nd, :nblk]
            key_pos = torch.arange(nblk * bs, device=table.device)
            seq_lens = self.seq_lens_tensor[:nd, None]
            visible = key_pos[None, :] < seq_lens
            if sliding_window is not None:
                visible &= key_pos[None, :] >= seq_lens - sliding_window
            bias = torch.zeros(visible.shape, dtype=torch.float32, device=table.device)
            bias.masked_fill_(~visible, float("-inf"))
            self._memo[key] = (table.reshape(-1), bias[:, None, :])
        return self._memo[key]

    def whole_prompt_length(self, i: int) -> int | None:
        """Request i's token count if this step holds all of its context (a prompt with nothing
        cached), else None."""
        length = self.query_start_loc[i + 1] - self.query_start_loc[i]
        return length if length == self.seq_lens[i] else None

    def prefill_query_starts(self) -> tuple[torch.Tensor, int]:
        """The prompt chunks' query offsets relative to the first chunk ([B - nd + 1] int32, on the
        device) and the longest chunk: what the varlen prefill kernel takes. Built once per step."""
        if "prefill" not in self._memo:
            nd = self.num_decodes
            starts = [s - self.query_start_loc[nd] for s in self.query_start_loc[nd:]]
            longest = max(b - a for a, b in zip(starts, starts[1:]))
            self._memo["prefill"] = (torch.tensor(starts, dtype=torch.int32, device=self.slot_mapping.device),
                                     longest)
        return self._memo["prefill"]


class AttentionBackend(Protocol):
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q: [T, H, D]; k, v: [T, KVH, D]; kv_cache: [2, num_blocks, block_size, KVH, D] → [T, H, D]."""
        ...


FP8_KV_DTYPE = torch.float8_e4m3fn  # kv_cache_dtype="fp8": values saturate at +-448 (scale 1, as vLLM's default)


def _as_stored(kv_cache: torch.Tensor) -> torch.Tensor:
    """The cache as torch can copy and gather it: an fp8 cache as its bytes (torch has no fp8
    index_copy_ or index_select)."""
    return kv_cache.view(torch.uint8) if kv_cache.dtype == FP8_KV_DTYPE else kv_cache


def _widened(gathered: torch.Tensor, kv_cache: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows gathered from `_as_stored(kv_cache)` as `dtype` (an fp8 cache's bytes widened)."""
    return gathered.view(FP8_KV_DTYPE).to(dtype) if kv_cache.dtype == FP8_KV_DTYPE else gathered


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    if kv_cache.dtype == FP8_KV_DTYPE:  # torch has no fp8 index_copy_: move the bytes
        k, v = k.to(FP8_KV_DTYPE).view(torch.uint8), v.to(FP8_KV_DTYPE).view(torch.uint8)
    kv_cache = _as_stored(kv_cache)
    kv_cache[0].view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, k)
    kv_cache[1].view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, v)




class TorchAttentionBackend:
    """Reference backend: SDPA over K/V gathered through the block tables."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: int | None = None, softcap: float | None = None):
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.sliding_window = sliding_window
        # Attention logit soft-capping (Gemma 2): scores = cap * tanh(scores / cap) before the
        # mask and softmax. SDPA has no such option, so capped layers take _attend_capped.
        self.softcap = softcap

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        if kv_cache.dtype == FP8_KV_DTYPE:
            # This step's K/V as the cache will hold them, so a prompt attends alike whether its
            # keys come from this step or from the cache (a prefix-cache hit).
            k, v = k.to(FP8_KV_DTYPE).to(k.dtype), v.to(FP8_KV_DTYPE).to(v.dtype)
        self._write_kv(k, v, kv_cache, meta.slot_mapping)
        block_size = kv_cache.shape[2]
        nd = meta.num_decodes
        if nd == meta.num_requests:  # decodes only (most steps): their output is the whole answer
            return self._decode(q, kv_cache, meta, nd, block_size)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        if nd:
            out[:nd] = self._decode(q[:nd], kv_cache, meta, nd, block_size)
        i = nd
        while i < meta.num_requests:
            start, length = meta.query_start_loc[i], meta.whole_prompt_length(i)
            if length is None:  # a chunk with cached context: its K/V come from the cache
                end = meta.query_start_loc[i + 1]
                out[start:end] = self._prefill(q[start:end], kv_cache, meta.block_tables[i], meta.seq_lens[i],
                                               block_size)
                i += 1
                continue
            # A whole prompt (K/V are this step's), with the whole prompts of its length right after it.
            count = 1
            while i + count < meta.num_requests and meta.whole_prompt_length(i + count) == length:
                count += 1
            stop = meta.query_start_loc[i + count]
            out[start:stop] = self._prefill_fresh(q[start:stop], k[start:stop], v[start:stop], count)
            i += count
        return out

    def _write_kv(self, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        write_kv_cache(k, v, kv_cache, slot_mapping)

    def _gather_expanded(self, kv_cache: torch.Tensor, block_table: torch.Tensor,
                         dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of one request's blocks (`block_table`: [nblk]) → [H, nblk * block_size, D], KV
        heads repeated to the query heads: SDPA's fused CPU kernel refuses `enable_gqa` (and
        3-D inputs), and on its math path a 1024-token prefill took 1.94 s instead of 0.95 s.
        """
        readable = _as_stored(kv_cache)
        keys = _widened(readable[0][block_table], kv_cache, dtype)  # [..., nblk, bs, KVH, D]
        values = _widened(readable[1][block_table], kv_cache, dtype)
        shape = keys.shape[:-4] + (keys.shape[-4] * keys.shape[-3], self.num_kv_heads, self.head_dim)
        keys, values = keys.reshape(shape).transpose(-3, -2), values.reshape(shape).transpose(-3, -2)
        return self._expand_heads(keys), self._expand_heads(values)

    def _decode(self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                nd: int, block_size: int) -> torch.Tensor:
        """Batched decode attention without expanding KV heads or SDPA's masked math path.

        K and V of the decodes' blocks are gathered whole blocks at a time ([nd, S, KVH*D]; one
        index_select each over contiguous 12 KB rows runs at memcpy speed, 3x faster than a
        per-slot or advanced-index gather: measured). The queries become a block-diagonal
        [nd, H, KVH*D] matrix (query head h only has values in its KV head's D columns), so
        scores = Q @ K^T is one bmm over the gathered rows as they lie, and P @ V gives every
        head against every KV head, whose diagonal blocks are the answer.
        The products with the zero blocks cost KVH x the (small) attention FLOPs but no copies.
        """
        blocks, bias = meta.decode_context(self.sliding_window, block_size)
        kvh, dim, heads = self.num_kv_heads, self.head_dim, self.num_heads
        group = heads // kvh
        seq = bias.shape[2]
        num_blocks = kv_cache.shape[1]
        readable = _as_stored(kv_cache)
        keys = _widened(readable[0].view(num_blocks, -1).index_select(0, blocks), kv_cache, q.dtype)
        values = _widened(readable[1].view(num_blocks, -1).index_select(0, blocks), kv_cache, q.dtype)
        keys, values = keys.view(nd, seq, kvh * dim), values.view(nd, seq, kvh * dim)
        # q_diag[b, h, kvh(h) * D + d] = q[b, h, d], zeros elsewhere: [nd, H, KVH*D].
        q_diag = q.new_zeros(nd, kvh, group, kvh, dim)
        torch.diagonal(q_diag, dim1=1, dim2=3).copy_(q.view(nd, kvh, group, dim).permute(0, 2, 3, 1))
        scores = torch.bmm(q_diag.view(nd, heads, kvh * dim), keys.transpose(1, 2))  # [nd, H, S], rows contiguous
        scores.mul_(self.scale)
        if self.softcap is not None:
            scores = torch.tanh(scores / self.softcap) * self.softcap
        scores.add_(bias)
        probs = torch.softmax(scores, dim=-1)
        mixed = torch.bmm(probs, values)  # [nd, H, KVH*D]: every head against every KV head
        out = torch.diagonal(mixed.view(nd, kvh, group, kvh, dim), dim1=1, dim2=3)  # [nd, G, D, KVH]
        return out.permute(0, 3, 1, 2).reshape(nd, heads, dim)

    def _expand_heads(self, kv: torch.Tensor) -> torch.Tensor:
        """[..., KVH, S, D] → [..., H, S, D]: each KV head repeated for its query heads (SDPA's
        fused CPU kernel refuses `enable_gqa`; see _gather_expanded)."""
        if self.num_heads == self.num_kv_heads:
            return kv
        return kv.repeat_interleave(self.num_heads // self.num_kv_heads, dim=-3)

    def _prefill_fresh(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, count: int) -> torch.Tensor:
        """`count` prompt chunks of one length with no cached context, laid end to end (q [count * L,
        H, D]; k, v [count * L, KVH, D], as computed this step), each attending over its own K/V:
        no gather of their blocks from the cache (a wave of 8 x 128-token prompts spent ~40 of its
        ~85 ms of prefill attention gathering), and one SDPA call for all of them (8 x 128 tokens:
        104 -> 54 ms per 30 layers, the same values: each (prompt, head) is its own task either way)."""
        length = q.shape[0] // count
        keys = self._expand_heads(k.view(count, length, self.num_kv_heads, self.head_dim).transpose(1, 2))
        values = self._expand_heads(v.view(count, length, self.num_kv_heads, self.head_dim).transpose(1, 2))
        out = self._sdpa(q.view(count, length, self.num_heads, self.head_dim), keys, values, length)
        return out.reshape(q.shape)

    def _prefill(self, q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                 seq_len: int, block_size: int) -> torch.Tensor:
        nblk = (seq_len + block_size - 1) // block_size
        keys, values = self._gather_expanded(kv_cache, block_table[:nblk], q.dtype)  # [H, S', D]
        return self._sdpa(q[None], keys[None, :, :seq_len], values[None, :, :seq_len], seq_len)[0]

    def _sdpa(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, seq_len: int) -> torch.Tensor:
        """q [B, L, H, D] (the last L of seq_len positions) over keys, values [B, H, seq_len, D] →
        [B, L, H, D]."""
        q_len = q.shape[1]
        # 4-D [B, H, L, D]: the CPU's fused (flash) kernel takes only 4-D inputs; 3-D falls back to math.
        qh = q.transpose(1, 2)
        if self.softcap is not None:
            return self._attend_capped(qh, keys, values, seq_len).transpose(1, 2)
        if q_len == seq_len and self.sliding_window is None:
            out = F.scaled_dot_product_attention(qh, keys, values, is_causal=True, scale=self.scale)
        else:
            out = F.scaled_dot_product_attention(qh, keys, values, attn_mask=self._visible(q_len, seq_len, q.device),
                                                 scale=self.scale)
        return out.transpose(1, 2)

    def _visible(self, q_len: int, seq_len: int, device: torch.device) -> torch.Tensor:
        """[q_len, seq_len] bool: which keys the last q_len of seq_len positions attend to (causal,
        within the sliding window)."""
        q_pos = torch.arange(seq_len - q_len, seq_len, device=device)[:, None]
        k_pos = torch.arange(seq_len, device=device)[None, :]
        visible = k_pos <= q_pos
        if self.sliding_window is not None:
            visible &= k_pos > q_pos - self.sliding_window
        return visible

    def _attend_capped(self, qh: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, seq_len: int) -> torch.Tensor:
        """Soft-capped attention as transformers' eager Gemma 2: qh [B, H, L, D] (the last L
        positions) over keys, values [B, H, seq_len, D] → [B, H, L, D]."""
        scores = torch.matmul(qh, keys.transpose(-1, -2)) * self.scale
        scores = torch.tanh(scores / self.softcap) * self.softcap
        scores = scores.masked_fill(~self._visible(qh.shape[2], seq_len, qh.device), float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(qh.dtype)
        return torch.matmul(probs, values)
