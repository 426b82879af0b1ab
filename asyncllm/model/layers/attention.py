"""Attention over the paged KV cache: the metadata every backend reads, and the torch backend.

The batch is one flat run of tokens from many requests. Requests whose query is a single
token (decodes, or a 1-token prompt chunk) come first so they attend as one batched call;
each longer query (a prompt chunk) attends on its own. A backend first writes the step's
new K/V into their cache slots, then attends, so a request may read blocks another request
of the same step is filling (prefix-cache hits on blocks computed this step).
"""
from __future__ import annotations

from dataclasses import dataclass
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

    @property
    def num_requests(self) -> int:
        return len(self.seq_lens)


class AttentionBackend(Protocol):
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q: [T, H, D]; k, v: [T, KVH, D]; kv_cache: [2, num_blocks, block_size, KVH, D] → [T, H, D]."""
        ...


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    kv_cache[0].view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, k)
    kv_cache[1].view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, v)


class TorchAttentionBackend:
    """Reference backend: SDPA over K/V gathered through the block tables."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: int | None = None):
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.sliding_window = sliding_window

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        write_kv_cache(k, v, kv_cache, meta.slot_mapping)
        out = torch.empty_like(q)
        block_size = kv_cache.shape[2]
        nd = meta.num_decodes
        if nd:
            out[:nd] = self._decode(q[:nd], kv_cache, meta, nd, block_size)
        for i in range(nd, meta.num_requests):
            start, end = meta.query_start_loc[i], meta.query_start_loc[i + 1]
            out[start:end] = self._prefill(q[start:end], kv_cache, meta.block_tables[i], meta.seq_lens[i], block_size)
        return out

    def _gather(self, kv_cache: torch.Tensor, block_table: torch.Tensor,
                expand: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of the blocks in `block_table` ([..., nblk]) → [..., KVH or H, nblk * block_size, D].

        `expand` repeats KV heads to the query heads: SDPA's fused CPU kernel refuses `enable_gqa`
        (and masks), so where that kernel applies (prefill, one unmasked decode) expanding wins
        (1024-token prefill 1.94 s → 0.95 s). Batched masked decodes stay on the math path, where
        `enable_gqa` avoids copying K/V (expanding there halved W1 throughput: measured).
        """
        keys = kv_cache[0][block_table]  # [..., nblk, bs, KVH, D]
        values = kv_cache[1][block_table]
        shape = keys.shape[:-4] + (keys.shape[-4] * keys.shape[-3], self.num_kv_heads, self.head_dim)
        keys, values = keys.reshape(shape).transpose(-3, -2), values.reshape(shape).transpose(-3, -2)
        if expand and self.num_heads != self.num_kv_heads:
            group = self.num_heads // self.num_kv_heads
            keys = keys.repeat_interleave(group, dim=-3)
            values = values.repeat_interleave(group, dim=-3)
        return keys, values

    def _decode(self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                nd: int, block_size: int) -> torch.Tensor:
        max_len = max(meta.seq_lens[:nd])
        nblk = (max_len + block_size - 1) // block_size
        single = nd == 1 and self.sliding_window is None
        keys, values = self._gather(kv_cache, meta.block_tables[:nd, :nblk], expand=single)
        if single:
            # One sequence: no padding to mask, so the fused kernel applies (a mask forces the math path).
            length = meta.seq_lens[0]
            out = F.scaled_dot_product_attention(q.unsqueeze(2), keys[:, :, :length], values[:, :, :length],
                                                 scale=self.scale)
            return out.squeeze(2)
        key_pos = torch.arange(nblk * block_size, device=q.device)
        seq_lens = meta.seq_lens_tensor[:nd, None]
        mask = key_pos[None, :] < seq_lens
        if self.sliding_window is not None:
            mask &= key_pos[None, :] >= seq_lens - self.sliding_window
        out = F.scaled_dot_product_attention(
            q.unsqueeze(2), keys, values, attn_mask=mask[:, None, None, :], scale=self.scale,
            enable_gqa=self.num_heads != self.num_kv_heads)  # [B, H, 1, D]
        return out.squeeze(2)

    def _prefill(self, q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                 seq_len: int, block_size: int) -> torch.Tensor:
        q_len = q.shape[0]
        nblk = (seq_len + block_size - 1) // block_size
        keys, values = self._gather(kv_cache, block_table[:nblk], expand=True)  # [H, S', D]
        keys, values = keys[:, :seq_len], values[:, :seq_len]
        # 4-D [1, H, L, D]: the CPU's fused (flash) kernel takes only 4-D inputs; 3-D falls back to math.
        qh = q.transpose(0, 1).unsqueeze(0)
        keys, values = keys.unsqueeze(0), values.unsqueeze(0)
        if q_len == seq_len and self.sliding_window is None:
            out = F.scaled_dot_product_attention(qh, keys, values, is_causal=True, scale=self.scale)
        else:
            q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)[:, None]
            k_pos = torch.arange(seq_len, device=q.device)[None, :]
            mask = k_pos <= q_pos
            if self.sliding_window is not None:
                mask &= k_pos > q_pos - self.sliding_window
            out = F.scaled_dot_product_attention(qh, keys, values, attn_mask=mask, scale=self.scale)
        return out[0].transpose(0, 1)
