"""The C kernels of asyncllm/kernels/cpu against the torch code they replace."""
import pytest
import torch

from asyncllm.model.arch_config import RopeConfig
from asyncllm.kernels import cpu as cpu_kernels
from asyncllm.model.layers.attention import AttentionMetadata, TorchAttentionBackend
from asyncllm.model.interface import ModelContext
from asyncllm.model.layers.norm import RMSNorm
from asyncllm.model.layers.ops import Ops
from asyncllm.model.layers.rotary import RotaryEmbedding

pytestmark = pytest.mark.timeout(120)
DTYPES = [torch.float32, torch.bfloat16]


def _tol(dtype):
    return dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)


def test_kernels_build_here():
    # The dev and CI machines have gcc: the kernels must build (a failure prints the compiler's error).
    assert cpu_kernels.build_error() is None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 5, 33])
def test_rms_norm_matches_torch(dtype, rows):
    torch.manual_seed(0)
    norm = RMSNorm(96, 1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(96))
    x, residual = torch.randn(rows, 96, dtype=dtype), torch.randn(rows, 96, dtype=dtype)
    expected_normed, expected_sum = norm(x, residual)
    stream = residual.clone()
    normed, summed = cpu_kernels.rms_norm(x, norm.weight, 1e-5, stream)
    assert summed is stream and torch.equal(summed, expected_sum)  # the add rounds as torch's
    torch.testing.assert_close(normed, expected_normed, **_tol(dtype))
    torch.testing.assert_close(cpu_kernels.rms_norm(x, norm.weight, 1e-5), norm(x), **_tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_matches_torch_exactly(dtype):
    torch.manual_seed(0)
    rotary = RotaryEmbedding(RopeConfig(theta=10000.0), 32, 256)
    rotary.build(torch.device("cpu"))
    # q and k as the model has them: views into one fused qkv output, rows 3 heads wider than q.
    qkv = torch.randn(7, 4 + 2 + 2, 32, dtype=dtype)
    q, k = qkv[:, :4], qkv[:, 4:6]
    positions = torch.tensor([0, 1, 2, 100, 101, 255, 3])
    expected_q, expected_k = rotary(positions, q, k)
    before_v = qkv[:, 6:].clone()
    cpu_kernels.rotary_(positions, q, k, rotary.cos, rotary.sin)
    # Element-for-element the same roundings as torch's q * cos + rotate_half(q) * sin.
    assert torch.equal(q, expected_q) and torch.equal(k, expected_k)
    assert torch.equal(qkv[:, 6:], before_v)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 70])  # 70 x 1000 takes the parallel loop
def test_silu_and_mul_matches_torch(dtype, rows):
    torch.manual_seed(0)
    gate_up = (torch.randn(rows, 2000) * 6).to(dtype)
    gate_up[0, :4] = torch.tensor([-200.0, -90.0, 0.0, 90.0])  # far tails: no overflow, no NaN
    gate, up = gate_up.split(1000, dim=-1)
    expected = torch.nn.functional.silu(gate) * up
    got = cpu_kernels.silu_and_mul(gate_up)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, **_tol(dtype))


