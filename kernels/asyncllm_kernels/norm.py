"""Fused RMSNorm (+ residual add), computed like transformers' LlamaRMSNorm: fp32 statistics,
normalised value cast back to the input dtype, then scaled by the weight."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, residual_ptr, out_ptr, residual_out_ptr, w_ptr, stride_x, stride_r, eps,
                     n: tl.constexpr, N_P2: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, N_P2)
    keep = cols < n
    x = tl.load(x_ptr + row * stride_x + cols, mask=keep, other=0.0)
    if HAS_RESIDUAL:
        # Sums and products in fp32, rounded once to the storage dtype: what torch does for bf16/fp16
        # (and Triton's interpreter has no native bf16 arithmetic).
        r = tl.load(residual_ptr + row * stride_r + cols, mask=keep, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(r.dtype)
        tl.store(residual_out_ptr + row * n + cols, x, mask=keep)
    x32 = x.to(tl.float32)
    variance = tl.sum(x32 * x32, axis=0) / n
    normed = (x32 * (1.0 / tl.sqrt(variance + eps))).to(x.dtype)
    w = tl.load(w_ptr + cols, mask=keep)
    tl.store(out_ptr + row * n + cols, (w.to(tl.float32) * normed.to(tl.float32)).to(out_ptr.dtype.element_ty),
             mask=keep)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """x: [T, N]. Without `residual`: RMSNorm(x). With it: h = x + residual, returns (RMSNorm(h), h)."""
    rows, n = x.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    out = torch.empty((rows, n), dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    residual_out = torch.empty_like(x) if residual is not None else out
    if rows:
        _rms_norm_kernel[(rows,)](
            x, residual if residual is not None else x, out, residual_out, weight, x.stride(0),
            residual.stride(0) if residual is not None else 0, eps,
            n=n, N_P2=triton.next_power_of_2(n), HAS_RESIDUAL=residual is not None)
    return out if residual is None else (out, residual_out)


def rms_norm_reference(x, weight, eps, residual=None):
    h = x if residual is None else x + residual
    h32 = h.to(torch.float32)
    normed = h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * normed.to(h.dtype)
    return out if residual is None else (out, h)
