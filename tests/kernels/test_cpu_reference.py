"""Every C kernel against its plain torch reference beside it (asyncllm/kernels/cpu/reference.py):
float64 loops, one rounding to the dtype; exact where the kernel promises torch's roundings."""
import pytest
import torch

from asyncllm.kernels import cpu as cpu_kernels
from asyncllm.kernels.cpu import reference

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(cpu_kernels.build_error() is not None, reason="the C kernels do not build here")]
DTYPES = [torch.float32, torch.bfloat16]


def _close(got, want, dtype):
    tol = dict(atol=3e-5, rtol=3e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    assert got.dtype == want.dtype == dtype
    torch.testing.assert_close(got, want, **tol)


def _randn(*shape, dtype=torch.float32, seed=0, scale=1.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_elementwise_kernels(dtype):
    x, residual, weight = _randn(33, 96, dtype=dtype), _randn(33, 96, dtype=dtype, seed=1), _randn(96, dtype=dtype,
                                                                                                    seed=2)
    _close(cpu_kernels.rms_norm(x, weight, 1e-5), reference.rms_norm(x, weight, 1e-5), dtype)
    got_stream, want_stream = residual.clone(), residual.clone()
    got, got_h = cpu_kernels.rms_norm(x, weight, 1e-5, got_stream)
    want, want_h = reference.rms_norm(x, weight, 1e-5, want_stream)
    assert torch.equal(got_h, want_h) and got_h is got_stream and want_h is want_stream  # the add: exact
    _close(got, want, dtype)

    gate_up = _randn(70, 2000, dtype=dtype, seed=3, scale=6.0)
    _close(cpu_kernels.silu_and_mul(gate_up), reference.silu_and_mul(gate_up), dtype)

    angles = torch.outer(torch.arange(256.0), 1.0 / 10000 ** (torch.arange(0, 32, 2) / 32))
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    qkv = _randn(7, 8, 32, dtype=dtype, seed=4)
    want_qkv = qkv.clone()
    positions = torch.tensor([0, 1, 2, 100, 101, 255, 3])
    cpu_kernels.rotary_(positions, qkv[:, :4], qkv[:, 4:6], cos, sin)
    reference.rotary_(positions, want_qkv[:, :4], want_qkv[:, 4:6], cos, sin)
    assert torch.equal(qkv, want_qkv)  # the same roundings, v untouched


def _cache(dtype, seq_lens, block_size, kv_heads, dim, seed=1):
    generator = torch.Generator().manual_seed(seed)
    need = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(need) + 3
    cache = torch.randn(2, num_blocks, block_size, kv_heads, dim, generator=generator).to(dtype)
    perm = torch.randperm(num_blocks, generator=generator)
    tables = torch.zeros(len(seq_lens), max(need) + 1, dtype=torch.int64)
    used = 0
    for i, n in enumerate(need):
        tables[i, :n] = perm[used:used + n]
        used += n
    return cache, tables


@pytest.mark.parametrize("dtype", DTYPES)
def test_write_kv_cache(dtype):
    cache, _ = _cache(dtype, [80], 4, 2, 8)
    want = cache.clone()
    kv = _randn(70, 3, 2, 8, dtype=dtype, seed=5)
    slots = torch.randperm(80, generator=torch.Generator().manual_seed(6))[:70]
    cpu_kernels.write_kv_cache(kv[:, 1], kv[:, 2], cache, slots)
    reference.write_kv_cache(kv[:, 1], kv[:, 2], want, slots)
    assert torch.equal(cache, want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("heads,kv_heads,dim,block_size", [(6, 2, 16, 4), (6, 2, 8, 32), (9, 3, 64, 16)])
def test_paged_decode_attention(dtype, window, heads, kv_heads, dim, block_size):
    seq_lens = [1, 40, 70, 33, 5, 64, 65, 2, 31]
    cache, tables = _cache(dtype, seq_lens, block_size, kv_heads, dim)
    q = _randn(len(seq_lens), heads, dim, dtype=dtype, seed=7)
    lens = torch.tensor(seq_lens)
    _close(cpu_kernels.paged_decode_attention(q, cache, tables, lens, dim ** -0.5, window),
           reference.paged_decode_attention(q, cache, tables, lens, dim ** -0.5, window), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [None, 24])
@pytest.mark.parametrize("heads,kv_heads,dim", [(9, 3, 64), (4, 4, 24)])
def test_prefill_attention(dtype, window, heads, kv_heads, dim):
    query_lens, seq_lens = [40, 1, 7, 70], [40, 9, 7 + 60, 70 + 21]
    cache, tables = _cache(dtype, seq_lens, 16, kv_heads, dim)
    starts = torch.tensor([0] + torch.tensor(query_lens).cumsum(0).tolist())
    q = _randn(int(starts[-1]), heads, dim, dtype=dtype, seed=8)
    lens = torch.tensor(seq_lens)
    _close(cpu_kernels.prefill_attention(q, cache, tables, starts, lens, dim ** -0.5, window),
           reference.prefill_attention(q, cache, tables, starts, lens, dim ** -0.5, window), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_linear_few_rows(dtype, rows):
    weight, x = _randn(96, 576, dtype=dtype, scale=0.05), _randn(rows, 576, dtype=dtype, seed=9)
    _close(cpu_kernels.linear_few_rows(x, weight), reference.linear_few_rows(x, weight), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 5, 8])
def test_lora_rows(dtype, rows):
    """Three parts (a fused QKV of 64 + 16 + 16 columns, 100 inputs: not a multiple of 16), three
    adapters of rank 4; rows of the base model (-1) are left alone."""
    x, base = _randn(rows, 100, dtype=dtype, seed=12), _randn(rows, 96, dtype=dtype, seed=13)
    a = _randn(3, 3 * 4, 100, dtype=dtype, seed=14, scale=0.1)
    b = _randn(3, 4, 96, dtype=dtype, seed=15, scale=0.1)
    row_adapter = torch.tensor([r % 4 if r % 4 < 3 else -1 for r in range(rows)], dtype=torch.int64)
    part_ends = torch.tensor([64, 80, 96], dtype=torch.int64)
    got, want = base.clone(), base.clone()
    cpu_kernels.lora_rows(x, got, row_adapter, a, b, part_ends)
    reference.lora_rows(x, want, row_adapter, a, b, part_ends)
    _close(got, want, dtype)
    untouched = row_adapter < 0
    assert torch.equal(got[untouched], base[untouched]) and not torch.equal(got[~untouched], base[~untouched])


@pytest.mark.parametrize("rows", [1, 9, 70])
def test_panel_linears(rows):
    lib_width = cpu_kernels.load_library().panel_width()
    weight, x, bias = _randn(4 * lib_width, 160, scale=0.05), _randn(rows, 160, seed=10), _randn(4 * lib_width, seed=11)
    packed = cpu_kernels.pack_panels(weight)
    _close(cpu_kernels.panel_linear(x, packed, weight.shape[0], bias), reference.panel_linear(x, weight, bias),
           torch.float32)
    _close(cpu_kernels.panel_linear_silu(x, packed, weight.shape[0], bias),
           reference.panel_linear_silu(x, weight, bias), torch.float32)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantised_blocks(bits):
    weight = _randn(48, 96, seed=12, scale=0.1)
    weight[1, :32] = 0.25  # a constant group
    weight[2, 32:64] = 0.0  # an all-zero group
    block_bytes = 8 + 16 if bits == 4 else 4 + 32
    blocks, _ = cpu_kernels.quantize_blocks(weight, bits, block_bytes)
    assert torch.equal(blocks, reference.quantize_blocks(weight, bits))
    # Half a step from the weight at most: the layout is read as the docstring says.
    error = (reference.dequantize_blocks(blocks, bits, 48, 96) - weight).abs().reshape(48, 3, 32).amax(-1)
    span = weight.reshape(48, 3, 32)
    step = (span.amax(-1) - span.amin(-1)) / 15 if bits == 4 else span.abs().amax(-1) / 127
    assert (error <= step / 2 + 1e-6).all()
    for dtype in DTYPES:
        x = _randn(5, 96, dtype=dtype, seed=13)
        _close(cpu_kernels.linear_quant_rows(x, blocks, bits, 48, 96),
               reference.linear_quant_rows(x, blocks, bits, 48, 96), dtype)
    x = _randn(20, 96, seed=14)
    _close(cpu_kernels.panel_linear_blocks(x, blocks, bits, 48), reference.panel_linear_blocks(x, blocks, bits, 48),
           torch.float32)