def _paged_case(dtype, seq_lens, block_size=4, kv_heads=2, heads=6, dim=16, num_blocks=40):
    generator = torch.Generator().manual_seed(1)
    cache = torch.randn(2, num_blocks, block_size, kv_heads, dim, generator=generator).to(dtype)
    need = [(n + block_size - 1) // block_size for n in seq_lens]
    perm = torch.randperm(num_blocks, generator=generator)
    tables = torch.zeros(len(seq_lens), max(need) + 1, dtype=torch.int64)  # one spare column of padding
    used = 0
    for i, n in enumerate(need):
        tables[i, :n] = perm[used:used + n]
        used += n
    q = torch.randn(len(seq_lens), heads, dim, generator=generator).to(dtype)
    meta = AttentionMetadata(num_decodes=len(seq_lens), query_start_loc=list(range(len(seq_lens) + 1)),
                             seq_lens=list(seq_lens), seq_lens_tensor=torch.tensor(seq_lens),
                             block_tables=tables, slot_mapping=torch.empty(0, dtype=torch.int64))
    return cache, tables, q, meta


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("dim,block_size", [(16, 4), (16, 32), (8, 4)])  # 16-wide path; any-dim path
def test_paged_decode_attention_matches_torch_backend(dtype, window, dim, block_size):
    # Nine sequences take the one-task-per-sequence split (>= 4 per thread); four, per KV head.
    seq_lens = [1, 7, 16, 29] if block_size == 4 else [1, 40, 70, 33, 5, 64, 65, 2, 31]
    cache, tables, q, meta = _paged_case(dtype, seq_lens, block_size=block_size, dim=dim)
    reference = TorchAttentionBackend(6, 2, dim, 0.25, window)
    expected = reference._decode(q, cache, meta, len(seq_lens), block_size)
    got = cpu_kernels.paged_decode_attention(q, cache, tables, meta.seq_lens_tensor, 0.25, window)
    torch.testing.assert_close(got, expected, **_tol(dtype))
    # Each sequence alone gives the same bits as in the batch: results never depend on batch mates.
    for b in range(len(seq_lens)):
        alone = cpu_kernels.paged_decode_attention(q[b:b + 1], cache, tables[b:b + 1], meta.seq_lens_tensor[b:b + 1],
                                                   0.25, window)
        assert torch.equal(alone[0], got[b])


def test_paged_decode_attention_reads_strided_queries():
    # The model hands q as a view into the fused qkv output (row stride wider than H * D).
    cache, tables, q, meta = _paged_case(torch.float32, [9, 3])
    wide = torch.zeros(2, 10, 16)
    wide[:, :6] = q
    got = cpu_kernels.paged_decode_attention(wide[:, :6], cache, tables, meta.seq_lens_tensor, 0.25, None)
    assert torch.equal(got, cpu_kernels.paged_decode_attention(q, cache, tables, meta.seq_lens_tensor, 0.25, None))


@pytest.mark.parametrize("dtype", DTYPES)
def test_write_kv_cache_matches_torch(dtype):
    from asyncllm.model.layers.attention import write_kv_cache

    torch.manual_seed(0)
    cache = torch.randn(2, 6, 4, 2, 8).to(dtype)
    expected = cache.clone()
    qkv = torch.randn(70, 3, 2, 8).to(dtype)  # k and v as strided views; 70 tokens takes the parallel loop
    big = torch.randn(2, 20, 4, 2, 8).to(dtype)
    big_expected = big.clone()
    slots = torch.randperm(80)[:70]
    write_kv_cache(qkv[:, 1], qkv[:, 2], big_expected, slots)
    cpu_kernels.write_kv_cache(qkv[:, 1], qkv[:, 2], big, slots)
    assert torch.equal(big, big_expected)
    write_kv_cache(qkv[:3, 1], qkv[:3, 2], expected, torch.tensor([5, 0, 23]))
    cpu_kernels.write_kv_cache(qkv[:3, 1], qkv[:3, 2], cache, torch.tensor([5, 0, 23]))
    assert torch.equal(cache, expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8])  # every tile shape, and rows that pad a tile
