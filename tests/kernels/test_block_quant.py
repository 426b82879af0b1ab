"""The C kernels' 4-bit, 8-bit and e4m3 block layout (layers/block_quant.py) and the matmul that reads it
(asyncllm/kernels/cpu/quant_rows_impl.h): the blocks hold what the quantiser chose, the kernel computes x
times those weights (against float64), a row's result does not depend on the other rows, and the
default model's Q4_1 / Q8_0 tensors come back from the file's values."""
import pytest
import torch

from asyncllm.model.default_model import default_model_path
from asyncllm.model.gguf_file import GGUFFile
from asyncllm.kernels import cpu as cpu_kernels
from asyncllm.model.layers.block_quant import (
    BF16_MAX_ROWS, BLOCK_BYTES, MAX_ROWS, BlockQuantWeight, block_quant_supported, block_rows, logits_block_rows)
from asyncllm.model.layers.int4 import FP8_BITS, GroupQuantized, quantize_groups, quantize_groups_fp8, \
    quantize_groups_int8
from asyncllm.model.layers.ops import Ops

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(cpu_kernels.build_error() is not None, reason="the C kernels do not build here")]


@pytest.mark.parametrize("bits", [4, 8])
def test_blocks_hold_the_quantisers_codes_scales_and_minimums(bits):
    torch.manual_seed(bits)
    weight = torch.randn(48, 96) * 0.1
    q = quantize_groups(weight) if bits == 4 else quantize_groups_int8(weight)
    blocks = BlockQuantWeight.from_groups(q)
    assert blocks.blocks.dtype == torch.uint8 and blocks.blocks.shape == (48, 3 * BLOCK_BYTES[bits])
    assert blocks.nbytes == 48 * 3 * BLOCK_BYTES[bits]
    back = blocks.groups()
    assert back.bits == bits and torch.equal(back.codes, q.codes)
    assert torch.equal(back.scale, q.scale) and torch.equal(back.low, q.low)
    # Within half a step of the weight: 4 bits span (max - min) / 15, 8 bits max|w| / 127.
    error = (blocks.dequantize() - weight).abs().reshape(48, 3, 32).amax(-1)
    assert (error <= q.scale / 2 + 1e-6).all()


@pytest.mark.parametrize("bits", [4, 8])
def test_c_quantiser_makes_the_torch_quantisers_blocks(bits):
    """quantize() runs in C; from_groups(quantize_groups...) is the torch rule it must follow:
    the same bytes, constant and all-zero groups and halfway codes (round half to even) included;
    `exact` says whether the blocks give the weight back bit for bit."""
    torch.manual_seed(10 + bits)
    weight = torch.randn(32, 128) * 0.05
    weight[1, :32] = 0.25  # constant
    weight[2, 32:64] = 0.0  # all zeros
    weight[3, :32] = torch.arange(32.0) % 16  # 4 bits: scale 1, min 0
    weight[3, 5], weight[3, 6] = 2.5, 3.5  # halfway codes: 2 and 4
    weight[4, :32] = (torch.arange(32.0) - 16) * 0.5  # max |w| 8 in one group
    made = BlockQuantWeight.quantize(weight, bits)
    reference = BlockQuantWeight.from_groups(quantize_groups(weight) if bits == 4 else quantize_groups_int8(weight))
    assert torch.equal(made.blocks, reference.blocks)
    assert not made.exact  # random weights are not 4- or 8-bit values
    back = made.dequantize()
    again = BlockQuantWeight.quantize(back, bits)  # what was dequantised quantises to the same blocks...
    if bits == 8:
        assert again.exact and torch.equal(again.blocks, made.blocks)
    # Weights that are such values already: integers within the codes' range, per group.
    integers = torch.randint(0, 16, (16, 64)).float() if bits == 4 else torch.randint(-127, 128, (16, 64)).float()
    integers[:, 0], integers[:, 32] = (0, 0) if bits == 4 else (127, -127)  # each group spans the full range
    integers[:, 1], integers[:, 33] = (15, 15) if bits == 4 else (0, 0)
    integers[5] = 0.0
    made = BlockQuantWeight.quantize(integers, bits)
    assert made.exact and torch.equal(made.dequantize(), integers)


