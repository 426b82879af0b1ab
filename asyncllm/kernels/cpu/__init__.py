"""Fused CPU kernels for the per-layer small ops (C, built with gcc at first use, see library.py).

At batch 1 a decode step spends a third of its time dispatching ~40 small torch ops per layer;
at batch 64, gathering K/V copies for attention costs as much as a third of the projections.
These replace them with one call each: add + RMSNorm, rotary in place, SiLU-and-multiply, KV write,
and paged decode attention reading the cache where it lies; the matmul of a decode step's 2-8
rows, which MKL and oneDNN run well below the memory bandwidth it is bound by (layers/linear.py),
and the same against 4- and 8-bit blocks (layers/block_quant.py);
and the fp32 matmul of bigger steps against a weight packed into column panels (panel_gemm_impl.h);
and prompt attention over the paged cache on those panels' register tiles (fp32 arithmetic for
fp32 and bf16; prefill_attention_impl.h).
fp32 and bf16; other dtypes keep the torch path. decode_stack.py binds the call that runs all
of them for every layer of a small decode step at once (model/cpu_decode.py).
Each has a plain torch reference beside it (reference.py; tests/kernels/test_cpu_reference.py),
and is tested against the torch path it replaces too (tests/kernels/test_cpu_kernels.py).
"""
from __future__ import annotations

import torch

from asyncllm.kernels.cpu.library import KernelBuildError, build_error, cpu_has_amx, load_library

__all__ = ["KernelBuildError", "build_error", "supports", "rms_norm", "rotary_", "silu_and_mul", "write_kv_cache",
           "paged_decode_attention", "few_rows_supported", "few_rows_weight_supported", "linear_few_rows",
           "FEW_ROWS_MAX", "linear_quant_rows", "quantize_blocks", "panel_linear_blocks", "panel_weight_supported",
           "pack_panels", "panels_dtype", "bf16_kernels_serve", "panel_linear", "panel_linear_silu", "PANEL_MIN_ROWS", "prefill_attention", "prefill_attention_takes", "lora_rows",
           "LoRARows"]

_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}


def supports(*tensors: torch.Tensor) -> bool:
    """Whether the kernels take these tensors: CPU, fp32 or bf16."""
    return all(t.device.type == "cpu" and t.dtype in _SUFFIX for t in tensors)


def _typed(name: str, dtype: torch.dtype):
    return getattr(load_library(), f"{name}_{_SUFFIX[dtype]}")


def _rows_contiguous(t: torch.Tensor) -> bool:
    return t.stride(-1) == 1 and all(t.stride(i) == t.stride(i + 1) * t.shape[i + 1]
                                     for i in range(1, t.dim() - 1))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Without residual: RMSNorm(x). With it: h = x + residual → (RMSNorm(h), h); h is written
    into `residual` (the stream is owned by the forward) and returned."""
    x = x.contiguous()
    rows, hidden = x.shape
    out = torch.empty_like(x)
    if residual is not None:
        assert residual.is_contiguous() and residual.shape == x.shape
    _typed("rms_norm", x.dtype)(x.data_ptr(), None if residual is None else residual.data_ptr(),
                                None if residual is None else residual.data_ptr(), out.data_ptr(),
                                weight.data_ptr(), rows, hidden, eps, torch.get_num_threads())
    return out if residual is None else (out, residual)


def rotary_(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
            sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates q [T, H, D] and k [T, KVH, D] in place (heads contiguous within a token's row)."""
    assert _rows_contiguous(q) and _rows_contiguous(k) and positions.dtype == torch.int64
    tokens, heads, dim = q.shape
    _typed("rotary", q.dtype)(q.data_ptr(), q.stride(0), heads, k.data_ptr(), k.stride(0), k.shape[1],
                              positions.data_ptr(), cos.data_ptr(), sin.data_ptr(), tokens, dim,
                              torch.get_num_threads())
    return q, k


