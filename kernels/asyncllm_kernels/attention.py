"""Attention straight over the paged KV cache (no gathered copies), for decodes and prompt chunks.

The cache is [2, num_blocks, block_size, KVH, D] (K then V), addressed through per-request
block tables. Both kernels run an online softmax over the key blocks (flash-attention style),
so no [S]-long score row is ever stored.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


# Decode split-K (vLLM's paged attention v2, FlashDecoding): with few requests a context of many
# thousand tokens leaves most of the GPU idle in one program per (request, KV head), so the keys go
# in partitions of this many tokens, one program each, combined by a second kernel. Below two
# partitions the one-pass kernel writes the output directly.
DECODE_PARTITION = 512


@triton.jit
def _paged_decode_kernel(
        out_ptr, part_ptr, q_ptr, cache_ptr, table_ptr, seq_lens_ptr, scale, window,
        stride_qt, stride_qh, stride_ot, stride_oh, stride_tb, cache_half,
        num_kv_heads, group, head_dim, num_heads,
        BLOCK_SIZE: tl.constexpr, GROUP_P2: tl.constexpr, DIM_P2: tl.constexpr,
        PARTITION_BLOCKS: tl.constexpr, SPLIT: tl.constexpr):
    """One program per (request, KV head[, partition]): its `group` query heads share every K/V
    load. SPLIT: write this partition's running max, sum and unnormalised output to part_ptr
    ([B, H, partitions, DIM_P2 + 2] fp32) for _combine_partitions; else the output itself."""
    req = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    part = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + req)
    g = tl.arange(0, GROUP_P2)
    d = tl.arange(0, DIM_P2)
    g_keep, d_keep = g < group, d < head_dim
    heads = kvh * group + g
    q = tl.load(q_ptr + req * stride_qt + heads[:, None] * stride_qh + d[None, :],
                mask=g_keep[:, None] & d_keep[None, :], other=0.0).to(tl.float32)
    m = tl.full([GROUP_P2], float("-inf"), tl.float32)
    l = tl.zeros([GROUP_P2], tl.float32)
    acc = tl.zeros([GROUP_P2, DIM_P2], tl.float32)
    first_visible = tl.where(window > 0, tl.maximum(seq_len - window, 0), 0)
    offs = tl.arange(0, BLOCK_SIZE)
    row = num_kv_heads * head_dim
    j_start = first_visible // BLOCK_SIZE
    j_end = tl.cdiv(seq_len, BLOCK_SIZE)
    if SPLIT:
        j_start = tl.maximum(j_start, part * PARTITION_BLOCKS)
        j_end = tl.minimum(j_end, (part + 1) * PARTITION_BLOCKS)
    for j in range(j_start, j_end):
        block = tl.load(table_ptr + req * stride_tb + j).to(tl.int64)
        pos = j * BLOCK_SIZE + offs
        visible = (pos < seq_len) & (pos >= first_visible)
        addr = (block * BLOCK_SIZE + offs[:, None]) * row + kvh * head_dim + d[None, :]
        kv_keep = visible[:, None] & d_keep[None, :]
        k = tl.load(cache_ptr + addr, mask=kv_keep, other=0.0).to(tl.float32)
        v = tl.load(cache_ptr + cache_half + addr, mask=kv_keep, other=0.0).to(tl.float32)
        s = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale  # [G, BLOCK]
        s = tl.where(visible[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m = m_new
    if SPLIT:
        parts = tl.num_programs(2)
        base = ((req * num_heads + heads) * parts + part) * (DIM_P2 + 2)  # [G]
        tl.store(part_ptr + base[:, None] + d[None, :], acc, mask=g_keep[:, None])
        tl.store(part_ptr + base + DIM_P2, m, mask=g_keep)
        tl.store(part_ptr + base + DIM_P2 + 1, l, mask=g_keep)
    else:
        out = acc / l[:, None]
        tl.store(out_ptr + req * stride_ot + heads[:, None] * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=g_keep[:, None] & d_keep[None, :])


@triton.jit
def _combine_partitions(out_ptr, part_ptr, stride_ot, stride_oh, num_heads, head_dim, parts,
                        DIM_P2: tl.constexpr, PARTS_P2: tl.constexpr):
    """One program per (request, head): the partitions' outputs rescaled to the overall max and
    summed. A partition that saw no key has m = -inf and l = 0 and adds nothing."""
    req = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    p = tl.arange(0, PARTS_P2)
    d = tl.arange(0, DIM_P2)
    p_keep = p < parts
    base = ((req * num_heads + head) * parts + p) * (DIM_P2 + 2)
    m = tl.load(part_ptr + base + DIM_P2, mask=p_keep, other=float("-inf"))
    l = tl.load(part_ptr + base + DIM_P2 + 1, mask=p_keep, other=0.0)
    acc = tl.load(part_ptr + base[:, None] + d[None, :], mask=p_keep[:, None], other=0.0)
    top = tl.max(m, axis=0)
    weight = tl.where(p_keep & (l > 0), tl.exp(m - top), 0.0)
    out = tl.sum(acc * weight[:, None], axis=0) / tl.sum(l * weight, axis=0)
    tl.store(out_ptr + req * stride_ot + head * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d < head_dim)


def paged_decode_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                           seq_lens: torch.Tensor, scale: float, sliding_window: int | None = None,
                           out: torch.Tensor | None = None, partition: int = DECODE_PARTITION) -> torch.Tensor:
    """q: [B, H, D] (one query token per request); block_tables: [B, max_blocks]; seq_lens: [B]
    (context including this token) → [B, H, D]. The table's width bounds the context without a
    host sync (and stays fixed under a CUDA graph): from two partitions of `partition` tokens on,
    the keys are split (empty partitions of shorter requests return at once)."""
    batch, heads, dim = q.shape
    kv_heads, block_size = kv_cache.shape[3], kv_cache.shape[2]
    if out is None:
        out = torch.empty_like(q)
    if not batch:
        return out
    partition_blocks = max(1, partition // block_size)
    parts = -(-block_tables.shape[1] // partition_blocks)
    dim_p2 = triton.next_power_of_2(dim)
    split = parts > 1
    partials = torch.empty((batch, heads, parts, dim_p2 + 2) if split else (1,), dtype=torch.float32,
                           device=q.device)
    _paged_decode_kernel[(batch, kv_heads, parts if split else 1)](
        out, partials, q, kv_cache, block_tables, seq_lens, scale, sliding_window or 0,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0), kv_cache[0].numel(),
        kv_heads, heads // kv_heads, dim, heads,
        BLOCK_SIZE=block_size, GROUP_P2=triton.next_power_of_2(heads // kv_heads), DIM_P2=dim_p2,
        PARTITION_BLOCKS=partition_blocks, SPLIT=split)
    if split:
        _combine_partitions[(batch, heads)](out, partials, out.stride(0), out.stride(1), heads, dim, parts,
                                            DIM_P2=dim_p2, PARTS_P2=triton.next_power_of_2(parts))
    return out


@triton.jit
def _varlen_prefill_kernel(
        out_ptr, q_ptr, cache_ptr, table_ptr, query_start_ptr, seq_lens_ptr, scale, window,
        stride_qt, stride_qh, stride_ot, stride_oh, stride_tb, cache_half,
        num_kv_heads, group, head_dim,
        BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, DIM_P2: tl.constexpr, PRECISION: tl.constexpr,
        UPCAST: tl.constexpr):
    """One program per (request, query head, tile of BLOCK_M query tokens)."""
    req = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    tile = tl.program_id(2)
    q_start = tl.load(query_start_ptr + req)
    q_len = tl.load(query_start_ptr + req + 1) - q_start
    if tile * BLOCK_M >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + req)
    context = seq_len - q_len  # tokens already in the cache before this chunk
    kvh = head // group
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, DIM_P2)
    row_keep, d_keep = rows < q_len, d < head_dim
    q = tl.load(q_ptr + (q_start + rows)[:, None] * stride_qt + head * stride_qh + d[None, :],
                mask=row_keep[:, None] & d_keep[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    q_pos = context + rows  # absolute position of each query token
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DIM_P2], tl.float32)
    last_pos = tl.minimum(context + (tile + 1) * BLOCK_M, seq_len)  # causal: nothing past the tile's end
    first_block = tl.where(window > 0, tl.maximum(context + tile * BLOCK_M - window + 1, 0) // BLOCK_SIZE, 0)
    offs = tl.arange(0, BLOCK_SIZE)
    kv_row = num_kv_heads * head_dim
    for j in range(first_block, tl.cdiv(last_pos, BLOCK_SIZE)):
        block = tl.load(table_ptr + req * stride_tb + j).to(tl.int64)
        k_pos = j * BLOCK_SIZE + offs
        addr = (block * BLOCK_SIZE + offs[:, None]) * kv_row + kvh * head_dim + d[None, :]
        kv_keep = (k_pos < seq_len)[:, None] & d_keep[None, :]
        k = tl.load(cache_ptr + addr, mask=kv_keep, other=0.0)
        v = tl.load(cache_ptr + cache_half + addr, mask=kv_keep, other=0.0)
        if UPCAST:
            k, v = k.to(tl.float32), v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [BLOCK_M, BLOCK_SIZE]
        visible = (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] < seq_len)
        if window > 0:
            visible &= k_pos[None, :] > q_pos[:, None] - window
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
        alpha = tl.exp(m - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new
    out = acc / tl.where(l == 0.0, 1.0, l)[:, None]  # l == 0 only on padding rows past the chunk
    tl.store(out_ptr + (q_start + rows)[:, None] * stride_ot + head * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_keep[:, None] & d_keep[None, :])


def varlen_prefill_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                             query_start_loc: torch.Tensor, seq_lens: torch.Tensor, max_query_len: int,
                             scale: float, sliding_window: int | None = None,
                             out: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of many requests' query chunks over their cached context + the chunk.

    q: [T, H, D] (request i's tokens at query_start_loc[i]:query_start_loc[i+1], whose K/V are
    already written to the cache); seq_lens: [B] context length after the chunk → [T, H, D].
    """
    tokens, heads, dim = q.shape
    kv_heads, block_size = kv_cache.shape[3], kv_cache.shape[2]
    if block_size < 16:
        raise ValueError("varlen_prefill_attention needs block_size >= 16 (tl.dot's smallest tile)")
    if out is None:
        out = torch.empty_like(q)
    batch = seq_lens.shape[0]
    block_m = 16 if max_query_len <= 16 else 32
    if batch and tokens:
        grid = (batch, heads, triton.cdiv(max_query_len, block_m))
        _varlen_prefill_kernel[grid](
            out, q, kv_cache, block_tables, query_start_loc, seq_lens, scale, sliding_window or 0,
            q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0), kv_cache[0].numel(),
            kv_heads, heads // kv_heads, dim,
            BLOCK_SIZE=block_size, BLOCK_M=block_m, DIM_P2=max(16, triton.next_power_of_2(dim)),
            PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
            # Triton's interpreter has no bf16/fp16 matmul: there the tiles go through fp32.
            UPCAST=os.environ.get("TRITON_INTERPRET") == "1")
    return out