def test_every_e4m3_code_decodes_to_its_float8_value():
    """All 254 finite e4m3fn codes (both signs, subnormals included) in blocks with scale 1: the
    block kernel (1-8 rows) and the panel unpacking (more rows) multiply exactly torch's float8 values."""
    codes = torch.tensor([c for c in range(256) if c & 0x7F != 0x7F], dtype=torch.int32)
    codes = torch.cat([codes, codes[:2]]).reshape(-1, 32)  # 256 codes: 8 groups
    codes = codes.repeat(2, 1).reshape(16, 32)  # 16 rows of one group each
    q = GroupQuantized(codes, torch.ones(16, 1), torch.zeros(16, 1), bits=FP8_BITS)
    values = codes.to(torch.uint8).view(torch.float8_e4m3fn).float()
    assert torch.equal(q.rounded_once(), values) and (values[values != 0].abs().min() == 2.0 ** -9)
    blocks = BlockQuantWeight.from_groups(q)
    assert torch.equal(blocks.groups().codes, codes) and torch.equal(blocks.dequantize(), values)
    eye = torch.eye(32)
    assert torch.equal(blocks.linear_many_rows(eye).t(), values)
    for start in range(0, 32, 8):
        assert torch.equal(blocks.linear(eye[start:start + 8]).t(), values[:, start:start + 8])


def test_fp8_quantiser_scales_each_group_to_448():
    weight = torch.zeros(16, 64)
    weight[0, :32] = torch.linspace(-2.0, 1.0, 32)
    weight[1, 32:] = 1e-3  # constant group
    q = quantize_groups_fp8(weight)
    assert q.bits == FP8_BITS and q.scale[0, 0] == 2.0 / 448 and q.scale[2, 0] == 1.0  # all-zero: scale 1
    values = q.code_values()
    assert values[0, 0] == -448 and values[1, 32:].eq(448).all() and values[2:].eq(0).all()
    # round to nearest even in e4m3, then the scale: the rule's weights, written out here
    expected = (weight[0, :32] / (2.0 / 448)).to(torch.float8_e4m3fn).float() * (2.0 / 448)
    assert torch.equal(q.rounded_once()[0, :32], expected)
    made = BlockQuantWeight.quantize(weight, FP8_BITS)
    assert torch.equal(made.blocks, BlockQuantWeight.from_groups(q).blocks) and not made.exact
    again = BlockQuantWeight.quantize(made.dequantize(), FP8_BITS)  # e4m3 values already: exact
    assert again.exact and torch.equal(again.dequantize(), made.dequantize())


def test_int8_quantiser_follows_q8_0():
    weight = torch.zeros(16, 32)
    weight[0] = torch.tensor([0.5, -1.27, 0.0, 0.01] * 8)  # rows 1-15: all-zero groups
    q = quantize_groups_int8(weight)
    assert q.bits == 8 and torch.allclose(q.scale[:, 0], torch.tensor([0.01] + [1.0] * 15))  # zeros: scale 1
    assert q.codes[0, :4].tolist() == [50, -127, 0, 1] and int(q.codes[1:].abs().max()) == 0