FEW_ROWS_MAX = 8  # most activation rows linear_few_rows takes
FP8_BITS = 9  # the block kernels' "bits" of e4m3 blocks (8-bit floats; QUANT_FP8 in quant_rows_impl.h)
BLOCK_BITS = (4, 8, FP8_BITS)  # block formats: Q4_1, Q8_0, e4m3 with a scale per 32
# Fewest rows an fp32 matmul with a panel copy (pack_panels) reads it rather than the dense weight
# through linear_few_rows: 1, so every step reads the panels and a row's result never depends on
# how many rows its step has (batch-invariant; issue 26). On AMD EPYC (AVX-512) the panels were
# as fast as linear_few_rows at 1-2 rows (the default model's projections + logits: 13.4 ms
# both) and faster from 3 (13.6 / 15.3 ms at 3 / 8 rows against 16.3 / 19.4); the per-op path
# and decode_stack both ask this, so they stay bit-equal.
PANEL_MIN_ROWS = 1


def few_rows_weight_supported(weight: torch.Tensor) -> bool:
    """Whether linear_few_rows takes this weight [n, k]: whole 16-row tiles, 16-wide k, contiguous."""
    return (supports(weight) and weight.dim() == 2 and weight.shape[0] % 16 == 0 and weight.shape[1] % 16 == 0
            and weight.is_contiguous())


def few_rows_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether linear_few_rows takes x [rows, k] @ weight [n, k]^T. The row count is checked
    first: callers ask on every matmul, and most steps have more rows."""
    return (x.dim() == 2 and 1 <= x.shape[0] <= FEW_ROWS_MAX and supports(x) and x.dtype == weight.dtype
            and x.shape[1] % 16 == 0 and x.stride(1) == 1 and few_rows_weight_supported(weight))


def linear_few_rows(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(x, weight) for the few rows of a decode step (see few_rows_supported)."""
    rows, k = x.shape
    out = torch.empty(rows, weight.shape[0], dtype=x.dtype)
    _typed("linear_few_rows", x.dtype)(x.data_ptr(), x.stride(0), weight.data_ptr(), out.data_ptr(), rows,
                                       weight.shape[0], k, torch.get_num_threads())
    return out


