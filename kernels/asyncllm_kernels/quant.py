"""Matmul against quantised weights kept in the C kernels' block layout (asyncllm/model/layers/
block_quant.py), so a GPTQ / AWQ / compressed-tensors / FP8 checkpoint or `quantization` runs
from its codes on CUDA too, never materialising the dense weight.

A weight row is a run of blocks, one per 32 inputs, read here as int32 words (every block is a
whole number of words):
  Q4_1 (bits 4, 6 words): fp32 scale, fp32 min, 16 bytes; byte j = code of column j | column j+16 << 4
  Q8_0 (bits 8, 9 words): fp32 scale, 32 signed bytes
  e4m3 (bits 9, 9 words): fp32 scale, 32 e4m3 bytes
Each program computes a BLOCK_M x BLOCK_N tile of the output: per group of 32 inputs it unpacks
its BLOCK_N rows' codes to fp32 (w = code * scale + min, as the C kernels compute them) and adds
x[:, group] @ w^T with tl.dot, accumulating in fp32.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

BLOCK_WORDS = {4: 6, 8: 9, 9: 9}
FP8_BITS = 9


@triton.jit
def _e4m3_to_f32(code):
    """e4m3 bytes (int32 0..255) → their fp32 values; subnormals (exponent 0) from the integer."""
    magnitude = code & 0x7F
    normal = ((magnitude << 20) + (120 << 23)).to(tl.float32, bitcast=True)
    subnormal = magnitude.to(tl.float32) * (1.0 / 512.0)
    value = tl.where(magnitude < 8, subnormal, normal)
    return tl.where((code & 0x80) != 0, -value, value)


@triton.jit
def _block_linear_kernel(x_ptr, w_ptr, out_ptr, rows, n, stride_x, stride_out, groups,
                         BITS: tl.constexpr, WORDS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         DOT_BF16: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_keep, n_keep = m < rows, cols < n
    c = tl.arange(0, 32)
    if BITS == 4:  # byte c % 16 of the codes (words 2..5), low nibble for c < 16
        word_of = 2 + (c % 16) // 4
        shift = ((c % 16) % 4) * 8 + (c // 16) * 4
    else:  # byte c of words 1..8
        word_of = 1 + c // 4
        shift = (c % 4) * 8
    row_words = groups * WORDS
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for g in range(groups):
        base = cols.to(tl.int64) * row_words + g * WORDS  # [BLOCK_N]
        scale = tl.load(w_ptr + base, mask=n_keep, other=0).to(tl.float32, bitcast=True)
        words = tl.load(w_ptr + base[:, None] + word_of[None, :], mask=n_keep[:, None], other=0)
        code = (words >> shift[None, :]) & (15 if BITS == 4 else 255)
        if BITS == 4:
            low = tl.load(w_ptr + base + 1, mask=n_keep, other=0).to(tl.float32, bitcast=True)
            w = code.to(tl.float32) * scale[:, None] + low[:, None]
        elif BITS == 8:
            w = tl.where(code > 127, code - 256, code).to(tl.float32) * scale[:, None]
        else:
            w = _e4m3_to_f32(code) * scale[:, None]
        x = tl.load(x_ptr + m[:, None].to(tl.int64) * stride_x + g * 32 + c[None, :], mask=m_keep[:, None], other=0.0)
        if DOT_BF16:
            acc += tl.dot(x.to(tl.bfloat16), tl.trans(w.to(tl.bfloat16)))
        else:
            acc += tl.dot(x.to(tl.float32), tl.trans(w), input_precision="ieee")
    tl.store(out_ptr + m[:, None].to(tl.int64) * stride_out + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=m_keep[:, None] & n_keep[None, :])


def block_linear(x: torch.Tensor, blocks: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """x [rows, k] (fp32, bf16 or fp16) @ the weight the blocks [n, k / 32 * block bytes] (uint8)
    hold, transposed → [rows, n] in x's dtype. fp32 x: an fp32 dot; 16-bit x: bf16 / fp16 tiles of
    the unpacked weights, fp32 accumulation."""
    if bits not in BLOCK_WORDS:
        raise ValueError(f"block_linear takes bits 4, 8 or {FP8_BITS} (e4m3), got {bits}")
    rows, k = x.shape
    if k % 32 or blocks.shape != (n, k // 32 * BLOCK_WORDS[bits] * 4) or blocks.dtype != torch.uint8:
        raise ValueError(f"blocks of shape {tuple(blocks.shape)} ({blocks.dtype}) do not hold a {n}x{k} weight in "
                         f"{bits}-bit blocks")
    if x.stride(1) != 1:
        x = x.contiguous()
    out = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    if rows == 0:
        return out
    block_m = 16 if rows <= 16 else 32 if rows <= 32 else 64
    block_n = 64
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    grid = (triton.cdiv(rows, block_m), triton.cdiv(n, block_n))
    _block_linear_kernel[grid](x, blocks.view(torch.int32), out, rows, n, x.stride(0), out.stride(0), k // 32,
                               BITS=bits, WORDS=BLOCK_WORDS[bits], BLOCK_M=block_m, BLOCK_N=block_n,
                               DOT_BF16=x.dtype != torch.float32 and not interpreted)
    return out


def block_linear_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight^T in float64, weight the blocks' dequantised fp32 weight."""
    return (x.double() @ weight.double().t()).to(x.dtype)
