"""Fused mixture-of-experts MLP on Triton: two grouped GEMMs over (token, slot) pairs sorted by
expert, with no host synchronisation (vLLM's fused_moe shape, simplified).

Each program takes one expert, one block of that expert's pairs and one block of output columns;
blocks past the expert's count return at once (the grid is sized for the worst case, one expert
taking every pair, so nothing is read back to size it). The first GEMM gathers each pair's token
row and writes gate|up per pair, SiLU-and-multiply runs over those rows, the second GEMM scales
each pair's row by its routing weight, and the pairs of a token are summed. fp32 accumulates;
in fp32 the dots use IEEE precision (no TF32), so results match the torch reference closely.

Layout: w13 [experts, 2 * inter, hidden] (gate rows, then up rows), w2 [experts, hidden, inter]
(what asyncllm.model.layers.moe.SparseMoeBlock stacks from its experts' weights).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


# Triton's CPU interpreter computes tl.dot of bf16 / fp16 operands wrongly (measured: errors of
# 1e10 on a 16 x 16 product), so under it the operands go to fp32 first; compiled, they stay as
# they are (tensor cores).
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _grouped_gemm_kernel(x_ptr, w_ptr, pairs_ptr, offsets_ptr, scale_ptr, out_ptr, n, k, top_k, stride_x,
                         GATHER_TOKENS: tl.constexpr, SCALE: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    expert = tl.program_id(0)
    start = tl.load(offsets_ptr + expert)
    end = tl.load(offsets_ptr + expert + 1)
    first = start + tl.program_id(1) * BLOCK_M
    if first < end:
        idx = first + tl.arange(0, BLOCK_M)
        keep_m = idx < end
        pair = tl.load(pairs_ptr + idx, mask=keep_m, other=0).to(tl.int64)
        row = pair  # the input row: the pair's own (second GEMM), or its token's (first)
        if GATHER_TOKENS:
            row = pair // top_k
        cols = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
        keep_n = cols < n
        w_base = w_ptr + expert.to(tl.int64) * n * k
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, k, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            keep_k = ks < k
            a = tl.load(x_ptr + row[:, None] * stride_x + ks[None, :], mask=keep_m[:, None] & keep_k[None, :],
                        other=0.0)
            b = tl.load(w_base + cols[None, :] * k + ks[:, None], mask=keep_k[:, None] & keep_n[None, :], other=0.0)
            if UPCAST:
                a, b = a.to(tl.float32), b.to(tl.float32)
            if IEEE:
                acc += tl.dot(a, b, input_precision="ieee")
            else:
                acc += tl.dot(a, b)
        if SCALE:
            acc = acc * tl.load(scale_ptr + pair, mask=keep_m, other=0.0).to(tl.float32)[:, None]
        tl.store(out_ptr + pair[:, None] * n + cols[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=keep_m[:, None] & keep_n[None, :])


def _grouped_gemm(x, w, pairs, offsets, scale, pair_count, top_k, gather_tokens):
    experts, n, k = w.shape
    out = torch.empty(pair_count, n, dtype=x.dtype, device=x.device)
    block_m, block_n, block_k = 16, 64, 32
    grid = (experts, triton.cdiv(pair_count, block_m), triton.cdiv(n, block_n))
    _grouped_gemm_kernel[grid](x, w, pairs, offsets, scale if scale is not None else x, out, n, k, top_k,
                               x.stride(0), GATHER_TOKENS=gather_tokens, SCALE=scale is not None,
                               IEEE=x.dtype == torch.float32, UPCAST=_INTERPRETED and x.dtype != torch.float32,
                               BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return out


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
              ids: torch.Tensor) -> torch.Tensor:
    """x [T, hidden] → Σ_slots weights[t, s] · expert_{ids[t, s]}(x[t]) (SiLU gate/up MLP experts)."""
    tokens, top_k = ids.shape
    experts, hidden = w13.shape[0], x.shape[1]
    if not (w13.shape[2] == hidden and w2.shape[0] == experts and w2.shape[1] == hidden
            and w13.shape[1] == 2 * w2.shape[2] and x.stride(1) == 1 and w13.is_contiguous() and w2.is_contiguous()):
        raise ValueError("fused_moe: shapes or layout out of its contract")
    if tokens == 0:
        return torch.zeros_like(x)
    flat = ids.flatten()
    pairs = torch.argsort(flat, stable=True).to(torch.int32)
    offsets = torch.zeros(experts + 1, dtype=torch.int32, device=x.device)
    offsets[1:] = torch.cumsum(torch.bincount(flat, minlength=experts), 0)
    gate_up = _grouped_gemm(x, w13, pairs, offsets, None, tokens * top_k, top_k, True)
    inter = w2.shape[2]
    activated = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
    down = _grouped_gemm(activated, w2, pairs, offsets, weights.flatten().contiguous(), tokens * top_k, top_k, False)
    return down.view(tokens, top_k, hidden).sum(dim=1)


def fused_moe_reference(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
                        ids: torch.Tensor) -> torch.Tensor:
    """The same in float64, token by token."""
    inter = w2.shape[2]
    out = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
    for t in range(x.shape[0]):
        for s in range(ids.shape[1]):
            e = int(ids[t, s])
            gate_up = w13[e].double() @ x[t].double()
            out[t] += weights[t, s].double() * (w2[e].double() @ (F.silu(gate_up[:inter]) * gate_up[inter:]))
    return out.to(x.dtype)
