"""The C prompt attention (cpu_kernels.prefill_attention) against the torch backend's SDPA path:
whole prompts, chunks after cached context, sliding windows, grouped KV heads, head sizes that
fill register panels partly, steps that mix decodes with prompts; bf16 against float64."""
import pytest
import torch

from asyncllm.kernels import cpu as cpu_kernels
from asyncllm.model.layers.attention import AttentionMetadata, TorchAttentionBackend
from asyncllm.model.layers.cpu_attention import CpuAttentionBackend

pytestmark = pytest.mark.skipif(cpu_kernels.build_error() is not None, reason="the C kernels need gcc")


def _step(query_lens, seq_lens, num_decodes, heads, kv_heads, dim, block_size=16, seed=0):
    """A step's q/k/v, a cache whose earlier context is random, and its metadata."""
    generator = torch.Generator().manual_seed(seed)
    need = [(n + block_size - 1) // block_size for n in seq_lens]
    num_blocks = sum(need) + 3
    cache = torch.randn(2, num_blocks, block_size, kv_heads, dim, generator=generator)
    perm = torch.randperm(num_blocks, generator=generator)
    tables = torch.zeros(len(seq_lens), max(need) + 1, dtype=torch.int64)
    slots, used = [], 0
    for i, (n, length, total) in enumerate(zip(need, query_lens, seq_lens)):
        tables[i, :n] = perm[used:used + n]
        used += n
        for pos in range(total - length, total):
            slots.append(int(tables[i, pos // block_size]) * block_size + pos % block_size)
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    tokens = starts[-1]
    q = torch.randn(tokens, heads + 2 * kv_heads, dim, generator=generator)[:, :heads]  # a view, as the model's
    k = torch.randn(tokens, kv_heads, dim, generator=generator)
    v = torch.randn(tokens, kv_heads, dim, generator=generator)
    meta = AttentionMetadata(num_decodes=num_decodes, query_start_loc=starts, seq_lens=list(seq_lens),
                             seq_lens_tensor=torch.tensor(seq_lens), block_tables=tables,
                             slot_mapping=torch.tensor(slots, dtype=torch.int64))
    return q, k, v, cache, meta


def _run(backend_cls, q, k, v, cache, meta, heads, kv_heads, dim, window):
    cache = cache.clone()
    backend = backend_cls(heads, kv_heads, dim, dim ** -0.5, window)
    return backend.forward(q, k, v, cache, meta), cache


CASES = {
    # name: (query_lens, seq_lens, num_decodes)
    "one prompt, several tiles": ([100], [100], 0),
    "prompts of one length": ([33, 33, 33], [33, 33, 33], 0),
    "chunks after cached context": ([40, 7, 70], [40, 7 + 60, 70 + 21], 0),
    "decodes then prompts": ([1, 1, 1, 45, 12], [9, 30, 64, 45, 12 + 40], 3),
    "one-token chunks among prompts": ([20, 1, 5, 1], [20, 1 + 33, 5 + 2, 1], 0),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("window", [None, 24])
@pytest.mark.parametrize("heads, kv_heads, dim", [(9, 3, 64), (4, 4, 24), (4, 2, 128)])
def test_prefill_attention_matches_torch_backend(case, window, heads, kv_heads, dim, monkeypatch):
    query_lens, seq_lens, nd = CASES[case]
    step = _step(query_lens, seq_lens, nd, heads, kv_heads, dim)
    calls = []
    real = cpu_kernels.prefill_attention
    monkeypatch.setattr(cpu_kernels, "prefill_attention", lambda *a: calls.append(a) or real(*a))
    got, got_cache = _run(CpuAttentionBackend, *step, heads, kv_heads, dim, window)
    assert len(calls) == 1  # every prompt chunk of the step in one call
    want, want_cache = _run(TorchAttentionBackend, *step, heads, kv_heads, dim, window)
    assert torch.equal(got_cache, want_cache)  # the same K/V written
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_a_prompt_alone_gives_the_bits_it_gives_in_a_batch():
    heads, kv_heads, dim = 9, 3, 64
    query_lens, seq_lens = [50, 7, 70], [50, 7 + 60, 70 + 21]
    q, k, v, cache, meta = _step(query_lens, seq_lens, 0, heads, kv_heads, dim)
    batch, filled = _run(CpuAttentionBackend, q, k, v, cache, meta, heads, kv_heads, dim, None)
    starts = meta.query_start_loc
    for i in range(len(query_lens)):
        alone = cpu_kernels.prefill_attention(
            q[starts[i]:starts[i + 1]], filled, meta.block_tables[i:i + 1],
            torch.tensor([0, query_lens[i]]), meta.seq_lens_tensor[i:i + 1], dim ** -0.5, None)
        assert torch.equal(alone, batch[starts[i]:starts[i + 1]])


def test_long_prompt_matches_sdpa():
    # 600 tokens: 19 tiles, scores past the L2-sized buffers of short prompts.
    heads, kv_heads, dim = 9, 3, 64
    step = _step([600], [600], 0, heads, kv_heads, dim, seed=3)
    got, _ = _run(CpuAttentionBackend, *step, heads, kv_heads, dim, None)
    want, _ = _run(TorchAttentionBackend, *step, heads, kv_heads, dim, None)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("window", [None, 24])
def test_bf16_prompts_stay_as_close_to_exact_as_sdpa(window, monkeypatch):
    """bf16 q, cache and output; the arithmetic in fp32. Against the float64 result on the same
    bf16 inputs: within bf16's rounding, and no further off than torch's bf16 SDPA."""
    heads, kv_heads, dim = 9, 3, 64
    q, k, v, cache, meta = _step([70, 7, 33], [70, 7 + 40, 33 + 16], 0, heads, kv_heads, dim, seed=5)
    q, k, v, cache = (t.bfloat16() for t in (q, k, v, cache))
    monkeypatch.setattr(cpu_kernels, "prefill_attention_takes", lambda dtype: True)  # AMX CPUs too
    got, got_cache = _run(CpuAttentionBackend, q, k, v, cache, meta, heads, kv_heads, dim, window)
    sdpa, _ = _run(TorchAttentionBackend, q, k, v, cache, meta, heads, kv_heads, dim, window)
    exact, _ = _run(TorchAttentionBackend, q.double(), k.double(), v.double(), cache.double(), meta, heads, kv_heads,
                    dim, window)
    assert got.dtype == torch.bfloat16 and got_cache.dtype == torch.bfloat16
    got_error = (got.double() - exact).abs()
    assert (got_error <= 1e-2 * exact.abs() + 1e-3).all()  # bf16 keeps 8 bits: one rounding is <= 0.4%
    assert got_error.mean() <= (sdpa.double() - exact).abs().mean() * 1.05


@pytest.mark.parametrize("amx", [False, True])
def test_bf16_prompts_take_the_c_kernel_only_without_amx(amx, monkeypatch):
    """Without AMX bf16 prompts take the C kernel (a decode step's bits); AMX CPUs keep torch's SDPA
    on the tiles, which ours was not measured against (cpu_kernels.bf16_kernels_serve)."""
    monkeypatch.setattr(cpu_kernels, "cpu_has_amx", lambda: amx)
    assert cpu_kernels.prefill_attention_takes(torch.float32)
    assert cpu_kernels.prefill_attention_takes(torch.bfloat16) == (not amx)
    assert not cpu_kernels.prefill_attention_takes(torch.float16)
    calls = []
    real = cpu_kernels.prefill_attention
    monkeypatch.setattr(cpu_kernels, "prefill_attention", lambda *a: calls.append(a) or real(*a))
    q, k, v, cache, meta = _step([20], [20], 0, 4, 2, 16)
    out, _ = _run(CpuAttentionBackend, q.bfloat16(), k.bfloat16(), v.bfloat16(), cache.bfloat16(), meta, 4, 2, 16, None)
    assert out.dtype == torch.bfloat16 and len(calls) == (0 if amx else 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads, kv_heads, dim, window", [(9, 3, 64, None), (4, 4, 128, None), (6, 2, 32, 20)])
def test_a_prompt_row_gets_the_bits_a_decode_step_gives_it(dtype, heads, kv_heads, dim, window):
    """Every query row of prompt chunks (after cached context too) equals paged decode attention for
    that token over the same cache, bit for bit: so a token's attention does not depend on whether
    it was computed in a prompt (whole, chunked, after a cache hit, recomputed after preemption) or
    while decoding (issue 26)."""
    torch.manual_seed(3)
    block_size, lens, contexts = 16, [70, 33, 5], [0, 16, 40]
    blocks_each = [(c + n + block_size - 1) // block_size for c, n in zip(contexts, lens)]
    cache = torch.randn(2, sum(blocks_each) + 1, block_size, kv_heads, dim).to(dtype)
    perm = torch.randperm(sum(blocks_each)) + 1  # scattered blocks; block 0 unused
    tables, start = torch.zeros(len(lens), max(blocks_each), dtype=torch.int64), 0
    for b, count in enumerate(blocks_each):
        tables[b, :count] = perm[start:start + count]
        start += count
    q = torch.randn(sum(lens), heads, dim).to(dtype)
    query_starts = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int64)
    seq_lens = torch.tensor([c + n for c, n in zip(contexts, lens)], dtype=torch.int64)
    prompt = cpu_kernels.prefill_attention(q, cache, tables, query_starts, seq_lens, dim ** -0.5, window)
    for b, (ctx, n) in enumerate(zip(contexts, lens)):
        for r in range(n):
            row = query_starts[b] + r
            decode = cpu_kernels.paged_decode_attention(q[row:row + 1].contiguous(), cache, tables[b:b + 1],
                                                        torch.tensor([ctx + r + 1]), dim ** -0.5, window)
            assert torch.equal(decode[0], prompt[row]), (b, r)