def paged_attention_reference(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                              query_start_loc: list[int], seq_lens: list[int], scale: float,
                              sliding_window: int | None = None) -> torch.Tensor:
    """Plain torch: gather each request's K/V through its block table, causal softmax attention
    (with the sliding window), fp32 arithmetic. Covers decodes (1-token queries) and chunks."""
    out = torch.empty_like(q)
    heads, kv_heads, block_size = q.shape[1], kv_cache.shape[3], kv_cache.shape[2]
    for i, seq_len in enumerate(seq_lens):
        start, end = query_start_loc[i], query_start_loc[i + 1]
        nblk = (seq_len + block_size - 1) // block_size
        blocks = block_tables[i, :nblk].long()
        keys = kv_cache[0][blocks].reshape(-1, kv_heads, q.shape[2])[:seq_len].float()
        values = kv_cache[1][blocks].reshape(-1, kv_heads, q.shape[2])[:seq_len].float()
        keys = keys.repeat_interleave(heads // kv_heads, dim=1).transpose(0, 1)  # [H, S, D]
        values = values.repeat_interleave(heads // kv_heads, dim=1).transpose(0, 1)
        queries = q[start:end].float().transpose(0, 1)  # [H, L, D]
        q_pos = torch.arange(seq_len - (end - start), seq_len, device=q.device)[:, None]
        k_pos = torch.arange(seq_len, device=q.device)[None, :]
        visible = k_pos <= q_pos
        if sliding_window:
            visible &= k_pos > q_pos - sliding_window
        scores = (queries @ keys.transpose(1, 2)) * scale
        scores = scores.masked_fill(~visible, float("-inf"))
        out[start:end] = (torch.softmax(scores, dim=-1) @ values).transpose(0, 1).to(q.dtype)
    return out