class LoRARows:
    """lora_rows with one projection's adapter tensors checked and bound once: a [adapters,
    parts * rank, k] and b [adapters, rank, n] (fp32 or bf16, the activations' dtype;
    lora/layers.py, LoRAProjection.c_layout); part p of the shrink (rank values) feeds the
    output columns before part_ends[p]. The call checks nothing (it runs for every projection of
    every step): x [rows, k] and out [rows, n] of a's dtype with unit column stride, 1-FEW_ROWS_MAX
    rows, row_adapter [rows] int64 (-1: the base model)."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, part_ends: torch.Tensor):
        adapters, width, k = a.shape
        parts, rank, n = part_ends.shape[0], b.shape[1], b.shape[2]
        if not (supports(a, b) and a.dtype == b.dtype and a.is_contiguous() and b.is_contiguous()
                and width == parts * rank and b.shape[0] == adapters and part_ends.dtype == torch.int64
                and part_ends.is_contiguous() and int(part_ends[-1]) == n):
            raise ValueError("lora_rows: adapter tensors' shapes, dtypes or layout out of its contract")
        self._keep = (a, b, part_ends)
        self._fn = _typed("lora_rows", a.dtype)
        self._args = (rank, a.data_ptr(), b.data_ptr(), parts, part_ends.data_ptr(), n, k)

    def __call__(self, x: torch.Tensor, out: torch.Tensor, row_adapter: torch.Tensor) -> None:
        rank, a, b, parts, part_ends, n, k = self._args
        self._fn(x.data_ptr(), x.stride(0), x.shape[0], row_adapter.data_ptr(), rank, a, b, parts, part_ends,
                 out.data_ptr(), out.stride(0), n, k, torch.get_num_threads())


def lora_rows(x: torch.Tensor, out: torch.Tensor, row_adapter: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
              part_ends: torch.Tensor) -> None:
    """out [rows, n] += each row's LoRA product, in place, for 1-FEW_ROWS_MAX rows of x [rows, k]:
    row r uses adapter j = row_adapter[r] (-1: none); see LoRARows."""
    rows, k = x.shape
    if not (1 <= rows <= FEW_ROWS_MAX and supports(x) and out.dtype == x.dtype == a.dtype and out.shape[0] == rows
            and x.stride(1) == 1 and out.stride(1) == 1 and a.shape[2] == k and out.shape[1] == b.shape[2]
            and row_adapter.dtype == torch.int64 and row_adapter.shape == (rows,)
            and row_adapter.is_contiguous()):
        raise ValueError("lora_rows: activations out of its contract")
    LoRARows(a, b, part_ends)(x, out, row_adapter)


def linear_quant_rows(x: torch.Tensor, blocks: torch.Tensor, bits: int, n: int, k: int) -> torch.Tensor:
    """x [rows, k] @ w^T for 1-FEW_ROWS_MAX rows, w [n, k] as 4- or 8-bit blocks
    (layers/block_quant.py; k % 32 == 0, n % 16 == 0)."""
    rows = x.shape[0]
    if not (x.dim() == 2 and 1 <= rows <= FEW_ROWS_MAX and x.shape[1] == k and supports(x)):
        raise ValueError(f"linear_quant_rows takes 1-{FEW_ROWS_MAX} fp32/bf16 CPU rows of {k}, got "
                         f"{tuple(x.shape)} {x.dtype} on {x.device}")
    if x.stride(1) != 1:
        x = x.contiguous()
    assert blocks.dtype == torch.uint8 and blocks.is_contiguous() and blocks.shape[0] == n
    assert bits in BLOCK_BITS and k % 32 == 0 and n % 16 == 0
    out = torch.empty(rows, n, dtype=x.dtype)
    _typed("linear_quant_rows", x.dtype)(x.data_ptr(), x.stride(0), blocks.data_ptr(), bits, out.data_ptr(), rows,
                                         n, k, torch.get_num_threads())
    return out


def quantize_blocks(weight: torch.Tensor, bits: int, block_bytes: int) -> tuple[torch.Tensor, int]:
    """fp32 weight [n, k] (k % 32 == 0) → (blocks [n, k / 32 * block_bytes] uint8, how many weights
    the blocks do not give back exactly), by the same rules and fp32 operations as layers/int4.py."""
    assert weight.dtype == torch.float32 and weight.dim() == 2 and weight.stride(1) == 1 and bits in (4, 8)
    n, k = weight.shape
    assert k % 32 == 0
    blocks = torch.empty(n, k // 32 * block_bytes, dtype=torch.uint8)
    misses = load_library().quantize_blocks_f32(weight.data_ptr(), weight.stride(0), n, k, bits, blocks.data_ptr(),
                                                torch.get_num_threads())
    return blocks, int(misses)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[rows, 2 * inter] (gate, then up) → silu(gate) * up [rows, inter]."""
    gate_up = gate_up.contiguous()
    rows, width = gate_up.shape
    out = torch.empty(rows, width // 2, dtype=gate_up.dtype)
    _typed("silu_and_mul", gate_up.dtype)(gate_up.data_ptr(), out.data_ptr(), rows, width // 2,
                                          torch.get_num_threads())
    return out


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """k, v: [T, KVH, D] → their slots of kv_cache [2, num_blocks, block_size, KVH, D]."""
    assert _rows_contiguous(k) and _rows_contiguous(v) and kv_cache.is_contiguous()
    assert slot_mapping.dtype == torch.int64 and slot_mapping.is_contiguous()
    size = k.element_size()
    load_library().write_kv_cache(k.data_ptr(), k.stride(0) * size, v.data_ptr(), v.stride(0) * size,
                                  kv_cache[0].data_ptr(), kv_cache[1].data_ptr(), slot_mapping.data_ptr(),
                                  k.shape[0], k.shape[1] * k.shape[2] * size, torch.get_num_threads())


def paged_decode_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                           seq_lens: torch.Tensor, scale: float, sliding_window: int | None) -> torch.Tensor:
    """One query token per sequence: q [B, H, D] → [B, H, D], attending over each sequence's
    first seq_lens[b] cache slots through block_tables [B, max_blocks] (int64)."""
    assert _rows_contiguous(q) and kv_cache.is_contiguous() and kv_cache.dtype == q.dtype
    assert block_tables.dtype == torch.int64 and block_tables.stride(1) == 1
    assert seq_lens.dtype == torch.int64 and seq_lens.is_contiguous()
    seqs, heads, dim = q.shape
    _, _, block_size, kv_heads, _ = kv_cache.shape
    out = torch.empty(seqs, heads, dim, dtype=q.dtype)
    _typed("paged_decode_attention", q.dtype)(
        q.data_ptr(), q.stride(0), kv_cache[0].data_ptr(), kv_cache[1].data_ptr(), block_tables.data_ptr(),
        block_tables.stride(0), seq_lens.data_ptr(), out.data_ptr(), seqs, heads, kv_heads, dim, block_size,
        scale, sliding_window or 0, torch.get_num_threads())
    return out