@pytest.mark.parametrize("n, k", [(48, 32), (96, 576), (16, 1536)])
def test_linear_few_rows_matches_matmul(dtype, rows, n, k):
    torch.manual_seed(0)
    weight = (torch.randn(n, k) * 0.05).to(dtype)
    x = torch.randn(rows, k).to(dtype)
    got = cpu_kernels.linear_few_rows(x, weight)
    exact = x.double() @ weight.double().t()
    # fp32: accumulation-order error only, as small as torch's own; bf16: one output rounding.
    torch_error = (torch.nn.functional.linear(x, weight).double() - exact).abs().max().item()
    error = (got.double() - exact).abs().max().item()
    assert got.dtype == dtype and got.shape == (rows, n)
    assert error <= max(2 * torch_error, 1e-5 if dtype == torch.float32 else 1e-2)
    # A row's result does not depend on the values of the other rows in its tile.
    others = torch.randn(rows, k).to(dtype)
    for r in range(rows):
        mixed = others.clone()
        mixed[r] = x[r]
        assert torch.equal(cpu_kernels.linear_few_rows(mixed, weight)[r], got[r])


def test_linear_few_rows_reads_strided_rows():
    torch.manual_seed(0)
    weight = torch.randn(32, 64)
    wide = torch.randn(4, 100)
    x = wide[:, 10:74]  # a view: rows 100 elements apart
    assert cpu_kernels.few_rows_supported(x, weight)
    torch.testing.assert_close(cpu_kernels.linear_few_rows(x, weight), x @ weight.t(), atol=1e-5, rtol=1e-5)


def test_few_rows_supported_refuses_what_it_cannot_take():
    x = torch.randn(4, 64)
    assert cpu_kernels.few_rows_supported(x, torch.randn(32, 64))
    assert not cpu_kernels.few_rows_supported(torch.randn(9, 64), torch.randn(32, 64))  # too many rows
    assert not cpu_kernels.few_rows_supported(x, torch.randn(24, 64))  # n not a multiple of 16
    assert not cpu_kernels.few_rows_supported(torch.randn(4, 40), torch.randn(32, 40))  # k neither
    assert not cpu_kernels.few_rows_supported(x, torch.randn(64, 32).t())  # weight not row-major
    assert not cpu_kernels.few_rows_supported(x.half(), torch.randn(32, 64).half())  # no fp16 kernels
    assert not cpu_kernels.few_rows_supported(torch.randn(2, 4, 64), torch.randn(32, 64))  # not [rows, k]


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 8, 9])
@pytest.mark.parametrize("packed", [True, False])
def test_linear_routes_fp32_rows_to_the_kernels(rows, packed, monkeypatch):
    from asyncllm.model.layers.linear import Linear

    torch.manual_seed(0)
    layer = Linear(64, 32, bias=True, ops=Ops("cpu"))
    if packed:
        layer.pack()
    calls = {"few": 0, "panel": 0}
    for name, key in (("linear_few_rows", "few"), ("panel_linear", "panel")):
        real = getattr(cpu_kernels, name)
        monkeypatch.setattr(cpu_kernels, name, lambda *a, real=real, key=key: calls.__setitem__(key, calls[key] + 1)
                            or real(*a))
    x = torch.randn(rows, 64)
    with torch.no_grad():
        got = layer(x)
        weight = layer.dense_weight()  # the plain weight, or its panel copy's values once pack() freed it
        torch.testing.assert_close(got, torch.nn.functional.linear(x, weight, layer.bias), atol=1e-5, rtol=1e-5)
        # With a panel copy, PANEL_MIN_ROWS rows and more (every step) read it; without one the
        # few-rows kernel serves up to 8 (one row too: MKL's gemv is slower on some CPUs).
        panel = packed and rows >= cpu_kernels.PANEL_MIN_ROWS
        few = not panel and rows <= cpu_kernels.FEW_ROWS_MAX
        assert calls == {"few": int(few), "panel": int(panel)}
        torch_layer = Linear(64, 32, bias=True, ops=Ops("torch"))
        torch_layer.load_state_dict({"weight": weight, "bias": layer.bias})
        if packed:
            torch_layer.pack()
        torch_layer(x)
        assert calls == {"few": int(few), "panel": int(panel)}


