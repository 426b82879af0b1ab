"""Plain torch references of the C kernels beside this file, one per entry point, same arguments.

Written to be read, not run in production: loops over sequences and tokens, float64 arithmetic
rounded once to the caller's dtype (except where a kernel promises torch's own roundings: the
residual add and rotary are computed in the dtype, as the model's torch path does them). The
layers' torch paths (model/layers/) are the fast torch code the kernels replace; these say what
each kernel computes. tests/kernels/test_cpu_reference.py holds every kernel to its reference;
the one-call decoder (decode_stack.py) is held to the per-op path (tests/kernels/test_cpu_decode_stack.py).
"""
from __future__ import annotations

import torch

GROUP = 32  # weights per quantised block (layers/block_quant.py)


def _round(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x.to(dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm(x) * weight; with a residual, h = x + residual is written over it and normalised."""
    h = x if residual is None else x + residual
    h64 = h.double()
    normed = h64 * torch.rsqrt(h64.pow(2).mean(-1, keepdim=True) + eps) * weight.double()
    if residual is None:
        return _round(normed, x.dtype)
    residual.copy_(h)
    return _round(normed, x.dtype), residual


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated_half = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated_half * sin


def rotary_(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
            sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates q [T, H, D] and k [T, KVH, D] in place by the fp32 tables' rows at `positions`."""
    c = cos[positions].unsqueeze(1).to(q.dtype)
    s = sin[positions].unsqueeze(1).to(q.dtype)
    q.copy_(_rotate(q, c, s))
    k.copy_(_rotate(k, c, s))
    return q, k


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[rows, 2 * inter] (gate, then up) → silu(gate) * up."""
    gate, up = gate_up.double().chunk(2, dim=-1)
    return _round(gate * torch.sigmoid(gate) * up, gate_up.dtype)


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Token t's k and v go to slot s = slot_mapping[t]: block s // block_size, offset s % block_size."""
    block_size = kv_cache.shape[2]
    for t, slot in enumerate(slot_mapping.tolist()):
        kv_cache[0, slot // block_size, slot % block_size] = k[t]
        kv_cache[1, slot // block_size, slot % block_size] = v[t]


def _context(kv_cache: torch.Tensor, block_table: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values [length, KVH, D] (float64) of a sequence's first `length` cache slots."""
    block_size = kv_cache.shape[2]
    slots = torch.arange(length)
    blocks = block_table[slots // block_size]
    return (kv_cache[0, blocks, slots % block_size].double(), kv_cache[1, blocks, slots % block_size].double())


def _attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, position: int, scale: float,
            sliding_window: int | None) -> torch.Tensor:
    """One query token q [H, D] at `position` over keys/values [S, KVH, D]: causal, within the window."""
    heads, kv_heads = q.shape[0], keys.shape[1]
    first = 0 if sliding_window is None else max(0, position - sliding_window + 1)
    out = torch.empty(q.shape, dtype=torch.float64)
    for h in range(heads):
        kvh = h // (heads // kv_heads)
        scores = keys[first:position + 1, kvh] @ q[h].double() * scale
        out[h] = torch.softmax(scores, dim=0) @ values[first:position + 1, kvh]
    return out


def paged_decode_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                           seq_lens: torch.Tensor, scale: float, sliding_window: int | None) -> torch.Tensor:
    """q [B, H, D], one query per sequence at its last position (seq_lens[b] - 1)."""
    out = torch.empty(q.shape, dtype=torch.float64)
    for b, length in enumerate(seq_lens.tolist()):
        keys, values = _context(kv_cache, block_tables[b], length)
        out[b] = _attend(q[b], keys, values, length - 1, scale, sliding_window)
    return _round(out, q.dtype)


def prefill_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                      query_starts: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                      sliding_window: int | None) -> torch.Tensor:
    """Request b's queries q[query_starts[b]:query_starts[b + 1]] are the last of its seq_lens[b]
    positions; each attends causally to the cache (this step's keys already written)."""
    out = torch.empty(q.shape, dtype=torch.float64)
    starts = query_starts.tolist()
    for b, length in enumerate(seq_lens.tolist()):
        keys, values = _context(kv_cache, block_tables[b], length)
        count = starts[b + 1] - starts[b]
        for i in range(count):
            out[starts[b] + i] = _attend(q[starts[b] + i], keys, values, length - count + i, scale, sliding_window)
    return _round(out, q.dtype)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [rows, k] @ weight [n, k]^T (+ bias): what linear_few_rows, and panel_linear on
    pack_panels(weight), compute (the packing is only a layout)."""
    out = x.double() @ weight.double().t()
    if bias is not None:
        out = out + bias.double()
    return _round(out, x.dtype)


linear_few_rows = linear
panel_linear = linear


def lora_rows(x: torch.Tensor, out: torch.Tensor, row_adapter: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
              part_ends: torch.Tensor) -> None:
    """out += each row's shrink (a_j x) and expand (b_j, part by part), in place (one rounding)."""
    rank, starts = b.shape[1], [0] + part_ends.tolist()[:-1]
    for r, j in enumerate(row_adapter.tolist()):
        if j < 0:
            continue
        shrunk = a[j].double() @ x[r].double()
        row = out[r].double()
        for p, (start, end) in enumerate(zip(starts, part_ends.tolist())):
            row[start:end] += shrunk[p * rank:(p + 1) * rank] @ b[j, :, start:end].double()
        out[r] = _round(row, out.dtype)


def panel_linear_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """silu_and_mul of the fused gate/up projection (weight [2 * inter, k]: gate rows, then up)."""
    gate_up = x.double() @ weight.double().t() + (0.0 if bias is None else bias.double())
    gate, up = gate_up.chunk(2, dim=-1)
    return _round(gate * torch.sigmoid(gate) * up, x.dtype)


def dequantize_blocks(blocks: torch.Tensor, bits: int, n: int, k: int) -> torch.Tensor:
    """The fp32 weight [n, k] that quantised blocks hold, read from their byte layout:
    4 bits (Q4_1): fp32 scale, fp32 min, 16 bytes, byte j = code of column j | code of column j + 16 << 4;
    8 bits (Q8_0): fp32 scale, 32 signed codes. Each weight is code * scale + min rounded once to fp32."""
    groups = blocks.reshape(n, k // GROUP, -1)
    scale = groups[..., 0:4].contiguous().view(torch.float32).double()
    if bits == 4:
        low = groups[..., 4:8].contiguous().view(torch.float32).double()
        packed = groups[..., 8:].to(torch.int64)
        codes = torch.cat([packed & 0xF, packed >> 4], dim=-1)
    else:
        low = torch.zeros_like(scale)
        codes = groups[..., 4:].contiguous().view(torch.int8).to(torch.int64)
    return (codes.double() * scale + low).float().reshape(n, k)


def linear_quant_rows(x: torch.Tensor, blocks: torch.Tensor, bits: int, n: int, k: int) -> torch.Tensor:
    return linear(x, dequantize_blocks(blocks, bits, n, k))


def panel_linear_blocks(x: torch.Tensor, blocks: torch.Tensor, bits: int, n: int,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    return linear(x, dequantize_blocks(blocks, bits, n, x.shape[1]), bias)


def quantize_blocks(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """fp32 weight [n, k] → blocks by llama.cpp's rules, per group of 32 columns, in fp32 operations:
    Q4_1: scale = (max - min) / 15, code = round((w - min) / scale) in 0..15;
    Q8_0: scale = max |w| / 127, code = round(w / scale) in -127..127 (a zero scale becomes 1)."""
    n, k = weight.shape
    groups = weight.float().reshape(n, k // GROUP, GROUP)
    as_bytes = lambda values: values.contiguous().unsqueeze(-1).view(torch.uint8)  # noqa: E731
    if bits == 4:
        low = groups.amin(-1)
        scale = (groups.amax(-1) - low) / 15
        scale = torch.where(scale > 0, scale, 1.0)
        codes = ((groups - low[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.uint8)
        packed = codes[..., :GROUP // 2] | (codes[..., GROUP // 2:] << 4)
        parts = [as_bytes(scale), as_bytes(low), packed]
    else:
        scale = groups.abs().amax(-1) / 127
        scale = torch.where(scale > 0, scale, 1.0)
        codes = (groups / scale[..., None]).round().clamp(-127, 127).to(torch.int8)
        parts = [as_bytes(scale), codes.view(torch.uint8)]
    return torch.cat(parts, dim=-1).reshape(n, -1)