def bf16_kernels_serve() -> bool:
    """Whether bf16 models take the C kernels' bf16 panel GEMM and prompt attention (batch-invariant,
    issue 26) rather than oneDNN's packed weights and torch's SDPA: everywhere but on AMX CPUs, where
    oneDNN and SDPA run on the tiles and ours (no AMX tile kernel yet) were never measured against
    them; there bf16 keeps the measured torch path, and is not batch-invariant."""
    return not cpu_has_amx()


def prefill_attention_takes(dtype: torch.dtype) -> bool:
    """Whether prompt attention in this dtype goes to prefill_attention: fp32 always; bf16 where
    bf16_kernels_serve (measured on AVX-512-BF16 without AMX: 2x torch's bf16 SDPA). Only this
    kernel gives a prompt row the bits a decode step gives it, which keeps greedy output
    independent of chunking, the prefix cache and preemption."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and bf16_kernels_serve())


def prefill_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                      query_starts: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                      sliding_window: int | None) -> torch.Tensor:
    """Prompt chunks laid end to end, fp32 or bf16: q [T, H, D] → [T, H, D]. Request b's queries are rows
    [query_starts[b], query_starts[b + 1]) (int64, starting at 0), the last of its seq_lens[b]
    positions; each attends causally (within `sliding_window`) to the keys and values in the
    cache slots block_tables [B, max_blocks] lists, this step's already written."""
    assert supports(q) and q.dtype == kv_cache.dtype and kv_cache.is_contiguous()
    assert q.stride(2) == 1 and q.stride(1) == q.shape[2]
    assert block_tables.dtype == torch.int64 and block_tables.stride(1) == 1
    assert query_starts.dtype == seq_lens.dtype == torch.int64 and query_starts.is_contiguous()
    assert seq_lens.is_contiguous() and query_starts.shape[0] == seq_lens.shape[0] + 1 == block_tables.shape[0] + 1
    tokens, heads, dim = q.shape
    _, _, block_size, kv_heads, _ = kv_cache.shape
    out = torch.empty(tokens, heads, dim, dtype=q.dtype)
    if load_library().prefill_attention(
            q.data_ptr(), q.stride(0), kv_cache[0].data_ptr(), kv_cache[1].data_ptr(), block_tables.data_ptr(),
            block_tables.stride(0), query_starts.data_ptr(), seq_lens.data_ptr(), seq_lens.shape[0], heads,
            kv_heads, dim, block_size, scale, sliding_window or 0, out.data_ptr(), q.dtype == torch.bfloat16,
            torch.get_num_threads()):
        raise MemoryError("no memory for the prefill attention's buffers")
    return out


def panel_weight_supported(weight: torch.Tensor) -> bool:
    """Whether pack_panels takes this weight [n, k]: fp32, or bf16 with k even, on the CPU, elements of
    a row adjacent."""
    return (supports(weight) and weight.dim() == 2 and weight.stride(1) == 1
            and (weight.dtype == torch.float32 or weight.shape[1] % 2 == 0))


