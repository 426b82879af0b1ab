"""KV write: the step's new K/V rows into their paged-cache slots (vLLM's reshape_and_cache)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _reshape_and_cache_kernel(k_ptr, v_ptr, cache_ptr, slot_ptr, stride_kt, stride_vt, cache_half,
                              block_size: tl.constexpr, row: tl.constexpr, ROW_P2: tl.constexpr):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token)
    if slot < 0:  # padding token: nothing to write
        return
    cols = tl.arange(0, ROW_P2)
    keep = cols < row
    # The cache is [2, num_blocks, block_size, KVH, D] contiguous: slot s's row starts at s * row.
    dest = slot.to(tl.int64) * row + cols
    tl.store(cache_ptr + dest, tl.load(k_ptr + token * stride_kt + cols, mask=keep), mask=keep)
    tl.store(cache_ptr + cache_half + dest, tl.load(v_ptr + token * stride_vt + cols, mask=keep), mask=keep)


def reshape_and_cache(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """k, v: [T, KVH, D] (rows contiguous); kv_cache: [2, num_blocks, block_size, KVH, D] contiguous;
    slot_mapping: [T] int (negative = skip)."""
    if not kv_cache.is_contiguous():
        raise ValueError("reshape_and_cache needs a contiguous kv_cache")
    tokens, kv_heads, head_dim = k.shape
    if tokens == 0:
        return
    k, v = k.reshape(tokens, -1), v.reshape(tokens, -1)
    if k.stride(1) != 1 or v.stride(1) != 1:
        k, v = k.contiguous(), v.contiguous()
    row = kv_heads * head_dim
    _reshape_and_cache_kernel[(tokens,)](
        k, v, kv_cache, slot_mapping, k.stride(0), v.stride(0), kv_cache[0].numel(),
        block_size=kv_cache.shape[2], row=row, ROW_P2=triton.next_power_of_2(row))


def reshape_and_cache_reference(k, v, kv_cache, slot_mapping) -> None:
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    kv_cache[0].view(-1, k.shape[1], k.shape[2])[slots] = k[keep]
    kv_cache[1].view(-1, v.shape[1], v.shape[2])[slots] = v[keep]
