"""GroupedWeight (a packed checkpoint's projection in the weight stream) under the cuts the loaders
make, and quantization_config parsing."""
import pytest
import torch

from asyncllm.model.checkpoint_quant import GroupedWeight, read_quantization_config
from asyncllm.model.layers.int4 import GroupQuantized


@pytest.fixture
def grouped() -> GroupedWeight:
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (48, 128), generator=g, dtype=torch.int32)
    scale = torch.rand(48, 4, generator=g).to(torch.float16).float()
    low = -scale * torch.randint(0, 16, (48, 4), generator=g)
    return GroupedWeight(GroupQuantized(codes, scale, low, 4))


def test_cuts_along_rows_and_whole_groups_stay_groups_and_others_go_dense(grouped):
    dense = grouped.dequantize()
    assert torch.equal(dense, grouped.groups.dequantize())  # the blocks' values, one rounding (exact here)
    rows = grouped.narrow(0, 16, 16)
    assert isinstance(rows, GroupedWeight) and torch.equal(rows.dequantize(), dense[16:32])
    columns = grouped.narrow(1, 32, 64)  # a tensor-parallel rank's whole groups
    assert isinstance(columns, GroupedWeight) and torch.equal(columns.dequantize(), dense[:, 32:96])
    cut = grouped.narrow(1, 16, 32)  # through a group: no blocks can hold it
    assert isinstance(cut, torch.Tensor) and torch.equal(cut, dense[:, 16:48])
    parts = grouped.split([32, 8, 8])  # Phi-3's fused QKV
    assert [p.shape[0] for p in parts] == [32, 8, 8]
    assert torch.equal(torch.cat([p.dequantize() for p in parts]), dense)


def test_quantization_configs_are_read_as_their_formats_say():
    assert read_quantization_config(None) is None
    v1 = read_quantization_config({"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": True})
    assert (v1.bits, v1.group_size, v1.desc_act, v1.zero_offset) == (4, 128, True, 1)  # stored zero - 1
    v2 = read_quantization_config({"quant_method": "gptq", "bits": 8, "group_size": -1,
                                   "checkpoint_format": "gptq_v2"})
    assert (v2.bits, v2.zero_offset) == (8, 0)
    awq = read_quantization_config({"quant_method": "awq", "w_bit": 4, "q_group_size": 64, "version": "GEMM"})
    assert (awq.method, awq.group_size, awq.packed) == ("awq", 64, True)
    ct = read_quantization_config({"quant_method": "compressed-tensors", "format": "pack-quantized",
                                   "config_groups": {"g": {"targets": ["Linear"], "weights": {
                                       "num_bits": 4, "type": "int", "symmetric": True, "strategy": "channel"}}}})
    assert (ct.bits, ct.group_size, ct.symmetric) == (4, -1, True)
    fp8 = read_quantization_config({"quant_method": "fp8", "weight_block_size": [128, 128]})
    assert not fp8.packed and fp8.fp8.block_size == (128, 128) and fp8.fp8.scale_name == "weight_scale_inv"
    with pytest.raises(ValueError, match="group_size must be -1 or > 0"):
        read_quantization_config({"quant_method": "gptq", "bits": 4, "group_size": 0})