@pytest.mark.parametrize("rows", [1, 7, 8, 9, 64, 301])  # tiles of every height, chunks past 256 rows
@pytest.mark.parametrize("n, k", [(96, 576), (50, 33), (1000, 100)])  # n not a whole panel, odd k
@pytest.mark.parametrize("with_bias", [False, True])
def test_panel_linear_matches_matmul(rows, n, k, with_bias):
    torch.manual_seed(0)
    weight, x = torch.randn(n, k) * 0.05, torch.randn(rows, k)
    bias = torch.randn(n) if with_bias else None
    packed = cpu_kernels.pack_panels(weight)
    got = cpu_kernels.panel_linear(x, packed, n, bias)
    exact = x.double() @ weight.double().t() + (0 if bias is None else bias.double())
    torch_error = (torch.nn.functional.linear(x, weight, bias).double() - exact).abs().max().item()
    assert got.shape == (rows, n) and got.dtype == torch.float32
    assert (got.double() - exact).abs().max().item() <= max(2 * torch_error, 1e-5)
    # One FMA chain per output: a row's result is bit-equal alone and in any batch.
    for r in sorted({0, rows // 2, rows - 1}):
        assert torch.equal(cpu_kernels.panel_linear(x[r:r + 1], packed, n, bias)[0], got[r])
    assert torch.equal(cpu_kernels.panel_linear(x.flip(0), packed, n, bias), got.flip(0))


@pytest.mark.parametrize("rows", [3, 8, 9, 64, 301, 513])  # tiles of every height, chunks past 256 rows
@pytest.mark.parametrize("with_bias", [False, True])
def test_panel_linear_silu_equals_linear_then_silu_and_mul(rows, with_bias):
    """The fused gate/up kernel: the same bits as panel_linear and then silu_and_mul (the prompt
    path before it), row by row whatever the batch."""
    torch.manual_seed(0)
    width = cpu_kernels.load_library().panel_width()
    inter, k = 4 * width, 96
    weight, x = torch.randn(2 * inter, k) * 0.2, torch.randn(rows, k)
    bias = torch.randn(2 * inter) if with_bias else None
    packed = cpu_kernels.pack_panels(weight)
    got = cpu_kernels.panel_linear_silu(x, packed, 2 * inter, bias)
    assert got.shape == (rows, inter) and got.dtype == torch.float32
    assert torch.equal(got, cpu_kernels.silu_and_mul(cpu_kernels.panel_linear(x, packed, 2 * inter, bias)))
    gate, up = torch.nn.functional.linear(x, weight, bias).split(inter, dim=-1)
    torch.testing.assert_close(got, torch.nn.functional.silu(gate) * up, atol=1e-5, rtol=1e-5)
    assert torch.equal(cpu_kernels.panel_linear_silu(x[rows - 1:], packed, 2 * inter, bias)[0], got[rows - 1])


def test_mlp_takes_the_fused_gate_up_kernel_where_it_serves(monkeypatch):
    """LlamaMLP on the C kernels: fp32 steps go through panel_linear_silu with the same bits as the
    unfused path; halves that are not whole panels and layers without panels keep the unfused path."""
    from asyncllm.model.arch_config import LlamaFamilyConfig
    from asyncllm.model.llama import LlamaMLP

    width = cpu_kernels.load_library().panel_width()
    calls = []
    real = cpu_kernels.panel_linear_silu
    monkeypatch.setattr(cpu_kernels, "panel_linear_silu", lambda *a, **kw: calls.append(1) or real(*a, **kw))

    def mlp(intermediate: int, packed: bool) -> LlamaMLP:
        torch.manual_seed(0)
        cfg = LlamaFamilyConfig(architecture="LlamaForCausalLM", vocab_size=64, hidden_size=64,
                                intermediate_size=intermediate, num_layers=1, num_heads=4, num_kv_heads=2,
                                head_dim=16, rms_norm_eps=1e-5, max_position_embeddings=64, rope=RopeConfig(10000.0),
                                tie_word_embeddings=True, attention_bias=False, qk_norm=False, mlp_bias=True)
        module = LlamaMLP(cfg, ModelContext(Ops("cpu")))
        with torch.no_grad():
            for p in module.parameters():
                p.copy_(torch.randn_like(p) * 0.1)
        if packed:
            module.gate_up_proj.pack()
            module.down_proj.pack()
        return module

    x = torch.randn(20, 64)
    fused_mlp = mlp(2 * width, packed=True)
    with torch.no_grad():
        got = fused_mlp(x)
        assert calls == [1]
        expected = fused_mlp.down_proj(cpu_kernels.silu_and_mul(fused_mlp.gate_up_proj(x)))
        assert torch.equal(got, expected)
        mlp(2 * width + 4, packed=True)(x)  # halves not whole panels
        mlp(2 * width, packed=False)(x)  # no panel copy
    assert calls == [1]


def test_panel_linear_reads_strided_rows_and_leaves_the_weight():
    torch.manual_seed(0)
    weight = torch.randn(80, 64)
    before = weight.clone()
    packed = cpu_kernels.pack_panels(weight)
    wide = torch.randn(20, 100)
    x = wide[:, 10:74]  # rows 100 elements apart
    torch.testing.assert_close(cpu_kernels.panel_linear(x, packed, 80), x @ weight.t(), atol=1e-5, rtol=1e-5)
    assert torch.equal(weight, before)
    assert not cpu_kernels.panel_weight_supported(weight.half())  # fp32 and bf16 only
    assert not cpu_kernels.panel_weight_supported(torch.randn(8, 63).bfloat16())  # bf16 inputs go in pairs
    assert not cpu_kernels.panel_weight_supported(torch.randn(64, 80).t())  # weight rows must be contiguous


def test_bf16_panels_equal_an_fp32_chain_of_pair_products_and_ignore_the_row_count():
    """bf16 panel_linear: each output is fp32 multiply-adds over k in pairs (odd input, then even, as
    vdpbf16ps defines them) rounded once to bf16, plus the bias; the same bits for a row whether it
    comes alone or among 40, and for strided rows."""
    torch.manual_seed(0)
    n, k = 100, 96
    weight, bias = torch.randn(n, k).bfloat16(), torch.randn(n).bfloat16()
    packed = cpu_kernels.pack_panels(weight)
    assert packed.dtype == torch.int32 and packed.shape[1] == k // 2
    wide = torch.randn(40, k + 10).bfloat16()
    x = wide[:, 3:3 + k]
    got = cpu_kernels.panel_linear(x, packed, n, bias)
    w, xf = weight.double(), x.double()
    acc = torch.zeros(40, n, dtype=torch.float32)
    for c in range(0, k, 2):  # each product of two bf16 is exact in fp32; each sum rounds
        acc = (acc.double() + xf[:, c + 1:c + 2] * w[:, c + 1]).float()
        acc = (acc.double() + xf[:, c:c + 1] * w[:, c]).float()
    assert torch.equal(got, (acc + bias.float()).bfloat16())
    alone = torch.cat([cpu_kernels.panel_linear(x[i:i + 1], packed, n, bias) for i in range(40)])
    assert torch.equal(alone, got)


@pytest.mark.parametrize("dtype, amx", [(torch.float32, False), (torch.float32, True), (torch.bfloat16, False),
                                        (torch.bfloat16, True)])
def test_linear_packs_panels_for_the_c_kernels(dtype, amx, monkeypatch):
    """With kernels="cpu" an fp32 Linear, and a bf16 one without AMX, packs column panels and sends
    steps of every row count to panel_linear (one reduction order per output: batch-invariant); bf16
    on AMX CPUs keeps oneDNN's packed copy (cpu_kernels.bf16_kernels_serve)."""
    from asyncllm.model.layers.linear import Linear, prepack_supported

    monkeypatch.setattr(cpu_kernels, "cpu_has_amx", lambda: amx)
    panels = dtype == torch.float32 or not amx
    if not panels and not prepack_supported(torch.device("cpu"), dtype):
        pytest.skip("oneDNN cannot pack bf16 here (an AVX2-only CPU; AMX ones can)")
    assert prepack_supported(torch.device("cpu"), dtype, Ops("cpu"))
    torch.manual_seed(0)
    layer = Linear(64, 96, bias=True, ops=Ops("cpu")).to(dtype)
    layer.pack()
    assert layer.prepacked.is_packed
    assert (layer.prepacked.panels is not None) == panels and (layer.prepacked.packed is not None) == (not panels)
    calls = []
    real = cpu_kernels.panel_linear
    monkeypatch.setattr(cpu_kernels, "panel_linear", lambda *a: calls.append(a) or real(*a))
    tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    with torch.no_grad():
        for rows in (1, 5, 9, 40):
            x = torch.randn(rows, 64, dtype=dtype)
            torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.dense_weight(), layer.bias),
                                       **tolerance)
    assert len(calls) == (4 if panels else 0)  # 1, 5, 9 and 40 rows
    # Panels serve every step: the plain weight was freed (half the dense memory), its values kept.
    assert layer.weight_in_panels == panels and (layer.weight.numel() == 0) == panels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_tied_embedding_reads_its_rows_from_the_logits_panels(dtype):
    """Rows looked up in pack_panels' layout are the weight's rows, bit for bit, for any id shape."""
    from asyncllm.model.layers.embedding import VocabParallelEmbedding

    torch.manual_seed(4)
    weight = torch.randn(100, 64).to(dtype)  # 100 rows: the last panel part-filled
    embedding = VocabParallelEmbedding(100, 64).to(dtype)
    embedding.weight.data.copy_(weight)
    assert embedding.read_rows_from_panels(cpu_kernels.pack_panels(weight)) == weight.numel() * weight.element_size()
    ids = torch.tensor([[0, 99, 17], [16, 15, 47]])
    assert embedding.weight.numel() == 0 and torch.equal(embedding(ids), weight[ids])


