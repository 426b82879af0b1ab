"""Each Triton kernel against its torch reference, on small shapes.

Without a GPU they run under Triton's interpreter (TRITON_INTERPRET=1, set in conftest); with
ASYNCLLM_TEST_DEVICE=cuda the same tests run compiled on the GPU.
"""
import os

import pytest
import torch

from asyncllm_kernels import (paged_decode_attention, reshape_and_cache, rms_norm, rotary_embedding,
                              varlen_prefill_attention)
from asyncllm_kernels.attention import paged_attention_reference
from asyncllm_kernels.cache import reshape_and_cache_reference
from asyncllm_kernels.lora import lora_bgmv, lora_bgmv_reference
from asyncllm_kernels.norm import rms_norm_reference
from asyncllm_kernels.rotary import rotary_reference

DEVICE = os.environ.get("ASYNCLLM_TEST_DEVICE", "cpu")
pytestmark = pytest.mark.timeout(300)


def _tol(dtype):
    return dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)


DTYPES = [torch.float32, torch.bfloat16]


def _cache(num_blocks, block_size, kv_heads, dim, dtype):
    return torch.randn(2, num_blocks, block_size, kv_heads, dim, dtype=dtype, device=DEVICE)


def _tables(seq_lens, block_size, num_blocks, generator):
    """Random, non-overlapping block tables (as a real allocator hands out), padded with 0."""
    need = [(n + block_size - 1) // block_size for n in seq_lens]
    perm = torch.randperm(num_blocks, generator=generator)
    table = torch.zeros(len(seq_lens), max(need), dtype=torch.int32)
    used = 0
    for i, n in enumerate(need):
        table[i, :n] = perm[used:used + n]
        used += n
    return table.to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
def test_reshape_and_cache_matches_reference(dtype):
    torch.manual_seed(0)
    cache = _cache(6, 16, 2, 8, dtype)
    expected = cache.clone()
    k = torch.randn(20, 2, 8, dtype=dtype, device=DEVICE)
    v = torch.randn(20, 2, 8, dtype=dtype, device=DEVICE)
    slots = torch.randperm(6 * 16)[:20].to(DEVICE)
    slots[3] = -1  # padding: must leave the cache alone
    reshape_and_cache(k, v, cache, slots)
    reshape_and_cache_reference(k, v, expected, slots)
    assert torch.equal(cache, expected)
    # Non-contiguous k/v rows (slices of a fused qkv output) are written too.
    qkv = torch.randn(5, 3, 2, 8, dtype=dtype, device=DEVICE)
    reshape_and_cache(qkv[:, 1], qkv[:, 2], cache, torch.arange(5, device=DEVICE))
    assert torch.equal(cache[0, 0, :5], qkv[:, 1]) and torch.equal(cache[1, 0, :5], qkv[:, 2])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_reference(dtype, with_residual):
    torch.manual_seed(0)
    x = torch.randn(7, 72, dtype=dtype, device=DEVICE) * 3
    weight = torch.randn(72, dtype=dtype, device=DEVICE)
    residual = torch.randn(7, 72, dtype=dtype, device=DEVICE) if with_residual else None
    got = rms_norm(x, weight, 1e-6, residual)
    want = rms_norm_reference(x, weight, 1e-6, residual)
    if with_residual:
        torch.testing.assert_close(got[1], want[1], **_tol(dtype))
        got, want = got[0], want[0]
    torch.testing.assert_close(got, want, **_tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_matches_reference_and_transformers_layout(dtype):
    from asyncllm.model.arch_config import RopeConfig
    from asyncllm.model.layers.rotary import RotaryEmbedding

    torch.manual_seed(0)
    rotary = RotaryEmbedding(RopeConfig(theta=10000.0), 32, 128)
    rotary.build(torch.device(DEVICE))
    positions = torch.tensor([0, 5, 17, 127, 64], device=DEVICE)
    q = torch.randn(5, 4, 32, dtype=dtype, device=DEVICE)
    k = torch.randn(5, 2, 32, dtype=dtype, device=DEVICE)
    want_q, want_k = rotary_reference(positions, q, k, rotary.cos, rotary.sin)
    engine_q, engine_k = rotary(positions, q, k)  # the engine's torch path agrees with the reference
    torch.testing.assert_close(engine_q, want_q, atol=0, rtol=0)
    got_q, got_k = rotary_embedding(positions, q.clone(), k.clone(), rotary.cos, rotary.sin)
    torch.testing.assert_close(got_q, want_q, **_tol(dtype))
    torch.testing.assert_close(got_k, want_k, **_tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [None, 20])
def test_paged_decode_attention_matches_reference(dtype, window):
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    heads, kv_heads, dim, block_size = 6, 2, 32, 16
    seq_lens = [1, 16, 17, 45, 70]
    cache = _cache(20, block_size, kv_heads, dim, dtype)
    tables = _tables(seq_lens, block_size, 20, generator)
    q = torch.randn(len(seq_lens), heads, dim, dtype=dtype, device=DEVICE)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    got = paged_decode_attention(q, cache, tables, lens, dim ** -0.5, window)
    want = paged_attention_reference(q, cache, tables, list(range(len(seq_lens) + 1)), seq_lens, dim ** -0.5,
                                     window)
    torch.testing.assert_close(got, want, **_tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [None, 100])
def test_paged_decode_split_k_matches_reference(dtype, window):
    """Long contexts over several key partitions (split-K, then the combine kernel), next to short
    requests whose later partitions are empty: equal to the reference and to the one-pass kernel."""
    generator = torch.Generator().manual_seed(2)
    torch.manual_seed(2)
    heads, kv_heads, dim, block_size = 4, 2, 32, 16
    seq_lens = [1, 40, 300, 517]
    cache = _cache(64, block_size, kv_heads, dim, dtype)
    tables = _tables(seq_lens, block_size, 64, generator)
    assert tables.shape[1] * block_size > 4 * 128  # five partitions of 128 tokens
    q = torch.randn(len(seq_lens), heads, dim, dtype=dtype, device=DEVICE)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    got = paged_decode_attention(q, cache, tables, lens, dim ** -0.5, window, partition=128)
    want = paged_attention_reference(q, cache, tables, list(range(len(seq_lens) + 1)), seq_lens, dim ** -0.5,
                                     window)
    torch.testing.assert_close(got, want, **_tol(dtype))
    one_pass = paged_decode_attention(q, cache, tables, lens, dim ** -0.5, window, partition=4096)
    torch.testing.assert_close(got, one_pass, **_tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [None, 24])
def test_varlen_prefill_attention_matches_reference(dtype, window):
    """Fresh prompts, chunks after a cached prefix and a 1-token chunk, in one varlen batch."""
    generator = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    heads, kv_heads, dim, block_size = 4, 2, 24, 16  # head_dim 24: not a power of two
    query_lens = [40, 9, 1, 33]
    seq_lens = [40, 9 + 30, 1 + 50, 33 + 16]
    cache = _cache(24, block_size, kv_heads, dim, dtype)
    tables = _tables(seq_lens, block_size, 24, generator)
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    q = torch.randn(starts[-1], heads, dim, dtype=dtype, device=DEVICE)
    got = varlen_prefill_attention(q, cache, tables, torch.tensor(starts, dtype=torch.int32, device=DEVICE),
                                   torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE), max(query_lens),
                                   dim ** -0.5, window)
    want = paged_attention_reference(q, cache, tables, starts, seq_lens, dim ** -0.5, window)
    torch.testing.assert_close(got, want, **_tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("part_ends", [(96,), (64, 200), (64, 80, 96)])
def test_lora_bgmv_matches_reference(dtype, part_ends):
    """Rows of three adapters (rank 8; inputs 150: not a multiple of the block) and of the base
    model (-1, untouched) in one launch, for 1, 2 and 3 fused parts."""
    generator = torch.Generator().manual_seed(3)
    rows, k, rank, n = 7, 150, 8, part_ends[-1]
    x = torch.randn(rows, k, generator=generator).to(dtype).to(DEVICE)
    y = torch.randn(rows, n, generator=generator).to(dtype).to(DEVICE)
    a = (torch.randn(3, len(part_ends) * rank, k, generator=generator) * 0.1).to(dtype).to(DEVICE)
    b = (torch.randn(3, rank, n, generator=generator) * 0.1).to(dtype).to(DEVICE)
    row_adapter = torch.tensor([0, -1, 2, 1, 1, -1, 0], dtype=torch.int64, device=DEVICE)
    want = lora_bgmv_reference(x.cpu(), y.cpu(), row_adapter.cpu(), a.cpu(), b.cpu(), part_ends)
    before = y.clone()
    lora_bgmv(x, y, row_adapter, a, b, part_ends)
    torch.testing.assert_close(y.cpu(), want, **_tol(dtype))
    base_rows = row_adapter < 0
    assert torch.equal(y[base_rows], before[base_rows]) and not torch.equal(y[~base_rows], before[~base_rows])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_moe_matches_reference(dtype):
    """Two grouped GEMMs over pairs sorted by expert: an expert with no tokens, one with most."""
    from asyncllm_kernels.moe import fused_moe, fused_moe_reference

    torch.manual_seed(0)
    experts, hidden, inter, tokens, top_k = 5, 48, 40, 19, 2
    w13 = (torch.randn(experts, 2 * inter, hidden) * 0.2).to(dtype).to(DEVICE)
    w2 = (torch.randn(experts, hidden, inter) * 0.2).to(dtype).to(DEVICE)
    x = torch.randn(tokens, hidden, dtype=dtype, device=DEVICE)
    ids = torch.randint(0, 3, (tokens, top_k), device=DEVICE)
    ids[:, 1] = (ids[:, 0] + 1) % 3  # two different experts per token; experts 3 and 4 get none
    ids[-1] = torch.tensor([0, 4])  # ... then one pair for expert 4
    weights = torch.softmax(torch.randn(tokens, top_k, device=DEVICE), -1).to(dtype)
    out = fused_moe(x, w13, w2, weights, ids)
    # bf16: the gate|up and activated rows are rounded to bf16 between the GEMMs (as vLLM does).
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=6e-2, rtol=5e-2)
    torch.testing.assert_close(out, fused_moe_reference(x, w13, w2, weights, ids), **tol)


@pytest.mark.parametrize("bits", [4, 8, 9])  # Q4_1, Q8_0, e4m3 (FP8_BITS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 5, 40])
def test_block_linear_matches_a_float64_matmul_of_the_blocks_weights(bits, dtype, rows):
    """The weight the C kernels' blocks hold (BlockQuantWeight.dequantize: code * scale + min),
    multiplied from the blocks themselves: 80 outputs (a part-filled column tile) of 96 inputs."""
    from asyncllm.model.layers.block_quant import BlockQuantWeight
    from asyncllm_kernels.quant import block_linear, block_linear_reference

    torch.manual_seed(rows * 10 + bits)
    quantized = BlockQuantWeight.quantize(torch.randn(80, 96) * 0.1, bits)
    x = torch.randn(rows, 96, dtype=dtype, device=DEVICE)
    got = block_linear(x, quantized.blocks.to(DEVICE), bits, 80)
    want = block_linear_reference(x, quantized.dequantize().to(DEVICE))
    assert got.dtype == dtype and got.shape == (rows, 80)
    torch.testing.assert_close(got.float(), want.float(), **(_tol(dtype) if dtype != torch.float32
                                                               else dict(atol=1e-4, rtol=1e-4)))


def test_block_linear_refuses_blocks_of_another_shape():
    from asyncllm.model.layers.block_quant import BlockQuantWeight
    from asyncllm_kernels.quant import block_linear

    blocks = BlockQuantWeight.quantize(torch.randn(16, 64), 4).blocks.to(DEVICE)
    with pytest.raises(ValueError, match="do not hold a 16x96 weight"):
        block_linear(torch.randn(2, 96, device=DEVICE), blocks, 4, 16)
    with pytest.raises(ValueError, match="bits 4, 8 or 9"):
        block_linear(torch.randn(2, 64, device=DEVICE), blocks, 5, 16)