@pytest.mark.parametrize("bits", [4, 8, FP8_BITS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 8])
@pytest.mark.parametrize("n, k", [(16, 32), (80, 96), (48, 1536)])
def test_kernel_matches_a_float64_matmul_of_its_weights(bits, dtype, rows, n, k):
    torch.manual_seed(rows * 1000 + n + k)
    weight = BlockQuantWeight.quantize(torch.randn(n, k) * 0.05, bits)
    x = torch.randn(rows, k).to(dtype)
    out = weight.linear(x)
    assert out.dtype == dtype and out.shape == (rows, n)
    expected = x.double() @ weight.dequantize().double().t()
    tol = dict(atol=2e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(out.double(), expected, **tol)


@pytest.mark.parametrize("bits", [4, 8, FP8_BITS])
def test_a_rows_result_does_not_depend_on_the_other_rows(bits):
    torch.manual_seed(3)
    weight = BlockQuantWeight.quantize(torch.randn(64, 160) * 0.05, bits)
    x = torch.randn(8, 160)
    together = weight.linear(x)
    for rows in range(1, 9):
        assert torch.equal(weight.linear(x[:rows]), together[:rows]), rows
    assert torch.equal(weight.linear(x.flip(0)), together.flip(0))
    assert torch.equal(torch.cat([weight.linear(x[i:i + 1]) for i in range(8)]), together)


def test_kernel_reads_strided_rows():
    torch.manual_seed(4)
    weight = BlockQuantWeight.quantize(torch.randn(32, 64) * 0.05, 4)
    wide = torch.randn(3, 100)
    x = wide[:, 10:74]
    assert not x.is_contiguous()
    assert torch.equal(weight.linear(x), weight.linear(x.contiguous()))


def test_bad_inputs_get_clear_errors():
    weight = BlockQuantWeight.quantize(torch.randn(16, 64), 4)
    for x in (torch.randn(9, 64), torch.randn(0, 64), torch.randn(2, 32), torch.randn(2, 64, dtype=torch.float64)):
        with pytest.raises(ValueError, match="linear_quant_rows takes"):
            weight.linear(x)
    with pytest.raises(ValueError, match="bits must be 4, 8 or 9"):
        BlockQuantWeight.quantize(torch.randn(16, 64), 3)
    with pytest.raises(ValueError, match="in_features % 32"):
        BlockQuantWeight.quantize(torch.randn(16, 48), 8)
    assert not block_quant_supported(torch.randn(24, 64)) and block_quant_supported(torch.randn(16, 64))
    assert not block_quant_supported(torch.randn(16, 64, dtype=torch.float64))


def test_default_models_quantised_tensors_come_back_from_the_file():
    """Its projections are Q4_1 and its embedding (the tied logits weight) Q8_0: the blocks made
    from the dequantised fp32 tensors give the file's weights back bit for bit."""
    with GGUFFile(default_model_path()) as gguf:
        assert gguf.tensors["token_embd.weight"].qtype.name == "Q8_0"
        embedding = gguf.load("token_embd.weight")[:4096]
        blocks = BlockQuantWeight.quantize(embedding, 8)
        assert blocks.exact and torch.equal(blocks.dequantize(), embedding)
        for name in ("blk.0.ffn_up.weight", "blk.7.attn_k.weight"):
            weight = gguf.load(name)
            blocks = BlockQuantWeight.quantize(weight, 4)
            assert blocks.exact and torch.equal(blocks.dequantize(), weight), name


def test_which_weights_get_blocks_for_how_many_rows():
    fp32, bf16 = torch.randn(32, 64), torch.randn(32, 64, dtype=torch.bfloat16)
    for bits in (4, 8, FP8_BITS):
        assert block_rows(fp32, Ops("cpu"), bits) == logits_block_rows(fp32, Ops("cpu"), bits) == MAX_ROWS
        assert block_rows(fp32, Ops("torch"), bits) == logits_block_rows(fp32, Ops("torch"), bits) == 0  # no C kernels
    # bf16: 8-bit blocks up to BF16_MAX_ROWS (oneDNN's packed bf16 wins above); 4 bits stay on
    # torch's int4 kernel, and then the logits weight keeps its dense copy too.
    assert block_rows(bf16, Ops("cpu"), 8) == logits_block_rows(bf16, Ops("cpu"), 8) == BF16_MAX_ROWS
    assert block_rows(bf16, Ops("cpu"), FP8_BITS) == logits_block_rows(bf16, Ops("cpu"), FP8_BITS) == BF16_MAX_ROWS
    assert block_rows(bf16, Ops("cpu"), 4) == logits_block_rows(bf16, Ops("cpu"), 4) == 0
    assert block_rows(torch.randn(24, 64), Ops("cpu"), 8) == 0  # not whole 16-row tiles
