"""Multi-LoRA products for a batch whose rows use different adapters (Punica's BGMV): each row
reads its own adapter's A and B, so one launch serves every adapter in the step.

Layout (as asyncllm.lora.layers.LoRAProjection.c_layout builds it): a [adapters, parts * rank, k]
(part p's A in rows p*rank ...), b [adapters, rank, n] (B^T times the scaling, part p's output
columns in [part_ends[p-1], part_ends[p])). `row_adapter[t]` is row t's adapter, -1 for the
base model (its row is left alone). Sums in fp32, the output rounded once to its dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_PARTS = 3  # a fused QKV projection


@triton.jit
def _lora_shrink_kernel(x_ptr, a_ptr, index_ptr, s_ptr, stride_x, k, width,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    keep_n = cols < width
    j = tl.load(index_ptr + row)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    if j >= 0:
        for k0 in range(0, k, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            keep_k = ks < k
            x = tl.load(x_ptr + row * stride_x + ks, mask=keep_k, other=0.0).to(tl.float32)
            a = tl.load(a_ptr + (j * width + cols[:, None]) * k + ks[None, :],
                        mask=keep_n[:, None] & keep_k[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(a * x[None, :], axis=1)
    tl.store(s_ptr + row * width + cols, acc, mask=keep_n)


@triton.jit
def _lora_expand_kernel(s_ptr, b_ptr, index_ptr, y_ptr, stride_y, n, rank, width, end0, end1,
                        BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = cols < n
    j = tl.load(index_ptr + row)
    if j >= 0:
        part = (cols >= end0).to(tl.int64) + (cols >= end1).to(tl.int64)  # each column's part
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for r in range(0, rank):
            s = tl.load(s_ptr + row * width + part * rank + r, mask=keep, other=0.0)
            b = tl.load(b_ptr + (j * rank + r) * n + cols, mask=keep, other=0.0).to(tl.float32)
            acc += s * b
        y = tl.load(y_ptr + row * stride_y + cols, mask=keep, other=0.0)
        tl.store(y_ptr + row * stride_y + cols, (y.to(tl.float32) + acc).to(y.dtype), mask=keep)


def lora_bgmv(x: torch.Tensor, y: torch.Tensor, row_adapter: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
              part_ends: tuple[int, ...]) -> None:
    """y [T, n] += each row's LoRA product, in place; x [T, k] (unit column stride)."""
    rows, k = x.shape
    adapters, width, _ = a.shape
    rank, n = b.shape[1], b.shape[2]
    if not (1 <= len(part_ends) <= MAX_PARTS and part_ends[-1] == n and width == len(part_ends) * rank
            and a.shape[2] == k and b.shape[0] == adapters and y.shape == (rows, n) and x.stride(1) == 1
            and y.stride(1) == 1 and a.is_contiguous() and b.is_contiguous() and row_adapter.shape == (rows,)):
        raise ValueError("lora_bgmv: shapes or layout out of its contract")
    if rows == 0:
        return
    ends = list(part_ends[:-1]) + [n] * (MAX_PARTS - len(part_ends))  # the first MAX_PARTS - 1 boundaries
    s = torch.empty(rows, width, dtype=torch.float32, device=x.device)
    _lora_shrink_kernel[(rows, triton.cdiv(width, 64))](x, a, row_adapter, s, x.stride(0), k, width,
                                                        BLOCK_N=64, BLOCK_K=128)
    _lora_expand_kernel[(rows, triton.cdiv(n, 128))](s, b, row_adapter, y, y.stride(0), n, rank, width, ends[0],
                                                     ends[1], BLOCK_N=128)


def lora_bgmv_reference(x: torch.Tensor, y: torch.Tensor, row_adapter: torch.Tensor, a: torch.Tensor,
                        b: torch.Tensor, part_ends: tuple[int, ...]) -> torch.Tensor:
    """What lora_bgmv leaves in y, as a new tensor (float64 sums, one rounding)."""
    out = y.double().clone()
    rank, starts = b.shape[1], (0,) + tuple(part_ends[:-1])
    for t, j in enumerate(row_adapter.tolist()):
        if j < 0:
            continue
        shrunk = a[j].double() @ x[t].double()
        for p, (start, end) in enumerate(zip(starts, part_ends)):
            out[t, start:end] += shrunk[p * rank:(p + 1) * rank] @ b[j, :, start:end].double()
    return out.to(y.dtype)