def test_the_default_model_holds_each_weight_once(default_llm):
    """fp32 on the C kernels: projections and the tied embedding / logits weight live in their
    panel copies alone (each step reads those), the embedding's lookups too."""
    model = default_llm.engine.core.executor.worker.runner.model
    assert all(p.weight_in_panels for p in model.projections())
    assert model.embed_tokens.weight.numel() == 0 and model.embed_tokens.panels is model.logits_linear.panels
    assert not model.logits_only_blocks


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_panels_unpack_to_the_weight_and_serve_any_input_shape_once_it_is_freed(dtype):
    """unpack_panels is pack_panels' inverse, bit for bit; a Linear that kept only its panels gives
    for 3-D inputs and empty ones what it gives for the same rows in 2-D, and refuses to quantise."""
    from asyncllm.model.layers.linear import Linear

    torch.manual_seed(3)
    for n, k in ((96, 64), (80, 576), (17, 130)):
        weight = torch.randn(n, k).to(dtype)
        assert torch.equal(cpu_kernels.unpack_panels(cpu_kernels.pack_panels(weight), n), weight)
    if dtype == torch.bfloat16 and not cpu_kernels.bf16_kernels_serve():
        return
    layer = Linear(64, 48, bias=True, ops=Ops("cpu")).to(dtype)
    before = layer.weight.detach().clone()
    layer.pack()
    layer.pack()  # a second call keeps what the first made
    assert layer.weight_in_panels and torch.equal(layer.dense_weight(), before)
    with torch.no_grad():
        x = torch.randn(2, 5, 64, dtype=dtype)
        assert torch.equal(layer(x), layer(x.reshape(10, 64)).reshape(2, 5, 48))
        assert layer(torch.empty(0, 64, dtype=dtype)).shape == (0, 48)
    with pytest.raises(ValueError, match="before pack"):
        layer.quantize(8, int4_rows=8)