def pack_panels(weight: torch.Tensor) -> torch.Tensor:
    """The weight [n, k] in panel_linear's layout, columns side by side, zero past n: fp32 [panels, k,
    panel width]; bf16 [panels, k / 2, panel width] int32 words, each two adjacent inputs' weights
    (panel_gemm_bf16_impl.h). A copy: the weight itself is left as it is."""
    assert panel_weight_supported(weight)
    n, k = weight.shape
    lib = load_library()
    width = lib.panel_width()
    panels = (n + width - 1) // width
    if weight.dtype == torch.bfloat16:
        packed = torch.empty(panels, k // 2, width, dtype=torch.int32)
        lib.pack_panels_bf16(weight.data_ptr(), weight.stride(0), packed.data_ptr(), n, k, torch.get_num_threads())
        return packed
    packed = torch.empty(panels, k, width, dtype=torch.float32)
    lib.pack_panels_f32(weight.data_ptr(), weight.stride(0), packed.data_ptr(), n, k, torch.get_num_threads())
    return packed


def panel_rows(packed: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Rows `rows` [m] of the weight pack_panels packed → [m, k] in its dtype, bit for bit: row r is
    column r % width of panel r // width (bf16: each int32 word two adjacent inputs, the first in its
    low half)."""
    width = packed.shape[2]
    values = packed[rows // width, :, rows % width]  # [m, k] (bf16: [m, k / 2] words)
    return values.contiguous().view(torch.bfloat16) if packed.dtype == torch.int32 else values


def unpack_panels(packed: torch.Tensor, n: int) -> torch.Tensor:
    """pack_panels' inverse: the weight [n, k] back out of its panels (a copy, bit for bit)."""
    return panel_rows(packed, torch.arange(n))


def panels_dtype(packed: torch.Tensor) -> torch.dtype:
    """The dtype of the weight pack_panels made these panels of."""
    return torch.bfloat16 if packed.dtype == torch.int32 else torch.float32


def _panel_call(x: torch.Tensor, n: int, bias: torch.Tensor | None, dtype: torch.dtype = torch.float32,
                out_width: int | None = None) -> tuple[torch.Tensor, torch.Tensor, int | None]:
    """What the panel GEMMs take: x [rows, k] in `dtype` with adjacent elements, its output [rows,
    out_width (default n)], and the bias's pointer (None: no bias; checked to be [n], `dtype`, contiguous)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    assert x.dtype == dtype and x.dim() == 2
    if bias is not None:
        assert bias.dtype == dtype and bias.is_contiguous() and bias.shape == (n,)
    out = torch.empty(x.shape[0], n if out_width is None else out_width, dtype=dtype)
    return x, out, None if bias is None else bias.data_ptr()


def panel_linear(x: torch.Tensor, packed: torch.Tensor, n: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for x [rows, k] in the weight's dtype (fp32 or bf16), with `packed =
    pack_panels(weight)` and n = weight.shape[0]. Each output is one chain over k (fp32 accumulation),
    whatever the row count: a row's result never depends on the others in the call."""
    dtype = panels_dtype(packed)
    x, out, bias_ptr = _panel_call(x, n, bias, dtype)
    rows, k = x.shape
    pairs = k // 2 if dtype == torch.bfloat16 else k
    assert packed.shape[1] == pairs and n <= packed.shape[0] * packed.shape[2]
    call = load_library().panel_linear_bf16 if dtype == torch.bfloat16 else load_library().panel_linear_f32
    call(x.data_ptr(), x.stride(0), rows, packed.data_ptr(), bias_ptr, out.data_ptr(), n, k, torch.get_num_threads())
    return out


def panel_linear_silu(x: torch.Tensor, packed: torch.Tensor, n: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """silu_and_mul(panel_linear(x, packed, n, bias)) in one pass, the same bits, for the fused gate/up
    projection (n = 2 * inter, inter a multiple of panel_width()): the [rows, n] activation is never
    written out. → [rows, inter]."""
    inter = n // 2
    assert n % 2 == 0 and inter % load_library().panel_width() == 0
    x, out, bias_ptr = _panel_call(x, n, bias, out_width=inter)
    rows, k = x.shape
    assert packed.shape[1] == k and packed.shape[0] * packed.shape[2] == n
    if load_library().panel_linear_silu_f32(x.data_ptr(), x.stride(0), rows, packed.data_ptr(), bias_ptr,
                                            out.data_ptr(), inter, k, torch.get_num_threads()):
        raise MemoryError("no memory for the fused gate/up kernel's per-thread buffers")
    return out


def panel_linear_blocks(x: torch.Tensor, blocks: torch.Tensor, bits: int, n: int,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    """panel_linear(x, pack_panels(w), n, bias) for the fp32 weight w that quantised blocks [n, k / 32
    * block bytes] hold (layers/block_quant.py), without making w: each panel is unpacked in L2
    as it is used. The same bits as that call."""
    x, out, bias_ptr = _panel_call(x, n, bias)
    rows, k = x.shape
    assert blocks.dtype == torch.uint8 and blocks.is_contiguous()
    assert bits in BLOCK_BITS and k % 32 == 0 and blocks.shape[0] == n
    if load_library().panel_linear_blocks_f32(x.data_ptr(), x.stride(0), rows, blocks.data_ptr(), bits, bias_ptr,
                                              out.data_ptr(), n, k, torch.get_num_threads()):
        raise MemoryError(f"no memory for a {k} x panel-width buffer per thread")
    return out
