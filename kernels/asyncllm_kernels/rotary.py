"""Rotary position embedding (rotate-half layout, as transformers' Llama), in place on q and k."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate(ptr, stride_t, stride_h, token, heads, cos1, sin1, cos2, sin2,
            HALF: tl.constexpr, HEADS_P2: tl.constexpr, HALF_P2: tl.constexpr):
    h = tl.arange(0, HEADS_P2)[:, None]
    d = tl.arange(0, HALF_P2)[None, :]
    keep = (h < heads) & (d < HALF)
    base = ptr + token * stride_t + h * stride_h + d
    x1 = tl.load(base, mask=keep, other=0.0)
    x2 = tl.load(base + HALF, mask=keep, other=0.0)
    f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
    tl.store(base, (f1 * cos1 - f2 * sin1).to(x1.dtype), mask=keep)
    tl.store(base + HALF, (f2 * cos2 + f1 * sin2).to(x1.dtype), mask=keep)


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, pos_ptr, cos_ptr, sin_ptr, stride_qt, stride_qh, stride_kt, stride_kh,
                   num_heads, num_kv_heads, HEAD_DIM: tl.constexpr, HALF: tl.constexpr,
                   HALF_P2: tl.constexpr, HEADS_P2: tl.constexpr, KV_HEADS_P2: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + token).to(tl.int64)
    d = tl.arange(0, HALF_P2)[None, :]
    keep = d < HALF
    # The tables hold cat(freqs, freqs): the two halves may differ only for exotic rope types,
    # so both are read rather than assumed equal.
    cos1 = tl.load(cos_ptr + pos * HEAD_DIM + d, mask=keep, other=0.0)
    sin1 = tl.load(sin_ptr + pos * HEAD_DIM + d, mask=keep, other=0.0)
    cos2 = tl.load(cos_ptr + pos * HEAD_DIM + HALF + d, mask=keep, other=0.0)
    sin2 = tl.load(sin_ptr + pos * HEAD_DIM + HALF + d, mask=keep, other=0.0)
    _rotate(q_ptr, stride_qt, stride_qh, token, num_heads, cos1, sin1, cos2, sin2, HALF, HEADS_P2, HALF_P2)
    _rotate(k_ptr, stride_kt, stride_kh, token, num_kv_heads, cos1, sin1, cos2, sin2, HALF, KV_HEADS_P2, HALF_P2)


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                     cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates q [T, H, D] and k [T, KVH, D] in place (last dim contiguous) by the fp32 tables
    cos/sin [max_positions, D] at `positions` [T]; returns them."""
    tokens, heads, dim = q.shape
    if q.stride(2) != 1 or k.stride(2) != 1:
        raise ValueError("rotary_embedding needs the head dim contiguous")
    if tokens:
        half = dim // 2
        _rotary_kernel[(tokens,)](
            q, k, positions, cos, sin, q.stride(0), q.stride(1), k.stride(0), k.stride(1), heads, k.shape[1],
            HEAD_DIM=dim, HALF=half, HALF_P2=triton.next_power_of_2(half),
            HEADS_P2=triton.next_power_of_2(heads), KV_HEADS_P2=triton.next_power_of_2(k.shape[1]))
    return q, k


def rotary_reference(positions, q, k, cos, sin):
    c = cos[positions].unsqueeze(1).to(q.dtype)
    s = sin[positions].unsqueeze(1).to(q.dtype)

    def rotate_half(x):
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    return q * c + rotate_half(q) * s, k * c + rotate_half(k) * s
